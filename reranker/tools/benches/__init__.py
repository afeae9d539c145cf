"""The measurement tools behind `reranker bench <name>`: each module has `main(argv)` with its own flags
(`reranker bench <name> --help`) and prints its numbers; nothing is asserted."""

from __future__ import annotations

# name -> (module under reranker.tools.benches, one line for `reranker bench --help`)
BENCHES: dict[str, tuple[str, str]] = {
    "bursts": ("bursts", "a burst of 10^6 events for one user, then Rerank for it and an ordinary user"),
    "capacity": ("capacity", "memory, Redis memory and CPU, and pods for N users, M items, E events/s, R Reranks/s"),
    "catalog": ("catalog", "a second replica on a shared catalog: time to warm Reranks, RSS it costs"),
    "head": ("head", "per-request cost of the ranking head's features and score against the fixed blend"),
    "learning": ("learning", "learning from live traffic: head swaps under load, training-log CPU"),
    "observability": ("observability", "what metrics and access logging add to a Rerank round trip"),
    "profile-bytes": ("profile_bytes", "bytes per user profile, full and compact layouts, in process and in Redis"),
    "remote-encoder": ("remote_encoder", "encoder=remote against a real embedding server: fidelity, throughput, fail-open"),
    "server-memory": ("server_memory", "resident memory of a real `reranker serve` with the packaged model under traffic"),
    "settings-reload": ("settings_reload", "time from a runtime settings file change to the first answer that follows it"),
    "stream": ("stream", "`reranker consume` throughput and lag under a burst, against a real redis-server"),
    "train-scale": ("train_scale", "`reranker train` on a generated log of 1M events, 100k items, 100k users"),
    "users": ("users", "the user model: event ingestion, the latency an event adds, memory per user, snapshots"),
}
