"""Write docs/cli.md from loraprune's argument parser, so that the page cannot drift from the flags.

    python scripts/cli_docs.py           # rewrite docs/cli.md
    python scripts/cli_docs.py --check   # exit 1 if docs/cli.md differs from what the parser says

The parser is read at run time (loraprune.cli.build_parser), so a new flag, default or help text
reaches the page by running this again; tests/test_docs.py fails while the page is stale.
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli.md"
DEFAULT = re.compile(r"\s*\(default: ([^()]*)\)$")  # the suffix cli.py appends, not a default the help explains
TYPES = {int: "N", float: "X", str: "TEXT"}

INTRO = """# Command line

`loraprune` has one subcommand per job. Each is a thin call of a typed Python function, and each flag
is a field of a settings dataclass (`lora_r` is `--lora-r`) whose help is the flag's help: this page
is generated from the argument parser by `python scripts/cli_docs.py`, and a test fails when it is out
of date. `loraprune SUBCOMMAND --help` prints the same.

A bad flag or value is one line on stderr and exit status 2, and nothing is written. `prune` also
reads a YAML file of settings (`--config run.yaml`, flag or field names); flags typed on the command
line override it, and every run saves its resolved settings as `OUT/loraprune.yaml`, which `--config`
accepts as it is. Model and data names (`--model`, `--data`) are described in
[families](families.md) and [evaluation](evaluation.md).
"""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """name -> (one-line help, parser) of every subcommand, in the order the CLI lists them."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flag_row(action: argparse.Action) -> list[str]:
    """flag, value, default, what: one table row of an argument."""
    text = action.help or ""
    match = DEFAULT.search(text)
    default = match.group(1) if match else None
    text = DEFAULT.sub("", text)
    if "(required)" in text or action.required:
        text, default = text.replace(" (required)", "").replace("(required)", ""), "required"
    if not action.option_strings:  # positional
        return [f"`{action.dest.upper()}`", "", "required", cell(text)]
    if isinstance(action, argparse.BooleanOptionalAction):
        flag, value = " / ".join(f"`{o}`" for o in action.option_strings), ""
    else:
        flag = " / ".join(f"`{o}`" for o in action.option_strings)
        value = " \\| ".join(map(str, action.choices)) if action.choices else TYPES.get(action.type, "TEXT")
    if default is None and action.default not in (None, argparse.SUPPRESS):
        default = str(action.default)
    shown = "" if default in (None, "None") else default if default == "required" else f"`{default}`"
    return [flag, value, shown, cell(text)]


def render() -> str:
    """The whole page, from the parser as the installed loraprune builds it."""
    from loraprune.cli import build_parser

    commands = subcommands(build_parser())
    out = [INTRO, "| command | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#loraprune-{name}) | {cell(help)} |" for name, (help, _) in commands.items()]
    for name, (help, parser) in commands.items():
        rows = [flag_row(a) for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        out += ["", f"## loraprune {name}", "", f"{help[:1].upper()}{help[1:]}.", ""]
        out += ["| flag | value | default | what |", "|---|---|---|---|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if docs/cli.md is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        stale = not PAGE.exists() or PAGE.read_text() != text
        if stale:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python scripts/cli_docs.py", file=sys.stderr)
        return int(stale)
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
