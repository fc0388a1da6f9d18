"""Every relative link in the README and in docs/*.md points at a file that exists.

Links and images (`[text](path)`, `![alt](path)`, `[text]: path`) outside code are collected;
external ones (http, https, mailto) are skipped. A path must exist relative to the page; an
anchor (`page.md#heading`, `#heading`) must name a heading of the target page, slugged as
GitHub slugs headings.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:.|\n)*?\1")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def pages() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def strip_code(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    prose = strip_code(text)
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def shown(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT)) if path == ROOT or ROOT in path.parents else str(path)


def broken_links(page: pathlib.Path) -> list[str]:
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page.resolve()
        where = f"{shown(page)}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file: {shown(resolved)})")
        elif anchor and resolved.suffix == ".md" and anchor.lower() not in anchors(resolved):
            broken.append(f"{where} (no heading with anchor #{anchor} in {shown(resolved)})")
    return broken


def test_docs_exist():
    assert (ROOT / "docs").is_dir()
    assert len(pages()) > 1, "docs/ holds no .md pages"


def test_relative_links_resolve():
    broken = [b for page in pages() for b in broken_links(page)]
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    readme = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text(encoding="utf-8"))
              if not EXTERNAL.match(t) and t.partition("#")[0]}
    unlinked = [str(p.relative_to(ROOT)) for p in pages()[1:] if p.resolve() not in readme]
    assert not unlinked, "docs pages the README does not link to: " + ", ".join(unlinked)


def test_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](page.md#title) ![pic](missing.png) [gone](#nowhere)\n"
                    "`[in code](nope.md)`\n```\n[fenced](nope.md)\n```\n[web](https://example.com)\n")
    targets = links(page.read_text())
    assert targets == ["page.md#title", "missing.png", "#nowhere", "https://example.com"]
    assert slug("REPA, ERW and LayerSync + REPA") == "repa-erw-and-layersync--repa"
    assert slug("Automatic pairs: `--config.objective.layersync.pairs=auto`") == \
        "automatic-pairs---configobjectivelayersyncpairsauto"
    assert anchors(page) == {"title"}
    assert [b.split(": ", 1)[1] for b in broken_links(page)] == [
        f"missing.png (no such file: {(tmp_path / 'missing.png').resolve()})",
        f"#nowhere (no heading with anchor #nowhere in {page.resolve()})"]


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into a docs/ page (at most 250)"
