"""Write docs/settings.md from the Settings dataclass (reranker/config.py).

Run after adding or changing a setting: `PYTHONPATH=$PWD python scripts/gen_settings_doc.py`.
tests/test_docs.py fails when the committed page differs from what this writes.
"""
from __future__ import annotations

from pathlib import Path

from reranker.config import settings_page_markdown

PAGE = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def main() -> None:
    PAGE.write_text(settings_page_markdown(), encoding="utf-8")
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
