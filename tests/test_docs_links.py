"""Every relative link and image in README.md and docs/*.md points at a file that exists, and
every #anchor at a heading of its page (GitHub's heading ids). External links are not fetched."""

import glob
import os
import re
from typing import Dict, List

import pytest
from helpers import ROOT

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); the text may span lines; an optional "title" is allowed.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`[^`]+`")


def _prose(text: str) -> str:
    """The text with fenced code blocks and inline code removed (links there are not links)."""
    out, in_fence = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        out.append("" if in_fence else line)
    return _INLINE_CODE.sub("", "\n".join(out))


def github_anchor(heading: str) -> str:
    """GitHub's id of a heading: lower case, punctuation but '-' and '_' removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    """Every heading id of a markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen: Dict[str, int] = {}
    ids = set()
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else _HEADING.match(line)
        if m:
            base = github_anchor(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def broken_links(path: str) -> List[str]:
    """The relative links / images of ``path`` whose file or #anchor does not exist."""
    with open(path, encoding="utf-8") as f:
        text = _prose(f.read())
    problems = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (
            os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        )
        if not os.path.exists(dest):
            problems.append(f"{target}: {os.path.relpath(dest, ROOT)} does not exist")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
    return problems


PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_resolve(page):
    assert broken_links(page) == []


def test_the_docs_pages_a_user_looks_for_exist_and_are_linked_from_the_readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in ("quickstart", "training", "checkpoints", "methods", "performance", "design"):
        assert f"(docs/{name}.md" in readme, name
    assert len(readme.split("\n")) <= 300  # a front page, not the manual


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: yes\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[ok](other.md#a-code-heading-yes) [ok](#title) [web](https://x.org/none)\n"
        "![picture\nover two lines](missing.png) [gone](nope.md) [bad](other.md#nothing)\n"
        "[self](#missing)\n```\n[in code](ignored.md)\n```\n`[inline](ignored.md)`\n"
    )
    assert broken_links(str(page)) == [
        "missing.png: " + os.path.relpath(str(tmp_path / "missing.png"), ROOT) + " does not exist",
        "nope.md: " + os.path.relpath(str(tmp_path / "nope.md"), ROOT) + " does not exist",
        "other.md#nothing: no heading #nothing in "
        + os.path.relpath(str(tmp_path / "other.md"), ROOT),
        "#missing: no heading #missing in " + os.path.relpath(str(page), ROOT),
    ]
