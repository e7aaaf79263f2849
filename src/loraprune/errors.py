class LoraPruneError(Exception):
    """A problem with the user's input: the CLI prints the message and exits non-zero."""
