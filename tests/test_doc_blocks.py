"""Every code block in README.md and docs/*.md is run by this module, or marked as a fragment on purpose.

The convention: the line right above a code block (fenced, or indented by four spaces) says which:

    <!-- doc-test: NAME -->     run here, by the test that RUNS names (extract and run, as written)
    <!-- fragment: REASON -->   shown, not run, for the reason given (a diagram, needs docker or a
                                cluster, runs for minutes, ...)

Output shown in a block is checked against the run: after a comment line that starts with
`# prints`, each following `# ` line is one line the run prints (trailing spaces ignored; `...`
inside a line stands for any text).

A run changes only where things are: `127.0.0.1:50051` becomes the test server's address,
`.venv/bin/python` this interpreter, `.venv/bin/reranker` `python -m reranker`, and the
downloaded `ml-100k` directory `../shared/data/ml-100k`. The server runs the real packaged MiniLM
(the order a block prints is the model's); the eval block runs with RERANKER_ENCODER=fake (the
commands as written, minutes shorter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import REPO, SHARED_DATA, ServerFactory, candidate, event, fake_settings, wait_ready
from reranker.config import Settings
from reranker.serving.server import RunningServer, build_server
from reranker.service import RerankService
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"^\s*<!-- (doc-test|fragment): (.+?) -->\s*$")
FENCE = re.compile(r"^(\s*)(```|~~~)(.*)$")


@dataclasses.dataclass
class Block:
    page: str
    line: int  # 1-based, the block's first line
    kind: str  # "doc-test", "fragment" or "" (unmarked)
    value: str  # the test name or the fragment's reason
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """Fenced blocks (at any indentation, e.g. in a list item) and top-level indented blocks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0

    def marker(before: int) -> tuple[str, str]:
        j = before - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        m = MARKER.match(lines[j]) if j >= 0 else None
        return (m.group(1), m.group(2).strip()) if m else ("", "")

    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence:
            indent, mark = fence.group(1), fence.group(2)
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(mark):
                end += 1
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]]
            out.append(Block(path.name, i + 1, *marker(i), "\n".join(body) + "\n"))
            i = end + 1
            continue
        after_break = i == 0 or not lines[i - 1].strip() or bool(MARKER.match(lines[i - 1]))
        if lines[i].startswith("    ") and lines[i].strip() and after_break:
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            out.append(Block(path.name, i + 1, *marker(i), textwrap.dedent("\n".join(lines[i:end])).strip() + "\n"))
            i = end
            continue
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks_of(page)]


def by_name(name: str) -> Block:
    found = [b for b in all_blocks() if b.kind == "doc-test" and b.value == name]
    assert len(found) == 1, f"doc-test {name!r}: {len(found)} blocks"
    return found[0]


def expected_output(code: str) -> list[str] | None:
    """The `# ` lines after a `# prints` line; None when the block shows no output."""
    lines = code.splitlines()
    for k, line in enumerate(lines):
        if line.startswith("# prints"):
            return [x[2:] for x in lines[k + 1 :] if x.startswith("# ")]
    return None


def assert_prints(code: str, printed: str) -> None:
    expected = expected_output(code)
    assert expected is not None, "the block shows no output"
    actual = [line.rstrip() for line in printed.strip().splitlines()]
    assert len(actual) == len(expected), f"printed:\n{printed}\nshown:\n" + "\n".join(expected)
    for want, got in zip(expected, actual):
        pattern = ".*".join(re.escape(part) for part in want.rstrip().split("..."))
        assert re.fullmatch(pattern, got), f"shown {want!r}, printed {got!r}"


def localized(code: str, address: str) -> str:
    return (
        code.replace("127.0.0.1:50051", address)
        .replace(".venv/bin/python", sys.executable)
        .replace(".venv/bin/reranker", f"{sys.executable} -m reranker")
        .replace("--input ml-100k", f"--input {SHARED_DATA / 'ml-100k'}")
    )


def run_python(code: str, address: str, namespace: dict[str, Any]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(localized(code, address), "<doc block>", "exec"), namespace)  # noqa: S102
    return out.getvalue()


def run_shell(code: str, address: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", localized(code, address)], cwd=cwd, env=environment,
        capture_output=True, text=True, timeout=600,
    )


# --- the convention holds ----------------------------------------------------------------------------------
RUNS = {
    "readme-quickstart", "readme-client", "api-client", "api-packed", "api-caller", "ranking-quality-eval",
    "operations-access-log",
}


def test_every_block_is_run_here_or_marked_as_a_fragment() -> None:
    blocks = all_blocks()
    unmarked = [str(b) for b in blocks if not b.kind]
    assert not unmarked, "code blocks without <!-- doc-test: NAME --> or <!-- fragment: REASON -->: " + ", ".join(unmarked)
    names = [b.value for b in blocks if b.kind == "doc-test"]
    assert sorted(names) == sorted(RUNS), "doc-test names and the runs in this module differ"
    executed, fragments = len(names), sum(b.kind == "fragment" for b in blocks)
    print(f"\ncode blocks in README.md and docs/*.md: {executed} executed, {fragments} marked as fragments")
    assert executed + fragments == len(blocks)


