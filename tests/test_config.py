from __future__ import annotations

import dataclasses

import pytest

from conftest import REPO
from reranker.config import (
    SECTION_OF,
    SECTIONS,
    RankingSettings,
    Settings,
    SettingsError,
    flat_fields,
    settings_markdown,
    settings_parser,
)


def test_defaults_bind_loopback_and_use_the_packaged_model() -> None:
    s = Settings()
    assert s.server.address.startswith("127.0.0.1:")
    assert s.model.encoder == "transformer" and s.model.model_dir == ""
    assert s.model.device == "cpu"


def test_flag_beats_environment_beats_default() -> None:
    env = {"RERANKER_MAX_CANDIDATES": "10", "RERANKER_BLEND_WEIGHT": "0.25", "RERANKER_KILL_SWITCH": "true"}
    s = Settings.from_sources(["--max-candidates", "20"], env)
    assert s.limits.max_candidates == 20
    assert s.ranking.blend_weight == 0.25
    assert s.ranking.kill_switch is True
    assert Settings.from_sources(["--no-kill-switch"], env).ranking.kill_switch is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RERANKER_BLEND_WEIGHT": "1.5"}, "blend_weight"),
        ({"RERANKER_ENCODER": "magic"}, "encoder"),
        ({"RERANKER_MAX_CANDIDATES": "0"}, "max_candidates"),
        ({"RERANKER_MAX_CANDIDATES": "many"}, "RERANKER_MAX_CANDIDATES"),
        ({"RERANKER_KILL_SWITCH": "perhaps"}, "RERANKER_KILL_SWITCH"),
        ({"RERANKER_EVENT_WEIGHTS": "click=lots"}, "event_weights"),
    ],
)
def test_invalid_settings_are_rejected_with_the_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_sources([], env)


def test_event_weights_parse() -> None:
    weights = Settings(event_weights="click=1, dislike=-2 ,purchase=3.5").users.parsed_event_weights()
    assert weights == {"click": 1.0, "dislike": -2.0, "purchase": 3.5}


def test_every_setting_is_documented_in_the_settings_page() -> None:
    page = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    for f in flat_fields():
        assert f"RERANKER_{f.name.upper()}" in page, (
            f"docs/settings.md lacks RERANKER_{f.name.upper()} (run scripts/gen_settings_doc.py)"
        )
    rows = [line for line in settings_markdown().splitlines() if line.startswith("| `--")]
    assert len(rows) == len(SECTION_OF)


# --- sections: one per component, flat names kept ----------------------------------------------------
# One setting of every section: (flat name, section, a valid non-default value as the environment spells it, typed).
ONE_PER_SECTION = [
    ("address", "server", "0.0.0.0:6000", "0.0.0.0:6000"),
    ("max_candidates", "limits", "77", 77),
    ("dtype", "model", "int8", "int8"),
    ("session_mix", "users", "0.25", 0.25),
    ("redis_prefix", "redis", "px", "px"),
    ("stream_batch_size", "stream", "9", 9),
    ("kill_switch", "ranking", "true", True),
    ("training_log_sample", "learning", "0.5", 0.5),
    ("log_format", "observability", "json", "json"),
]


def test_every_setting_belongs_to_exactly_one_section() -> None:
    names = [f.name for f in flat_fields()]
    assert len(names) == len(set(names)) == len(SECTION_OF)
    assert not set(names) & set(SECTIONS), "a setting named like a section would make Settings(name=...) ambiguous"
    assert {section for _, section, _, _ in ONE_PER_SECTION} == set(SECTIONS)


@pytest.mark.parametrize(("name", "section", "raw", "value"), ONE_PER_SECTION)
def test_flat_flags_environment_and_keywords_land_in_their_section(name: str, section: str, raw: str,
                                                                   value: object) -> None:
    flag = "--" + name.replace("_", "-")
    from_env = Settings.from_sources([], {"RERANKER_" + name.upper(): raw})
    from_flag = Settings.from_sources([flag] if value is True else [flag, raw], {})
    by_keyword = Settings(**{name: value})
    replaced = dataclasses.replace(Settings(), **{name: value})
    for s in (from_env, from_flag, by_keyword, replaced):
        assert getattr(getattr(s, section), name) == value and s.value(name) == value
        others = {n for n in SECTIONS if n != section}
        assert all(getattr(s, n) == getattr(Settings(), n) for n in others), "only its own section changes"


def test_a_section_given_whole_takes_flat_overrides_on_top() -> None:
    ranking = RankingSettings(blend_weight=0.7, diversity=0.2)
    s = Settings(ranking=ranking, diversity=0.4)
    assert (s.ranking.blend_weight, s.ranking.diversity) == (0.7, 0.4)
    with pytest.raises(TypeError, match="no_such_setting"):
        Settings(no_such_setting=1)


def _violation(f: dataclasses.Field) -> object:  # type: ignore[type-arg]
    """A value outside what `f` declares it takes."""
    meta = f.metadata
    if "choices" in meta:
        return "not-a-choice"
    if meta.get("host_port"):
        return "no-port"
    if "schemes" in meta:
        return "http://elsewhere"
    for bound, step in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
        if bound in meta:
            return type(f.default)(meta[bound] + step)
    raise AssertionError(f"{f.name} declares nothing")


DECLARED = [f for f in flat_fields() if set(f.metadata) - {"doc"}]


@pytest.mark.parametrize("f", DECLARED, ids=[f.name for f in DECLARED])
def test_every_declared_choice_and_range_is_enforced_and_named(f: dataclasses.Field) -> None:  # type: ignore[type-arg]
    with pytest.raises(SettingsError, match=rf"\b{f.name} must be"):
        Settings(**{f.name: _violation(f)})
    with pytest.raises(SettingsError, match=rf"\b{f.name} must be"):
        SECTIONS[SECTION_OF[f.name]](**{f.name: _violation(f)})  # a section checks itself


def test_bounds_themselves_are_accepted_where_the_range_includes_them() -> None:
    s = Settings(blend_weight=0.0, diversity=1.0, redis_wait_replicas=0, treatment_percent=100.0)
    assert (s.ranking.blend_weight, s.ranking.diversity, s.redis.redis_wait_replicas) == (0.0, 1.0, 0)
    with pytest.raises(SettingsError, match="learn_alpha must be in \\(0, 1\\)"):
        Settings(learn_alpha=1.0)


def test_every_problem_of_every_section_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(blend_weight=2.0, max_candidates=0, encoder="remote", tls_key_path="/k.pem")
    problems = caught.value.problems
    assert any("blend_weight" in p for p in problems) and any("max_candidates" in p for p in problems)
    assert any("encoder_url" in p for p in problems) and any("tls_cert_path" in p for p in problems)


def test_the_settings_page_and_help_show_choices_and_ranges() -> None:
    table = settings_markdown()
    for section, kind in SECTIONS.items():
        assert f"## `{section}`" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `--")}
    assert "one of fail_open, reject" in rows["`--overload-policy`"]
    assert "in [0, 1]" in rows["`--blend-weight`"] and "positive" in rows["`--max-candidates`"]
    assert "in (0, 100)" in rows["`--learn-holdout-percent`"]
    help_text = settings_parser().format_help()
    assert "ranking: the fixed blend" in help_text and "Allowed: one of mean, cls, last_token." in help_text
