"""Convert MovieLens-100K to the eval format, from either layout:

- the GroupLens download (https://grouplens.org/datasets/movielens/100k/, `ml-100k.zip` unzipped):
  `u.data` (user, item, rating, timestamp; tab-separated) and `u.item` (`|`-separated, Latin-1,
  "Title (year)" and 19 genre flags);
- RecBole atomic files: `ml-100k.inter` and `ml-100k.item` (tab-separated, typed header).

Item text = "Title (year). Genres: A, B" (the leading article RecBole moves to the end stays there).
Every rating is one implicit-feedback event of type `click` at its timestamp; `--min-rating` keeps
only ratings at or above a threshold (default: all, the usual leave-last-out setup).
"""

from __future__ import annotations

import re
from pathlib import Path

from reranker.evaluation.formats import FormatError, Interaction, write_events, write_items

# u.item's genre flags, in u.genre's order
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_TITLE_YEAR = re.compile(r"^(.*\S)\s+\((\d{4})\)$")


def _grouplens(directory: Path) -> bool:
    """True for the GroupLens layout (u.data, u.item), False for RecBole's; FormatError for neither."""
    directory = Path(directory)
    if (directory / "ml-100k.inter").is_file() and (directory / "ml-100k.item").is_file():
        return False
    if (directory / "u.data").is_file() and (directory / "u.item").is_file():
        return True
    raise FormatError(
        f"{directory}: expected u.data and u.item (the GroupLens ml-100k.zip, unzipped) or ml-100k.inter and "
        "ml-100k.item (RecBole atomic files)"
    )


def _grouplens_items(path: Path) -> list[tuple[str, str]]:
    out = []
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5 + len(GENRES):
            raise FormatError(f"{path}:{number}: expected {5 + len(GENRES)} '|'-separated fields, got {len(fields)}")
        title, year = fields[1], ""
        match = _TITLE_YEAR.match(title.strip())
        if match:
            title, year = match.group(1), match.group(2)
        genres = " ".join(g for g, flag in zip(GENRES, fields[5:]) if flag.strip() == "1")
        out.append((fields[0], item_text(title, year, genres)))
    return out


def _grouplens_events(path: Path, min_rating: float) -> list[Interaction]:
    out = []
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise FormatError(f"{path}:{number}: expected 4 tab-separated fields, got {len(fields)}")
        if float(fields[2]) >= min_rating:
            out.append(Interaction(fields[0], fields[1], float(fields[3])))
    return out


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
    if _grouplens(directory):
        return _grouplens_items(Path(directory) / "u.item")
    header, rows = _atomic_rows(Path(directory) / "ml-100k.item")
    col = {name: i for i, name in enumerate(header)}
    return [
        (r[col["item_id"]], item_text(r[col["movie_title"]], r[col["release_year"]], r[col["class"]])) for r in rows
    ]


def load_events(directory: Path, min_rating: float = 0.0) -> list[Interaction]:
    if _grouplens(directory):
        events = _grouplens_events(Path(directory) / "u.data", min_rating)
    else:
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
