"""Convert the MIND format (behaviors.tsv / news.tsv, no header lines) to the eval format.

- items.tsv: news_id, "title. category / subcategory. abstract"
- Every impression becomes one evaluation "user" `<user_id>#<impression_id>` (a user can have
  several impressions with different histories). Its clicked history becomes events one second
  apart ending one second before the impression time (MIND has no per-click times), followed by
  one target event: the impression's first clicked news at the impression time.
- candidates.tsv: the impression's news in the logged order, score = -position (the logged order
  is the "upstream" order), label = the click label (1/0). Metrics then use the labels (AUC too).

Impressions without any click are skipped (no target). News ids without a row in news.tsv keep no
text: the reranker ranks them by upstream score alone.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from reranker.evaluation.formats import (
    CandidateRow,
    FormatError,
    Interaction,
    write_candidates,
    write_events,
    write_items,
)

TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


def load_news(path: Path) -> list[tuple[str, str]]:
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 5:
            raise FormatError(f"{path}:{number}: expected at least 5 fields, got {len(parts)}")
        news_id, category, subcategory, title, abstract = parts[:5]
        text = f"{title.strip()}. {category} / {subcategory}."
        if abstract.strip():
            text += " " + abstract.strip()
        items.append((news_id, text))
    return items


def parse_time(raw: str) -> float:
    return datetime.strptime(raw.strip(), TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp()


def load_behaviors(path: Path) -> tuple[list[Interaction], list[tuple[str, list[CandidateRow]]]]:
    events: list[Interaction] = []
    lists: list[tuple[str, list[CandidateRow]]] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 5:
            raise FormatError(f"{path}:{number}: expected 5 fields, got {len(parts)}")
        impression_id, user_id, raw_time, history, impressions = parts
        try:
            when = parse_time(raw_time)
        except ValueError:
            raise FormatError(f"{path}:{number}: time {raw_time!r} is not M/D/YYYY h:mm:ss AM/PM") from None
        rows = []
        for position, entry in enumerate(impressions.split()):
            news_id, sep, label = entry.rpartition("-")
            if not sep or label not in ("0", "1"):
                raise FormatError(f"{path}:{number}: impression entry {entry!r} is not NEWSID-0/1")
            rows.append(CandidateRow(news_id, float(-position), int(label)))
        clicked = [r.item_id for r in rows if r.label == 1]
        if not clicked:
            continue
        eval_user = f"{user_id}#{impression_id}"
        clicks = history.split()
        for i, news_id in enumerate(clicks):
            events.append(Interaction(eval_user, news_id, when - (len(clicks) - i)))
        events.append(Interaction(eval_user, clicked[0], when))
        lists.append((eval_user, rows))
    return events, lists


def convert(directory: Path, output: Path) -> dict[str, int]:
    """Write output/items.tsv, events.tsv and candidates.tsv from directory/{news,behaviors}.tsv."""
    directory, output = Path(directory), Path(output)
    items = write_items(output / "items.tsv", load_news(directory / "news.tsv"))
    events, lists = load_behaviors(directory / "behaviors.tsv")
    return {
        "items": items,
        "events": write_events(output / "events.tsv", events),
        "candidates": write_candidates(output / "candidates.tsv", lists),
        "impressions": len(lists),
    }
