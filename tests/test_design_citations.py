"""Code and docs cite the design notes and guides by paths that exist in the repository, and by
sections those files have."""

import re

from tests.run_helpers import REPO

# Files of other projects, cited as theirs (the sentence names the project), not files of this one.
EXTERNAL = {"EVAL.md"}  # ML-GSAI/LLaDA's evaluation notes (docs/evaluation.md)


def _citing_files():
    """Every file that may cite a .md file: the code, the scripts, the tests, and the docs."""
    for folder in ("dsdpo", "launch", "tests", "benchmarks"):
        yield from (REPO / folder).rglob("*.py")
    yield from (REPO / "docs").glob("*.md")
    yield from (REPO / "tests").rglob("*.md")
    yield REPO / "README.md"
    yield REPO / "benchmarks" / "README.md"


def _headings(path):
    return [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]


def test_every_cited_md_file_is_in_the_repository():
    cited, missing = 0, []
    for path in _citing_files():
        text = path.read_text()
        assert "DESIGN" + ".md" not in text, path  # the old name, outside the repository
        for name in re.findall(r"[A-Za-z0-9_./-]*[A-Za-z0-9_]\.md\b", text):
            cited += 1
            if name in EXTERNAL:
                continue
            if not ((REPO / name).is_file() or (path.parent / name).is_file()):
                missing.append((str(path.relative_to(REPO)), name))
    assert cited, "no citations found"
    assert not missing, missing


def test_every_cited_section_is_a_heading_of_the_cited_file():
    cited = set()
    for path in _citing_files():
        text = " ".join(path.read_text().split())
        cited |= {
            (str(path.relative_to(REPO)), doc, section)
            for doc, section in re.findall(r'(docs/[a-z_]+\.md), "([^"]+)"', text)
        }
    assert {doc for _, doc, _ in cited} >= {"docs/design.md", "docs/published_code.md"}, cited
    missing = [
        (name, doc, s)
        for name, doc, s in cited
        if not (REPO / doc).is_file() or not any(h.startswith(s) for h in _headings(REPO / doc))
    ]
    assert not missing, missing
