"""The README stays a user's document (issue 23): short, and its links lead somewhere."""

from __future__ import annotations

import re

from tests.repo_helpers import REPO

MAX_LINES = 220


def test_readme_is_at_most_220_lines() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_LINES}): move detail to docs/"
    )


def test_readme_links_to_files_that_exist() -> None:
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(((?!https?://|#)[^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if not (REPO / t).exists()]
    assert targets and not missing, f"README links to missing files: {missing}"
