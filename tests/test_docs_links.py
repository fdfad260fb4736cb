"""The documentation's relative links and images point at files that exist, and the front page stays short.

Walks README.md, benchmarks/README.md and every docs/*.md; no model, no network.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

# ![alt](target) and [text](target), each with an optional "title"; images are taken (and blanked)
# first, so an image inside a link, [![alt](img)](target), yields both targets.
_TARGET = r"\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
IMAGE = re.compile(r"!\[[^\[\]]*\]" + _TARGET)
LINK = re.compile(r"\[[^\[\]]*\]" + _TARGET)
# <img src="..."> in raw HTML
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)
# [label]: target reference definitions
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://", "data:")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    return files


def strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
    body = strip_code(text)
    images = IMAGE.findall(body)
    body = IMAGE.sub("image", body)
    return images + LINK.findall(body) + IMG_SRC.findall(body) + REF_DEF.findall(body)


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in link_targets(path.read_text(encoding="utf-8")):
        if target.lower().startswith(EXTERNAL) or target.startswith("#"):
            continue
        file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not file_part:
            continue
        resolved = (ROOT / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
        if not resolved.exists():
            broken.append(target)
    return broken


def test_the_documents_exist():
    names = {p.relative_to(ROOT).as_posix() for p in doc_files()}
    assert "README.md" in names and "benchmarks/README.md" in names
    assert any(n.startswith("docs/") for n in names), "docs/ holds no markdown files"
    for path in doc_files():
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path):
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES}"


def test_the_link_extractor_sees_links_and_images():
    text = ("See [a](docs/a.md#x), ![img](shots/b.png \"t\"), [![c](c.png)](d.md) and <img src=\"e.png\">.\n"
            "`[not](code.md)`\n```\n[nor](fenced.md)\n```\n[ref]: f.md\n")
    assert sorted(link_targets(text)) == ["c.png", "d.md", "docs/a.md#x", "e.png", "f.md", "shots/b.png"]
