"""Example caller with the packed form: integer ids and scores as numpy arrays both ways.

Run the sidecar (`make serve`), then:  python examples/packed_caller.py [--address 127.0.0.1:50051]

1. loads a small catalog with UpsertItems under decimal string ids ("101", "102", ...): the packed
   form's integer ids are the same items (101 is "101");
2. records two clicks for a user;
3. reranks the retriever's candidates as two arrays (int64 ids, float32 scores) and gets arrays
   back: positions into the request, final scores, and the ids; no Python object per candidate.
It exits 0 in every case: with the sidecar down it serves the retriever's own order.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reranker.client import RerankerClient  # noqa: E402
from reranker.v1 import reranker_pb2 as pb  # noqa: E402

CATALOG = {
    101: "A romantic comedy set in Paris",
    102: "Space opera: rebels fight a galactic empire",
    103: "Cooking show about French pastry",
    104: "Starship crew explores distant galaxies",
    105: "Documentary about deep sea creatures",
}
HISTORY = [(901, "Galactic war among the stars of deep space"), (902, "Starship crew stranded in distant space")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--timeout-ms", type=float, default=200.0, help="deadline per call, retries included")
    parser.add_argument("--user", default="example-user")
    opts = parser.parse_args()

    with RerankerClient(opts.address, timeout_s=opts.timeout_ms / 1000.0, retries=2) as client:
        setup_timeout = max(1.0, opts.timeout_ms / 1000.0)
        try:  # once per catalog change in a real service, not per page
            client.upsert_items([(str(item_id), text) for item_id, text in CATALOG.items()], timeout_s=setup_timeout)
            client.record_events(
                [
                    pb.Event(event_id=f"{opts.user}-{item_id}", user_id=opts.user, item_id=str(item_id),
                             type=pb.EVENT_TYPE_CLICK, text=text)
                    for item_id, text in HISTORY
                ],
                timeout_s=setup_timeout,
            )
        except grpc.RpcError as exc:  # best effort for the page; log and carry on
            print(f"catalog/events failed: {exc.code().name}")

        # What the retriever produced, best first: two arrays.
        item_ids = np.array([101, 102, 103, 104, 105], dtype=np.int64)
        scores = np.array([0.95, 0.90, 0.85, 0.80, 0.75], dtype=np.float32)
        ranking = client.rerank_packed(
            opts.user, item_ids, scores, top_k=4, with_item_ids=True, request_id=uuid.uuid4().hex[:16]
        )
        print(f"variant={ranking.variant} reranked={ranking.reranked} reason={ranking.reason or '-'}")
        print("positions:", " ".join(map(str, ranking.positions.tolist())))
        print("scores:", " ".join(f"{s:.3f}" for s in ranking.scores.tolist()))
        print("serving:", " ".join(map(str, item_ids[ranking.positions].tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
