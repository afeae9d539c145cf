"""The documentation stays navigable and current: the README is a front page that links every docs
page, relative links between pages resolve (files and #anchors), and docs/settings.md is exactly
what `scripts/gen_settings_doc.py` generates from the Settings dataclass."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO
from reranker.config import settings_markdown, settings_page_markdown

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6} (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_settings_page_is_the_generated_one() -> None:
    page = (DOCS / "settings.md").read_text(encoding="utf-8")
    assert page == settings_page_markdown(), "docs/settings.md is stale: run scripts/gen_settings_doc.py"
    assert settings_markdown() in page


def test_readme_links_every_docs_page_and_fits_on_a_screen() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = {t.split("#", 1)[0] for t in LINK.findall(readme)}
    pages = sorted(DOCS.glob("*.md"))
    assert len(pages) >= 8
    for page in pages:
        assert f"docs/{page.name}" in targets, f"README does not link docs/{page.name}"
    assert "ARCHITECTURE.md" in targets
    assert len(readme.splitlines()) <= 300
    assert "make serve" in readme and "make test" in readme


def test_relative_links_and_anchors_resolve() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
