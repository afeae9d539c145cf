"""Convert MovieLens-100K in RecBole atomic format (ml-100k.inter / ml-100k.item) to the eval format.

Item text = "Title (year). Genres: A, B" (the leading article RecBole moves to the end stays there).
Every rating is one implicit-feedback event of type `click` at its timestamp; `--min-rating` keeps
only ratings at or above a threshold (default: all, the usual leave-last-out setup).
"""

from __future__ import annotations

from pathlib import Path

from reranker.evaluation.formats import FormatError, Interaction, write_events, write_items


def _atomic_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise FormatError(f"{path}: empty file")
    header = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise FormatError(f"{path}:{number}: expected {len(header)} fields, got {len(row)}")
    return header, rows


def item_text(title: str, year: str, genres: str) -> str:
    text = title.strip()
    if year.strip() and year.strip().lower() != "unkonwn":
        text += f" ({year.strip()})"
    genre_list = [g for g in genres.split() if g.lower() != "unknown"]
    if genre_list:
        text += ". Genres: " + ", ".join(genre_list)
    return text


def load_items(directory: Path) -> list[tuple[str, str]]:
    header, rows = _atomic_rows(Path(directory) / "ml-100k.item")
    col = {name: i for i, name in enumerate(header)}
    return [
        (r[col["item_id"]], item_text(r[col["movie_title"]], r[col["release_year"]], r[col["class"]])) for r in rows
    ]


def load_events(directory: Path, min_rating: float = 0.0) -> list[Interaction]:
    header, rows = _atomic_rows(Path(directory) / "ml-100k.inter")
    col = {name: i for i, name in enumerate(header)}
    events = [
        Interaction(r[col["user_id"]], r[col["item_id"]], float(r[col["timestamp"]]))
        for r in rows
        if float(r[col["rating"]]) >= min_rating
    ]
    # Stable order: by user, then time; equal timestamps keep the file's order.
    events.sort(key=lambda e: (int(e.user_id) if e.user_id.isdigit() else 0, e.user_id, e.timestamp))
    return events


def convert(directory: Path, output: Path, min_rating: float = 0.0) -> dict[str, int]:
    """Write output/items.tsv and output/events.tsv; returns counts."""
    output = Path(output)
    items = write_items(output / "items.tsv", load_items(directory))
    events = write_events(output / "events.tsv", load_events(directory, min_rating))
    return {"items": items, "events": events}
