"""The eval data format, the leave-last-out split, and the converters on the real shared files."""

from __future__ import annotations

from pathlib import Path

import pytest

from reranker.evaluation import convert_mind, convert_ml100k, formats

from conftest import SHARED_DATA

ML100K = SHARED_DATA / "ml-100k"
MIND = SHARED_DATA / "mind-sample"


def test_leave_last_out_uses_timestamps_and_keeps_file_order_on_ties() -> None:
    events = [
        formats.Interaction("u", "late", 30.0),
        formats.Interaction("u", "early", 10.0),
        formats.Interaction("u", "tie-1", 20.0),
        formats.Interaction("u", "tie-2", 30.0),
        formats.Interaction("v", "only", 5.0),
    ]
    split = formats.leave_last_out(events)
    assert [e.item_id for e in split.history["u"]] == ["early", "tie-1", "late"]
    assert split.target["u"].item_id == "tie-2"
    assert split.history["v"] == [] and split.target["v"].item_id == "only"


def test_round_trip_of_all_three_files(tmp_path: Path) -> None:
    formats.write_items(tmp_path / "items.tsv", [("i1", "a\ttab and\nnewline"), ("i2", "plain")])
    formats.write_events(tmp_path / "events.tsv", [formats.Interaction("u", "i1", 12.5, "purchase")])
    formats.write_candidates(tmp_path / "c.tsv", [("u", [formats.CandidateRow("i1", 0.5, 1), formats.CandidateRow("i2", 0.25)])])
    assert formats.read_items(tmp_path / "items.tsv") == {"i1": "a tab and newline", "i2": "plain"}
    assert formats.read_events(tmp_path / "events.tsv") == [formats.Interaction("u", "i1", 12.5, "purchase")]
    assert formats.read_candidates(tmp_path / "c.tsv") == {
        "u": [formats.CandidateRow("i1", 0.5, 1), formats.CandidateRow("i2", 0.25, None)]
    }


def test_served_lists_round_trip_with_timestamps_and_list_ids(tmp_path: Path) -> None:
    lists = [
        formats.ServedList("r1", "u", 10.0, (formats.CandidateRow("a", 1.0), formats.CandidateRow("b", 0.5))),
        formats.ServedList("r2", "u", 20.0, (formats.CandidateRow("a", 2.0),)),
        formats.ServedList("r3", "v", None, (formats.CandidateRow("c", 0.0, 1),)),
    ]
    formats.write_served_lists(tmp_path / "c.tsv", lists)
    assert formats.read_served_lists(tmp_path / "c.tsv") == lists


def test_served_lists_by_header_names_group_runs_and_ignore_other_columns(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    path.write_text(
        "user_id\titem_id\tscore\tvariant\ttimestamp\n"
        "u\ta\t1\tRERANKED\t5\nu\tb\t0.5\tRERANKED\t5\nu\tc\t1\tCONTROL\t7\nv\ta\t1\tCONTROL\t5\n"
    )
    got = formats.read_served_lists(path)
    assert [(s.user_id, s.timestamp, [r.item_id for r in s.rows]) for s in got] == [
        ("u", 5.0, ["a", "b"]), ("u", 7.0, ["c"]), ("v", 5.0, ["a"]),
    ]
    # The eval reader gives one list per user.
    assert [r.item_id for r in formats.read_candidates(path)["u"]] == ["a", "b", "c"]
    path.write_text("user_id\titem_id\tscore\ttimestamp\nu\ta\t1\tsoon\n")
    with pytest.raises(formats.FormatError, match="c.tsv:2: score and timestamp must be numbers"):
        formats.read_served_lists(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user\titem\tts\nu1\ti1\n", "events.tsv:2: expected 3-4 tab-separated fields, got 2"),
        ("user\titem\tts\nu1\ti1\tyesterday\n", "events.tsv:2: timestamp 'yesterday' is not a number"),
        ("user\titem\tts\tkind\nu1\ti1\t5\tteleport\n", "events.tsv:2: event_type 'teleport' is not one of"),
        ("", "empty file"),
    ],
)
def test_malformed_events_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "events.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(formats.FormatError, match=message):
        formats.read_events(path)


