class LoraPruneError(Exception):
    """A problem with the user's input: the CLI prints the message and exits non-zero."""


def write_error(error: OSError, doing: str, kept: str) -> LoraPruneError:
    """One line for a failed write: a full disk (or quota) is named as such, with what survived."""
    import errno

    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return LoraPruneError(f"the disk is full: {doing} failed; {kept}; free some space and run again")
    return LoraPruneError(f"{doing} failed ({error.strerror or error}); {kept}")
