"""Code cites the design notes by a path that exists, and by a section they have."""

import re

from tests.run_helpers import REPO


def test_every_citation_names_a_section_of_docs_design_md():
    notes = REPO / "docs" / "design.md"
    headings = [line.lstrip("#").strip() for line in notes.read_text().splitlines() if line.startswith("#")]
    cited = set()
    for folder in ("dsdpo", "launch", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            assert "DESIGN" + ".md" not in text, path  # the old name, outside the repository
            cited |= {
                (path.name, s) for s in re.findall(r'docs/design\.md, "([^"]+)"', " ".join(text.split()))
            }
    assert cited, "no citations found"
    missing = [(name, s) for name, s in cited if not any(h.startswith(s) for h in headings)]
    assert not missing, missing