def test_the_reader_finds_fenced_indented_and_list_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- fragment: a diagram -->\n```\nA -> B\n```\n\n- item\n\n  <!-- doc-test: x -->\n  ```python\n"
        "  print(1)\n  # prints:\n  # 1\n  ```\n\nmore text\n\n    indented = True\n\n<!-- fragment: b -->\n    marked = True\nend\n",
        encoding="utf-8",
    )
    found = blocks_of(page)
    assert [(b.line, b.kind, b.value) for b in found] == [(4, "fragment", "a diagram"), (11, "doc-test", "x"), (19, "", ""), (22, "fragment", "b")]
    assert found[1].code == "print(1)\n# prints:\n# 1\n" and expected_output(found[1].code) == ["1"]
    assert_prints("# prints:\n# a ... c", "a b c\n")
    with pytest.raises(AssertionError):
        assert_prints("# prints:\n# a ... c", "a b d\n")


# --- the runs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_server() -> Iterator[str]:
    """A server with the real packaged MiniLM, as `make serve` starts it (its address)."""
    settings = dataclasses.replace(Settings(), address="127.0.0.1:0", metrics_address="", max_workers=4)
    running: RunningServer = build_server(settings, RerankService(settings))
    try:
        wait_ready(running, timeout=300)
        address = f"127.0.0.1:{running.port}"
        with grpc.insecure_channel(address) as channel:  # u1 of the quickstart, for the blocks that use it
            pb_grpc.RerankerServiceStub(channel).RecordEvents(pb.RecordEventsRequest(events=[pb.Event(
                event_id="u1-50", user_id="u1", item_id="50", type=pb.EVENT_TYPE_LIKE,
                text="Star Wars. Genres: Action Adventure Sci-Fi War.",
            )]), timeout=120)
        yield address
    finally:
        running.stop(0)


def test_readme_quickstart_and_client(real_server: str) -> None:
    namespace: dict[str, Any] = {}
    quickstart = by_name("readme-quickstart").code
    assert_prints(quickstart, run_python(quickstart, real_server, namespace))
    assert_prints(quickstart, run_python(quickstart, real_server, namespace))  # a second run: the same
    client = by_name("readme-client").code
    try:
        assert_prints(client, run_python(client, real_server, namespace))
    finally:
        namespace["client"].close()


def test_api_client_and_packed(real_server: str) -> None:
    namespace: dict[str, Any] = {}
    client, packed = by_name("api-client").code, by_name("api-packed").code
    try:
        assert_prints(client, run_python(client, real_server, namespace))
        assert_prints(packed, run_python(packed, real_server, namespace))
    finally:
        namespace["client"].close()


def test_api_caller_example(real_server: str, tmp_path: Path) -> None:
    """As the page says, a first run on a busy machine may serve its own order: up to three runs."""
    code = by_name("api-caller").code
    for _ in range(3):
        run = run_shell(code, real_server, REPO)
        assert run.returncode == 0, run.stderr
        if "variant=reranked" in run.stdout:
            break
    assert_prints(code, run.stdout)


def test_ranking_quality_eval_from_a_download(tmp_path: Path) -> None:
    if not (SHARED_DATA / "ml-100k").is_dir():
        pytest.skip(f"shared data set missing: {SHARED_DATA / 'ml-100k'}")
    run = run_shell(by_name("ranking-quality-eval").code, "", tmp_path, RERANKER_ENCODER="fake")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "ml" / "items.tsv").is_file() and (tmp_path / "ml" / "events.tsv").is_file()
    assert "ndcg@10" in run.stdout.lower(), run.stdout[-3000:]


def test_operations_access_log_record(make_server: ServerFactory, access_lines: io.StringIO) -> None:
    """The record shown has the fields (and the kind of values) that a real Rerank logs."""
    shown = json.loads(by_name("operations-access-log").code.replace("\n", ""))
    _, stub = make_server(fake_settings(access_log_sample=1.0))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u1", "h1", "a liked item")]), timeout=10)
    stub.Rerank(pb.RerankRequest(user_id="u1", candidates=[
        candidate("c1", 0.9, "first candidate"), candidate("c2", 0.8, "second candidate"),
    ]), timeout=10)
    logged = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    real = next(r for r in logged if r.get("method") == "Rerank")
    assert set(real) == set(shown)
    for key in ("level", "logger", "method", "code", "candidates", "variant", "returned", "cold_user", "encoded", "cache_hits"):
        assert real[key] == shown[key], key
    assert re.fullmatch(r"Rerank OK [0-9.]+ ms reranked", real["message"]) and real["message"][:9] == shown["message"][:9]
