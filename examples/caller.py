"""Example caller: what a candidate-generation service does around the sidecar.

Run the sidecar (`make serve`), then:  python examples/caller.py [--address 127.0.0.1:50051]

1. records a few interaction events for a user (idempotent: each has an event_id);
2. asks for a reranking of its candidates with a tight deadline, through the fail-open helper;
3. serves whatever comes back: the personalized order, or its own order when the sidecar is
   slow, down, or falling back, and says why.
It exits 0 in every case: the page is served either way. Works with the sidecar down, too.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reranker.client import RerankerClient  # noqa: E402
from reranker.v1 import reranker_pb2 as pb  # noqa: E402

CANDIDATES = [  # (item id, upstream score, text): what the retriever produced, best first
    ("m1", 0.95, "A romantic comedy set in Paris"),
    ("m2", 0.90, "Space opera: rebels fight a galactic empire"),
    ("m3", 0.85, "Cooking show about French pastry"),
    ("m4", 0.80, "Starship crew explores distant galaxies"),
    ("m5", 0.75, "Documentary about deep sea creatures"),
]
HISTORY = [("h1", "Galactic war among the stars of deep space"), ("h2", "Starship crew stranded in distant space")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--timeout-ms", type=float, default=200.0, help="deadline per call, retries included")
    parser.add_argument("--user", default="example-user")
    opts = parser.parse_args()

    with RerankerClient(opts.address, timeout_s=opts.timeout_ms / 1000.0, retries=2) as client:
        events = [
            pb.Event(event_id=f"{opts.user}-{item_id}", user_id=opts.user, item_id=item_id,
                     type=pb.EVENT_TYPE_CLICK, text=text)
            for item_id, text in HISTORY
        ]
        try:
            recorded = client.record_events(events, timeout_s=max(1.0, opts.timeout_ms / 1000.0))
            print(f"recorded events: accepted={recorded.accepted} duplicates={recorded.duplicates}")
        except grpc.RpcError as exc:  # events are best effort for the page; log and carry on
            print(f"recording events failed: {exc.code().name}")

        outcome = client.rerank_or_upstream(opts.user, CANDIDATES, top_k=4, request_id=uuid.uuid4().hex[:16])
        print(f"variant={outcome.variant} reranked={outcome.reranked} reason={outcome.reason or '-'} "
              f"attempts={outcome.attempts} latency_ms={outcome.latency_ms:.1f}")
        print("serving:", " ".join(outcome.item_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
