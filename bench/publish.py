"""A benchmark run's output: its JSON in bench/results, then its page rebuilt from every JSON there
(bench/pages.py), in docs/benchmarks/ or as a marked section of a shared markdown file."""

from pathlib import Path

from . import common, pages


def update_markdown(path: Path, name: str, title: str, body: str) -> None:
    """Replace (or append) the section `name` of the markdown file at `path`, between markers, so
    that several benchmarks can share one file (`--markdown FILE.md`)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text)


def write_page(args, page: str, section: str, title: str) -> Path | None:
    """Rebuild the page `page` (bench/pages.py) from every JSON in --results, where --markdown says:
    docs/benchmarks/<page>.md by default, or as the marked section `section` titled `title` of a
    shared markdown file; '' writes none."""
    if args.markdown == "":
        return None
    results = Path(args.results)
    if args.markdown is None:
        path = common.PAGES / f"{page}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pages.page(page, results, path))
    else:
        path = Path(args.markdown)
        update_markdown(path, section, title, pages.body(page, results, path))
    return path


def publish(args, argv, name: str, title: str, results: dict) -> dict:
    """Write a run's JSON (args, machine, command and `results`), then rebuild its page from the JSON
    (`title`: the section's title in a shared --markdown file); returns the JSON payload."""
    cmd = common.command(argv, f"bench.{name}")
    payload = {"benchmark": name, "label": args.label, "args": vars(args), "machine": common.machine(), "command": cmd}
    payload.update(results)
    common.write_json(args, name, payload)
    write_page(args, name, name, title)
    return payload
