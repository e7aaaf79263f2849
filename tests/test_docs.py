"""The documentation against the code and the results: the command-line page is what the parser
says, the benchmark pages and BENCHMARKS.md are what the JSON says, every link resolves, every
page is reachable from the README, and the prose carries no commit hashes, dates or issue numbers
(the JSON in bench/results holds the provenance)."""

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README, BENCHMARKS, DOCS = ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "docs"
# the sections source docstrings cite as docs/method.md#<anchor>
METHOD_SECTIONS = (
    "setting",
    "groups",
    "lora-guided-criterion",
    "scores-and-criteria",
    "streamed-criterion",
    "moving-average",
    "schedule",
    "masks-and-shrinking",
    "distillation",
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [README, BENCHMARKS, *sorted(DOCS.rglob("*.md"))]


def prose(text: str) -> str:
    """`text` without its code blocks and inline code: what a reader reads as sentences."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def test_the_cli_page_is_what_the_parser_says():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    cli_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_docs)
    assert (DOCS / "cli.md").read_text() == cli_docs.render(), "docs/cli.md is stale: python scripts/cli_docs.py"


def test_the_benchmark_pages_and_claims_are_what_the_json_says(capsys):
    sys.path.insert(0, str(ROOT))  # bench/ is a folder of scripts next to src/
    from bench import pages

    assert pages.main(["--check"]) == 0, "stale: python -m bench.pages\n" + capsys.readouterr().out


def test_the_front_pages_are_short():
    assert len(README.read_text().splitlines()) <= 200
    assert len(BENCHMARKS.read_text().splitlines()) <= 150


def test_every_page_is_reachable_from_the_readme():
    linked = set()
    for page in (README, BENCHMARKS):
        linked |= {(page.parent / target.split("#")[0]).resolve() for target in LINK.findall(page.read_text())}
    missing = [p.relative_to(ROOT) for p in sorted(DOCS.rglob("*.md")) if p.resolve() not in linked]
    assert not missing, f"not linked from README.md or BENCHMARKS.md: {missing}"
    assert BENCHMARKS.resolve() in linked


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: {target} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name}: {target}: no such section"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_prose_carries_no_commit_date_or_issue_number(page):
    text = prose(page.read_text())
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert not hashes, f"commit hashes in {page.name}: {hashes}"
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", text), f"dates in {page.name}"
    assert not re.findall(r"\b[Ii]ssues? #?\d+|#\d+\b", text), f"issue numbers in {page.name}"


def test_the_method_page_has_the_sections_sources_cite():
    sections = anchors(DOCS / "method.md")
    assert set(METHOD_SECTIONS) <= sections
    cited = set()
    for path in (ROOT / "src").rglob("*.py"):
        cited |= set(re.findall(r"docs/method\.md#([\w-]+)", path.read_text()))
    assert cited <= sections, f"cited but missing in docs/method.md: {sorted(cited - sections)}"


def test_sources_cite_only_documents_that_ship():
    stale = [
        f"{path.relative_to(ROOT)}: {match}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        for match in re.findall(r"METHOD\.md[^\n]*|BENCHMARKS\.md,? (?:section )?\d[^\n]*", path.read_text())
    ]
    assert not stale, "\n".join(stale)


def test_the_readme_python_example_names_what_the_package_has():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
