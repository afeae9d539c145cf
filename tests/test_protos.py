"""The committed generated code matches what scripts/gen_protos.py produces from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import REPO


def _load_generator():  # scripts/ is not a package
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path: Path) -> None:
    written = _load_generator().generate(tmp_path)
    assert written, "no .proto files found"
    for path in written:
        committed = REPO / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run python scripts/gen_protos.py"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run python scripts/gen_protos.py"


def test_service_has_the_documented_rpcs() -> None:
    from reranker.v1 import reranker_pb2 as pb

    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["RerankerService"].methods}
    assert {"Rerank", "RecordEvents", "StreamEvents", "UpsertItems", "GetUserProfile"} <= methods
    assert pb.DESCRIPTOR.package == "reranker.v1"
