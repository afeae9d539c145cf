"""Time from a runtime settings file change to the first Rerank answered with the new setting.

Starts `reranker serve` (fake encoder) with --runtime-settings-file, then flips the kill switch in
the file N times (atomic rename, as the kubelet updates a ConfigMap volume) and, after each flip,
calls Rerank in a loop until the answer's variant follows (BYPASSED / RERANKED). Prints the median
and the max over the flips, with the poll interval. The kubelet's own delay in updating a mounted
ConfigMap (up to its sync period plus cache TTL) comes on top and is not measured here.

    reranker bench settings-reload --flips 20 --poll-seconds 1.0
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from reranker.tools.harness import ServerProcess, child_env
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc


def publish(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reranker bench settings-reload", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", type=int, default=20)
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="--runtime-settings-poll-seconds of the server")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "runtime.yaml"
        publish(path, "kill_switch: false\n")
        with ServerProcess(
            ["--encoder", "fake", "--fake-dim", "32", "--metrics-address", "", "--grace-seconds", "1",
             "--runtime-settings-file", str(path), "--runtime-settings-poll-seconds", str(args.poll_seconds)],
            env=child_env(),
        ) as server:
            try:
                server.wait_serving(120.0)
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
            channel = grpc.insecure_channel(server.target)
            try:
                stub = pb_grpc.RerankerServiceStub(channel)
                request = pb.RerankRequest(user_id="u", candidates=[pb.Candidate(item_id="a", score=1.0, text="a text"),
                                                                    pb.Candidate(item_id="b", score=0.5, text="b text")])
                stub.Rerank(request, timeout=10)
                seconds, calls = [], []
                for flip in range(args.flips):
                    on = flip % 2 == 0
                    want = pb.VARIANT_BYPASSED if on else pb.VARIANT_RERANKED
                    time.sleep(random.uniform(0, args.poll_seconds))  # flips land anywhere in the poll cycle
                    published = time.perf_counter()
                    publish(path, f"version: flip-{flip}\nkill_switch: {'true' if on else 'false'}\n")
                    n = 0
                    while True:
                        n += 1
                        if stub.Rerank(request, timeout=10).variant == want:
                            break
                    seconds.append(time.perf_counter() - published)
                    calls.append(n)
                print(f"runtime settings reload, {args.flips} kill-switch flips, poll interval {args.poll_seconds:g} s: "
                      f"file change -> first answer with the new variant: median {statistics.median(seconds) * 1000:.0f} ms, "
                      f"max {max(seconds) * 1000:.0f} ms, min {min(seconds) * 1000:.0f} ms "
                      f"(Rerank calls per flip: median {statistics.median(calls):.0f})")
            finally:
                channel.close()
                server.terminate()
                server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
