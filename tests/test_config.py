from __future__ import annotations

import dataclasses

import pytest

from conftest import REPO
from reranker.config import Settings, settings_markdown


def test_defaults_bind_loopback_and_use_the_packaged_model() -> None:
    s = Settings()
    assert s.address.startswith("127.0.0.1:")
    assert s.encoder == "transformer" and s.model_dir == ""
    assert s.device == "cpu"


def test_flag_beats_environment_beats_default() -> None:
    env = {"RERANKER_MAX_CANDIDATES": "10", "RERANKER_BLEND_WEIGHT": "0.25", "RERANKER_KILL_SWITCH": "true"}
    s = Settings.from_sources(["--max-candidates", "20"], env)
    assert s.max_candidates == 20
    assert s.blend_weight == 0.25
    assert s.kill_switch is True
    assert Settings.from_sources(["--no-kill-switch"], env).kill_switch is False


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
    weights = Settings(event_weights="click=1, dislike=-2 ,purchase=3.5").parsed_event_weights()
    assert weights == {"click": 1.0, "dislike": -2.0, "purchase": 3.5}


def test_every_setting_is_documented_in_the_settings_page() -> None:
    page = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(Settings):
        assert f"RERANKER_{f.name.upper()}" in page, (
            f"docs/settings.md lacks RERANKER_{f.name.upper()} (run scripts/gen_settings_doc.py)"
        )
    assert settings_markdown().count("\n") == len(dataclasses.fields(Settings)) + 1