def test_ml100k_converter_on_the_real_files(tmp_path: Path) -> None:
    if not (ML100K / "ml-100k.inter").is_file():
        pytest.skip("shared ml-100k data missing")
    counts = convert_ml100k.convert(ML100K, tmp_path)
    assert counts == {"items": 1682, "events": 100_000}
    items = formats.read_items(tmp_path / "items.tsv")
    assert items["1"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert items["267"] == "unkonwn"  # the placeholder record keeps its title, loses the bogus year and genre
    events = formats.read_events(tmp_path / "events.tsv")
    assert len({e.user_id for e in events}) == 943
    split = formats.leave_last_out(events)
    assert len(split.users) == 943
    assert sum(len(h) for h in split.history.values()) == 100_000 - 943
    # the target is never earlier than any history event
    assert all(split.target[u].timestamp >= max(e.timestamp for e in split.history[u]) for u in split.users)


def test_ml100k_min_rating_keeps_only_liked_items() -> None:
    if not (ML100K / "ml-100k.inter").is_file():
        pytest.skip("shared ml-100k data missing")
    assert len(convert_ml100k.load_events(ML100K, min_rating=4)) == 34_174 + 21_201  # ratings 4 and 5 (SOURCE.md)


def test_mind_converter_on_the_real_sample(tmp_path: Path) -> None:
    if not (MIND / "behaviors.tsv").is_file():
        pytest.skip("shared MIND sample missing")
    counts = convert_mind.convert(MIND, tmp_path)
    assert counts["items"] == 2000 and counts["candidates"] == 189_359 and counts["impressions"] == 5000
    candidates = formats.read_candidates(tmp_path / "candidates.tsv")
    assert sum(r.label for rows in candidates.values() for r in rows) == 7542  # clicks in SOURCE.md
    first = candidates["U81994#58376"]
    assert first[0].score == 0.0 and first[1].score == -1.0  # logged order = upstream order
    split = formats.leave_last_out(formats.read_events(tmp_path / "events.tsv"))
    for user, rows in list(candidates.items())[:200]:
        clicked = [r.item_id for r in rows if r.label == 1]
        assert split.target[user].item_id == clicked[0]
    items = formats.read_items(tmp_path / "items.tsv")
    assert items["N34700"].startswith("New Florida Majority celebrates grand opening of Fort Lauderdale office")
    assert "news / newspolitics" in items["N34700"]


def test_mind_converter_rejects_a_bad_impression(tmp_path: Path) -> None:
    (tmp_path / "news.tsv").write_text("N1\tnews\tpolitics\tTitle\tAbstract\turl\t[]\t[]\n", encoding="utf-8")
    (tmp_path / "behaviors.tsv").write_text("1\tU1\t11/12/2019 2:14:46 PM\tN1\tN1-yes\n", encoding="utf-8")
    with pytest.raises(formats.FormatError, match="behaviors.tsv:1: impression entry 'N1-yes'"):
        convert_mind.convert(tmp_path, tmp_path / "out")


def test_ml100k_converter_reads_the_grouplens_download_like_the_recbole_files(tmp_path: Path) -> None:
    """The GroupLens zip's layout (u.data; u.item in Latin-1 with "Title (year)" and genre flags),
    written here from the shared RecBole files, converts to the same items and events."""
    if not (ML100K / "ml-100k.inter").is_file():
        pytest.skip("shared ml-100k data missing")
    grouplens = tmp_path / "ml-100k"
    grouplens.mkdir()
    inter = (ML100K / "ml-100k.inter").read_text(encoding="utf-8").splitlines()[1:]
    (grouplens / "u.data").write_text("\n".join(inter) + "\n", encoding="latin-1")
    rows = []
    for line in (ML100K / "ml-100k.item").read_text(encoding="utf-8").splitlines()[1:]:
        item_id, title, year, genres = line.split("\t")
        flags = ["1" if g in genres.split() else "0" for g in convert_ml100k.GENRES]
        # RecBole split "Title (1995) (V)" into title "Title (1995)" and year "V"
        dated = f"{title} ({year})" if year.strip() and year.lower() != "unkonwn" else title
        rows.append("|".join([item_id, dated, f"01-Jan-{year}" if year.isdigit() else "", "", "http://x", *flags]))
    (grouplens / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1")

    assert convert_ml100k.load_items(grouplens) == convert_ml100k.load_items(ML100K)
    assert convert_ml100k.load_events(grouplens) == convert_ml100k.load_events(ML100K)
    assert convert_ml100k.convert(grouplens, tmp_path / "out") == {"items": 1682, "events": 100_000}


def test_ml100k_converter_names_the_layouts_it_reads(tmp_path: Path) -> None:
    with pytest.raises(formats.FormatError, match="u.data and u.item .* ml-100k.inter and ml-100k.item"):
        convert_ml100k.convert(tmp_path, tmp_path / "out")
