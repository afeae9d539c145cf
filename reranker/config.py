"""Typed settings, read once in `main` and passed in: one frozen section per component.

`Settings` holds the sections (`settings.server`, `settings.model`, `settings.users`, ...); each
component receives its own section, never the whole object. A setting's name is the same in its
section as in its flag and its environment variable: `ranking.blend_weight` is `--blend-weight`
and `RERANKER_BLEND_WEIGHT`. Precedence: flag > environment > default. `Settings(blend_weight=0.2)`
and `dataclasses.replace(settings, blend_weight=0.2)` take those flat names too.

Each field declares its allowed values next to its doc string (`choices=`, a range `gt= ge= lt=
le=`, `host_port=`, `schemes=`); validation is generated from those declarations, plus a few
checks that relate fields of one section. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "RERANKER_"

# Arm names the server uses itself (the response's `arm`, the online metrics' `arm` label).
RESERVED_ARMS = ("control", "treatment", "bypassed")
ARM_NAME = re.compile(r"[A-Za-z0-9_-]+")  # ASCII only: str.isalnum() would also take other scripts' letters and digits
# URL schemes of redis_url / stream_url: one Redis, or a Redis Cluster (any node; the client finds the rest).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
CONSUMED_POLICIES = ("keep", "demote", "drop", "learned")
PROFILE_LAYOUTS = ("full", "compact")
DEFAULT_EVENT_WEIGHTS = "view=0.5,click=1,add_to_cart=2,purchase=3,like=2,dislike=-1.5,skip=-0.5"
POOLINGS = ("mean", "cls", "last_token")  # ModelSettings.pooling
ENCODERS = ("transformer", "fake", "remote")  # ModelSettings.encoder
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


class SettingsError(ValueError):
    """Settings that cannot be used; `problems` names each field that is wrong and why."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid settings: " + "; ".join(self.problems))


def _doc(text: str, default: Any, **allowed: Any) -> Any:
    """A field with its doc string and, in `allowed`, what values it takes: `choices=(...)`, bounds
    `gt= ge= lt= le=`, `host_port=True` (host:port or empty), `schemes=(...)` (a URL or empty)."""
    return field(default=default, metadata={"doc": text, **allowed})


def allowed_text(f: dataclasses.Field[Any]) -> str:
    """What `f` accepts, in words for the settings page and error messages ('' = anything of its type)."""
    meta = f.metadata
    if "choices" in meta:
        return "one of " + ", ".join(meta["choices"])
    if meta.get("host_port"):
        return "host:port (or empty for off)"
    if "schemes" in meta:
        return "a URL starting with " + ", ".join(meta["schemes"][:-1]) + " or " + meta["schemes"][-1]
    return _range_text(meta)


def _range_text(meta: Mapping[str, Any]) -> str:
    """`[0, 1]`-style interval text of the bounds gt / ge / lt / le; 'positive' for gt=0 alone."""
    low = f"({meta['gt']:g}" if "gt" in meta else f"[{meta['ge']:g}" if "ge" in meta else ""
    high = f"{meta['lt']:g})" if "lt" in meta else f"{meta['le']:g}]" if "le" in meta else ""
    if low and high:
        return f"in {low}, {high}"
    if high:
        return ("< " if high.endswith(")") else "<= ") + high[:-1]
    if meta.get("gt") == 0:
        return "positive"
    return ("> " if low.startswith("(") else ">= ") + low[1:] if low else ""


def _allows(f: dataclasses.Field[Any], value: Any) -> bool:
    meta = f.metadata
    if "choices" in meta:
        return value in meta["choices"]
    if meta.get("host_port"):
        return not value or value.rpartition(":")[2].isdigit()
    if "schemes" in meta:
        return not value or value.startswith(meta["schemes"])
    bounds = [(op, meta[op]) for op in _BOUNDS if op in meta]
    return all(_within(value, op, bound) for op, bound in bounds)


def _within(value: float, op: str, bound: float) -> bool:
    return {"gt": value > bound, "ge": value >= bound, "lt": value < bound, "le": value <= bound}[op]


class _Section:
    """Shared by the sections: validation from the field declarations, then the section's own checks."""

    def __post_init__(self) -> None:
        problems = [f"{f.name} must be {allowed_text(f)}"
                    for f in dataclasses.fields(self)  # type: ignore[arg-type]
                    if not _allows(f, getattr(self, f.name))]
        for check in self._checks():
            problems.extend(check(self))
        if problems:
            raise SettingsError(problems)

    @classmethod
    def _checks(cls) -> Sequence[Callable[[Any], list[str]]]:
        return ()


@dataclass(frozen=True)
class ServerSettings(_Section):
    """server: the gRPC transport, TLS, listeners, shutdown, and the runtime settings file."""

    address: str = _doc("host:port to bind; loopback by default because this is a sidecar.", "127.0.0.1:50051")
    max_workers: int = _doc(
        "Threads for RPC work that waits (encoding, writes, Redis reads); a warm in-process Rerank needs none.", 16, gt=0,
    )
    max_message_bytes: int = _doc("Largest request/response message accepted, in bytes.", 16 * 1024 * 1024, gt=0)
    max_concurrent_rpcs: int = _doc("RPCs admitted at once (running + waiting); more get RESOURCE_EXHAUSTED. 0 = no limit.", 256, ge=0)
    grace_seconds: float = _doc("On SIGTERM: health goes NOT_SERVING, in-flight RPCs get this long to finish.", 10.0)
    drain_delay_seconds: float = _doc("On SIGTERM: health is NOT_SERVING but RPCs are still accepted this long, then the grace period.", 0.0, ge=0)
    health_address: str = _doc(
        "host:port of an extra gRPC listener serving only grpc.health.v1 (kubelet probes reach it while "
        "`address` stays on loopback); empty = off.",
        "", host_port=True,
    )
    tls_cert_path: str = _doc("PEM server certificate (chain); with tls_key_path turns TLS on. Empty = plaintext.", "")
    tls_key_path: str = _doc("PEM private key for tls_cert_path.", "")
    tls_client_ca_path: str = _doc("PEM CA bundle; when set, clients must present a certificate it signed (mTLS).", "")
    on_load_failure: str = _doc(
        "Model fails to load at start: `fail_open` (keep running NOT_SERVING, Rerank returns upstream order, "
        "FALLBACK_REASON_NOT_READY) or `exit` (log the error, exit with status 3).",
        "fail_open", choices=("fail_open", "exit"),
    )
    runtime_settings_file: str = _doc(
        "A JSON or YAML file (e.g. a mounted ConfigMap) whose settings override these while the server runs: "
        "kill_switch, treatment_percent, experiment_arms, blend_weight, diversity, consumed_policy, "
        "access_log_sample, training_log_sample (and an optional `version` label). Checked every "
        "runtime_settings_poll_seconds and applied without a restart; a bad file keeps the settings in force "
        "(logged, counted). A key left out takes its flag/environment value. Empty = off. See docs/operations.md.",
        "",
    )
    runtime_settings_poll_seconds: float = _doc("How often runtime_settings_file is read for a change.", 1.0, gt=0)

    @classmethod
    def _checks(cls) -> Sequence[Callable[[Any], list[str]]]:
        return (_tls_problems,)


@dataclass(frozen=True)
class LimitsSettings(_Section):
    """limits: what one request may carry, its deadline budget, and what happens under overload."""

    max_candidates: int = _doc("Most candidates in one Rerank request.", 2000, gt=0)
    max_text_chars: int = _doc("Longest item text accepted, in characters.", 4000, gt=0)
    max_id_chars: int = _doc("Longest user or item id accepted, in characters.", 256, gt=0)
    max_events_per_request: int = _doc("Most events in one RecordEvents / Rerank context / UpsertItems batch.", 1000, gt=0)
    min_budget_ms: float = _doc("Fail open (upstream order) when less than this remains of the caller's deadline.", 5.0)
    encode_timeout_ms: float = _doc("Longest a Rerank waits for encoding before failing open.", 1000.0)
    overload_policy: str = _doc(
        "When the encoder queue is full: `fail_open` (Rerank answers with the upstream order, "
        "FALLBACK_REASON_OVERLOADED) or `reject` (Rerank fails with RESOURCE_EXHAUSTED). "
        "Writes (UpsertItems, RecordEvents) always get RESOURCE_EXHAUSTED.",
        "fail_open", choices=("fail_open", "reject"),
    )


@dataclass(frozen=True)
class ModelSettings(_Section):
    """model: the encoder (transformer, ONNX, remote or fake), its micro-batcher, item cache and catalog."""

    encoder: str = _doc(
        "`transformer` (real model), `fake` (deterministic hashing encoder, for tests), or `remote` (an "
        "embedding server speaking the OpenAI-compatible /v1/embeddings API: TEI, vLLM, Infinity, Ollama; "
        "see encoder_url).",
        "transformer", choices=ENCODERS,
    )
    model_dir: str = _doc("Local Hugging Face model directory; empty = the packaged all-MiniLM-L6-v2.", "")
    runtime: str = _doc(
        "`torch`, or `onnx`: ONNX Runtime on CPU (needs the `onnx` extra); the model is exported once "
        "into onnx_cache_dir. Measured on 2 cores: float32 gives the same vectors at ~2.5x torch's speed; "
        "dtype=int8 quantizes every layer per channel (cosine ~0.99 to float32, ~5x torch float32); "
        "int8_layers applies to torch only.",
        "torch", choices=("torch", "onnx"),
    )
    device: str = _doc("`cpu`, `cuda`, or `auto` (cuda when available).", "cpu", choices=("cpu", "cuda", "auto"))
    dtype: str = _doc("`float32`, `float16` (CUDA), `bfloat16` (CUDA, or CPUs with AVX512-BF16/AMX), or `int8` (dynamic quantization, CPU).", "float32", choices=("float32", "float16", "bfloat16", "int8"))
    int8_layers: str = _doc(
        "With dtype=int8, which Linear layers are quantized: `attention` (cosine >= 0.98 to float32), "
        "`attention+intermediate`, or `all` (fastest, lowest fidelity).",
        "attention", choices=("attention", "attention+intermediate", "all"),
    )
    pooling: str = _doc(
        "How token vectors become one text vector: `mean` (attention-masked mean: sentence-transformers "
        "models such as the packaged MiniLM), `cls` (the first token: BERT-style [CLS] models such as BGE), "
        "or `last_token` (the last real token, batches padded on the left: decoder-LLM embedding models "
        "such as Qwen3-Embedding, gte-Qwen2, e5-mistral). runtime=onnx supports mean only.",
        "mean", choices=POOLINGS,
    )
    item_instruction: str = _doc(
        "Text put before every item text before it is encoded (instruction-tuned embedding models); "
        "part of the encoder version, so vectors and heads made with another instruction are not mixed in.",
        "",
    )
    max_seq_length: int = _doc("Token limit per text; longer texts are truncated by the tokenizer.", 128, gt=0)
    encode_batch_size: int = _doc("Largest batch the encoder runs at once.", 32, gt=0)
    encode_max_wait_ms: float = _doc("How long the micro-batcher waits to fill a batch.", 2.0)
    encode_queue_size: int = _doc("Texts waiting for the encoder before new work is refused (overload).", 2048, gt=0)
    encode_late_fill: bool = _doc(
        "Texts whose caller stopped waiting (deadline passed, RPC cancelled), and the new texts of a deadline "
        "fallback, stay queued as late work: encoded only while no caller waits for the encoder, dropped first "
        "when callers need the queue, their vectors kept in the item cache. false drops that work at once.", True
    )
    torch_threads: int = _doc("torch intra-op threads; 0 = the CPUs this process may use (affinity, cgroup quota).", 0)
    torch_interop_threads: int = _doc("torch inter-op threads; 0 = torch default. 1 suits a 2-core sidecar.", 1, ge=0)
    onnx_cache_dir: str = _doc(
        "Where runtime=onnx keeps exported models (keyed by model content and dtype); empty = "
        "$XDG_CACHE_HOME/reranker/onnx or ~/.cache/reranker/onnx. Bake it into the image to skip the export.",
        "",
    )
    fake_dim: int = _doc("Vector size of the fake encoder.", 384, gt=0)
    warmup: bool = _doc("Encode a few texts before reporting SERVING.", True)
    encoder_url: str = _doc(
        "encoder=remote: base URL of the embedding server, e.g. http://embeddings:8080 (`/v1/embeddings` is "
        "appended, or `/embeddings` to a URL ending in /v1; a URL ending in /embeddings is used as it is).",
        "",
    )
    encoder_model: str = _doc(
        "encoder=remote: the model name sent with every request (the server's model id); with the vector "
        "size the server returns, it makes the encoder version.",
        "",
    )
    encoder_api_key_file: str = _doc(
        "encoder=remote: file holding an API key, sent as `Authorization: Bearer <key>` (read at start; "
        "surrounding whitespace ignored); empty = no key.",
        "",
    )
    encoder_request_timeout_ms: float = _doc(
        "encoder=remote: longest one batch request may take (connect, send, answer); slower counts as the "
        "server being down. A Rerank still waits no longer than encode_timeout_ms.",
        2000.0, gt=0,
    )
    encoder_retry_seconds: float = _doc(
        "encoder=remote: after the server could not be reached (refused, timed out, 5xx), batches fail at "
        "once (Rerank fails open, ENCODER_ERROR) for this long before the next try; 0 = try every batch.",
        1.0, ge=0,
    )
    encoder_wait_seconds: float = _doc(
        "encoder=remote: at start, how long to wait for the server to answer the first request (which "
        "gives the vector size); the sidecar stays NOT_SERVING meanwhile. 0 = as long as it takes.",
        0.0, ge=0,
    )
    item_cache_size: int = _doc("Item vectors kept (LRU).", 100_000, gt=0)
    catalog_path: str = _doc(
        "Shared item-vector catalog (`reranker embed-catalog`) mapped read-only at start and consulted where the item "
        "cache misses: a new replica is warm without encoding; empty = off.", ""
    )
    catalog_poll_seconds: float = _doc("How often to check catalog_path for a new file (atomic rename), swapped in "
                                       "without blocking requests; 0 = never.", 10.0, ge=0)

    @classmethod
    def _checks(cls) -> Sequence[Callable[[Any], list[str]]]:
        return (_remote_encoder_problems, _onnx_problems)


@dataclass(frozen=True)
class UserModelSettings(_Section):
    """users: the user model, profile stores, event weights and limits, and snapshots."""

    user_cache_size: int = _doc(
        "User profiles kept (LRU within TTL); ~2.6 KB each at vector_history_size=20, so 10k users ~ 26 MB.",
        10_000, gt=0,
    )
    user_ttl_seconds: float = _doc("A profile not touched for this long is dropped.", 7 * 24 * 3600.0, gt=0)
    profile_layout: str = _doc(
        "Kept for old configurations only: profiles are always compact (one byte string per user, item ids "
        "instead of vectors, looked up in the item cache or catalog when read; ~2.6 KB per user at 20 events). "
        "`full` is accepted, logs a deprecation warning and is ignored; full-layout snapshots and Redis keys are "
        "converted as they are read. See docs/user-model.md.",
        "compact", choices=PROFILE_LAYOUTS,
    )
    user_state_cache_size: int = _doc(
        "Users whose scoring state (stacked history vectors, user vector, attention weights) is kept ready "
        "between requests, LRU, dropped on the user's next event; ~38 KB each at vector_history_size=20, "
        "plus up to ~50 KB of leave-one-out rows for a user whose requests carry consumed items. "
        "0 = rebuild it on every request.",
        1024, ge=0,
    )
    recent_events_per_user: int = _doc("Recent events kept per user (explanations, GetUserProfile).", 50, gt=0)
    half_life_seconds: float = _doc("Event weight halves every this many seconds of event time.", 7 * 24 * 3600.0, gt=0)
    event_weights: str = _doc("Weight per event type, `type=weight,...`; negative = negative feedback.", DEFAULT_EVENT_WEIGHTS)
    session_half_life_seconds: float = _doc(
        "Half-life of the session (short-term) vector S, in event time: S is decayed like L, only faster, so after "
        "a pause of a few half-lives the next event makes a new session (300 s: best of 300-86400 s on validation).",
        300.0, gt=0,
    )
    session_mix: float = _doc(
        "Share m of the session in the user vector u = normalize((1-m) L/‖L‖ + m S/‖S‖), in [0, 1]; 0 = long-term only.",
        0.5, ge=0, le=1,
    )
    vector_history_size: int = _doc(
        "Newest events per user whose item vectors are kept (session vector, attention, explanations); 4*dim bytes each.",
        20, gt=0,
    )
    attention_weight: float = _doc(
        "Share of candidate-aware attention pooling over the history in the semantic score, in [0, 1]; 0 = off.", 0.5, ge=0, le=1,
    )
    attention_temperature: float = _doc(
        "Softmax temperature of attention pooling; lower = the history item most like the candidate dominates.", 0.1, gt=0,
    )
    max_event_skew_seconds: float = _doc(
        "Event times after server time are clamped to now (counted in reranker_event_times_clamped_total); more than this "
        "many seconds after it (a wrong clock, milliseconds sent as seconds) the request gets INVALID_ARGUMENT.",
        3600.0, ge=0,
    )
    max_event_weight: float = _doc(
        "Largest absolute weight an event may carry (INVALID_ARGUMENT beyond it); 0 = twice the largest absolute "
        "event_weights value (or 1, the weight of an unlisted type): 6 with the default weights.",
        0.0, ge=0,
    )
    max_event_ids_per_user: int = _doc(
        "Event ids remembered per user for de-duplication (8 bytes each); older ids may count again.", 1000, gt=0,
    )
    consumed_items_per_user: int = _doc(
        "Distinct consumed items remembered per user (20 bytes each; the least recently consumed are forgotten "
        "first); they feed consumed_policy and the head's re-consumption features.",
        500, ge=0,
    )
    snapshot_path: str = _doc("File to snapshot item vectors and in-process profiles to (loaded at start); empty = off.", "")
    snapshot_interval_seconds: float = _doc("Seconds between periodic snapshots; 0 = only at shutdown.", 300.0, ge=0)

    @classmethod
    def _checks(cls) -> Sequence[Callable[[Any], list[str]]]:
        return (_event_weight_problems,)

    def parsed_event_weights(self) -> dict[str, float]:
        """`event_weights` as a dict keyed by lower-case event type name (view, click, ...)."""
        weights: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in self.event_weights.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"event_weights entry {part!r} is not type=weight")
            try:
                weights[name.strip().lower()] = float(value)
            except ValueError:
                raise ValueError(f"event_weights entry {part!r} has a non-numeric weight") from None
        return weights

    def event_weight_limit(self) -> float:
        """W: the largest |weight| an event may carry (`max_event_weight`, or twice the largest type weight)."""
        if self.max_event_weight:
            return self.max_event_weight
        return 2.0 * max([1.0, *(abs(w) for w in self.parsed_event_weights().values())])


@dataclass(frozen=True)
class RedisSettings(_Section):
    """redis: the Redis (or Redis Cluster) profile store shared by replicas."""

    redis_url: str = _doc(
        "redis://host:port/db to share user profiles between replicas (redis+cluster://host:port for a Redis "
        "Cluster, any node); empty = in-process store.", "", schemes=REDIS_SCHEMES,
    )
    redis_prefix: str = _doc("Prefix of the Redis keys; use one prefix per encoder model (vectors differ).", "reranker")
    redis_timeout_ms: float = _doc("Redis connect timeout, and read timeout on the Rerank path; slower counts as down.", 50.0, gt=0)
    redis_write_timeout_ms: float = _doc("Redis timeout for writing a batch of events (slower than a read).", 2000.0, gt=0)
    redis_retry_seconds: float = _doc("After a Redis error, serve from the in-process fallback this long before retrying.", 5.0, ge=0)
    redis_wait_replicas: int = _doc(
        "Replicas that must acknowledge each event write (Redis WAIT, within redis_write_timeout_ms) before it counts "
        "as written; fewer puts the batch in the replay buffer. 0 = no wait: a master that dies may lose its last writes.",
        0, ge=0,
    )
    redis_replay_events: int = _doc("Events recorded while Redis is down, kept to replay into it when it is back.", 10_000, gt=0)


@dataclass(frozen=True)
class StreamSettings(_Section):
    """stream: the event stream consumer (`reranker consume`)."""

    stream_url: str = _doc("Redis (redis://) or Redis Cluster (redis+cluster://) holding the event stream that "
                           "`reranker consume` reads; empty = redis_url.", "", schemes=REDIS_SCHEMES)
    stream_key: str = _doc("Redis Stream of events (fields user_id, item_id, type, timestamp, event_id, text, weight).",
                           "reranker:events")
    stream_group: str = _doc("Consumer group: each event goes to one consumer of the group (at least once).", "reranker")
    stream_consumer: str = _doc("This consumer's name in the group (keep it stable across restarts: its unacknowledged "
                                "events are re-read at start); empty = host name.", "")
    stream_batch_size: int = _doc("Events read (XREADGROUP COUNT) and written to profiles per batch.", 256, gt=0)
    stream_block_ms: int = _doc("How long one read waits for new events.", 1000, gt=0)
    stream_claim_idle_ms: int = _doc("Take over events another consumer read but has not acknowledged for this long "
                                     "(XAUTOCLAIM; a consumer that died); 0 = never.", 60_000, ge=0)
    stream_dead_letter_key: str = _doc("Stream that unusable events (refused fields, a user whose write fails) are "
                                       "copied to, whole, with the reason, before they are acknowledged; empty = drop "
                                       "them (counted).", "reranker:events:dead")
    stream_backoff_max_ms: int = _doc("Longest wait between retries of a batch the encoder refused (overloaded) or the "
                                      "profile store could not write durably; the batch is retried, unacknowledged, "
                                      "until it goes through.", 2000, gt=0)


@dataclass(frozen=True)
class RankingSettings(_Section):
    """ranking: the fixed blend, the ranking head and its reloads, diversity, consumed items, experiment arms."""

    blend_weight: float = _doc(
        "Default weight of the semantic score in [0, 1] (request may override). 0.3 was chosen on the ml-100k "
        "validation split as the weight whose worst ratio over ten upstreams (five retrievers incl. SASRec, with "
        "and without consumed items) was best (experiments/zero_shot_defaults.py).",
        0.3, ge=0, le=1,
    )
    blend_upstream: str = _doc(
        "What the fixed blend reads of the upstream: `score` (its scores, min-max scaled per request) or `rank` "
        "(its order only, 1/log2(2 + rank), min-max scaled): rank ignores how the upstream's scores are spread.",
        "score", choices=("score", "rank"),
    )
    diversity: float = _doc("Default MMR diversity strength in [0, 1]; 0 = off (request may override).", 0.0, ge=0, le=1)
    mmr_window: int = _doc("MMR reorders at most this many top positions; the rest follow by score.", 50, gt=0)
    consumed_policy: str = _doc(
        "Candidates the user already consumed (request may override): `keep` (scored like the others), "
        "`demote` (after all unconsumed ones, in their order), `drop` (removed; the response counts them), or "
        "`learned`: a loaded head decides from its re-consumption features; without a head, the user's "
        "repeat rate decides (demote below consumed_repeat_rate, else keep; see consumed_prior_events). Similarity never credits a "
        "candidate for matching its own past events, whatever the policy.",
        "learned", choices=CONSUMED_POLICIES,
    )
    consumed_repeat_rate: float = _doc(
        "consumed_policy=learned without a head: users whose share of events on an already consumed item is "
        "below this get consumed candidates demoted; users at or above it keep them.",
        0.05, ge=0, le=1,
    )
    consumed_prior_events: float = _doc(
        "consumed_policy=learned without a head: a user's repeat rate is estimated as (their repeats + n * the "
        "population's rate) / (their events + n), n = this; so a new user starts from what everyone does.",
        10.0, ge=0,
    )
    head_path: str = _doc(
        "Ranking head artefact from `reranker train` (.npz); empty = the fixed blend. A head that cannot be "
        "loaded or was trained on another encoder keeps the server NOT_SERVING (Rerank fails open).",
        "",
    )
    head_reload_seconds: float = _doc(
        "How often head_path (and the arms' head files) are checked for a new file (atomic rename); the new head "
        "is loaded and validated off the request path and swapped in. SIGHUP reloads at once. 0 = SIGHUP only.",
        2.0, ge=0,
    )
    kill_switch: bool = _doc("Global bypass: every Rerank returns the upstream order (VARIANT_BYPASSED).", False)
    treatment_percent: float = _doc("Share of users (by stable hash) that get reranking; the rest are CONTROL.", 100.0, ge=0, le=100)
    experiment_salt: str = _doc("Bucketing salt when the request names no experiment.", "reranker")
    experiment_arms: str = _doc(
        "Arms with their own ranking head, `name=percent:path,...` (e.g. `b=10:/heads/b.npz`): each takes that "
        "percent of users from the treatment buckets (the sum must not exceed treatment_percent); the rest of "
        "treatment uses head_path. An arm whose file does not exist yet serves like the rest of treatment until it appears.",
        "",
    )

    @classmethod
    def _checks(cls) -> Sequence[Callable[[Any], list[str]]]:
        return (_arm_problems,)

    def parsed_experiment_arms(self) -> list[tuple[str, float, str]]:
        """`experiment_arms` as [(name, percent, head path)], in the order given (their buckets follow that order)."""
        arms: list[tuple[str, float, str]] = []
        for part in filter(None, (p.strip() for p in self.experiment_arms.split(","))):
            name, percent, path = _arm_entry(part)
            if name in {a[0] for a in arms}:
                raise ValueError(f"experiment_arms: arm {name!r} is named twice")
            arms.append((name, percent, path))
        return arms


@dataclass(frozen=True)
class LearningSettings(_Section):
    """learning: the training log, online metrics, and the learner (`reranker learn`)."""

    training_log_dir: str = _doc(
        "Directory the training log is appended to: sampled served lists (served-*.tsv, the candidates.tsv "
        "form) and every ingested event (events-*.tsv); `reranker train --training-log DIR` reads it. Empty = off.",
        "",
    )
    training_log_sample: float = _doc(
        "Share in [0, 1] of Rerank lists that are logged (training log) and joined with the next events (online "
        "metrics); decided per request. Events are always all logged.",
        1.0, ge=0, le=1,
    )
    training_log_max_file_bytes: int = _doc("A training-log file is closed and a new one started past this size.", 64 * 1024 * 1024, gt=0)
    training_log_max_file_seconds: float = _doc("... or when it is this old (seconds).", 3600.0, gt=0)
    training_log_keep_files: int = _doc("Newest files kept per kind (served, events); older ones are deleted. 0 = keep all.", 0, ge=0)
    training_log_queue_size: int = _doc(
        "Records (one list or one batch of events) waiting for the writer thread; when full, new ones are dropped "
        "and counted (reranker_training_log_dropped), never waited for.",
        10_000, gt=0,
    )
    training_log_flush_seconds: float = _doc(
        "The writer hands what it has to the OS at least this often: a SIGKILL loses at most the records of the "
        "last interval plus the queue; a file is fsynced when it is closed (rotation, shutdown).",
        1.0, gt=0,
    )
    training_log_fsync: bool = _doc("fsync after every flush too (power-loss bound = one flush interval; costs disk I/O).", False)
    training_log_retry_seconds: float = _doc(
        "After a training-log write fails (full disk, training_log_dir missing or not writable), records are dropped "
        "and counted for this long, then a new file is tried; the failure is logged at most once per this interval. "
        "Serving is never affected.",
        30.0, gt=0,
    )
    online_metrics_window_seconds: float = _doc(
        "Online metrics: each logged list is joined with the user's next positive event within this many seconds "
        "(hits@k and NDCG@k per arm on /metrics). 0 = off.",
        0.0, ge=0,
    )
    online_metrics_k: int = _doc("Cut-off k of the online hits@k and NDCG@k.", 10, gt=0)
    online_metrics_max_lists: int = _doc(
        "Lists waiting for their user's next event (bounded memory, ~0.5 KB each); the oldest is dropped and counted when full.",
        50_000, gt=0,
    )
    learn_log_root: str = _doc(
        "`reranker learn`: the sidecars' training logs: one training_log_dir, or a directory with one subdirectory "
        "per pod (each pod's training_log_dir).", ""
    )
    learn_items: str = _doc("`reranker learn`: items.tsv (item_id, text) of the catalog the heads are trained on.", "")
    learn_main_arm: str = _doc(
        "`reranker learn`: the experiment arm (experiment_arms) whose file is the promoted head; while the file does "
        "not exist the arm serves zero-shot (like treatment, which must have no head_path: it is the zero-shot floor).",
        "main",
    )
    learn_canary_arm: str = _doc("`reranker learn`: the experiment arm (a small share) that serves the candidate under test.", "canary")
    learn_history_path: str = _doc(
        "`reranker learn`: every decision as a JSON line (version, window, offline and online numbers, decision, "
        "reason); `reranker learn status` prints it. Survives restarts.", "learner-history.jsonl"
    )
    learn_interval_seconds: float = _doc("`reranker learn`: seconds between two looks at the logs.", 60.0, gt=0)
    learn_window_lists: int = _doc("`reranker learn`: newest served lists a candidate is trained and gated on (sliding window).", 20_000, gt=0)
    learn_holdout_percent: float = _doc(
        "`reranker learn`: newest share of the window held out of training; the offline gate scores it.", 20.0, gt=0, lt=100,
    )
    learn_retrain_lists: int = _doc(
        "`reranker learn`: new served lists after the last candidate's window before another candidate is trained.", 5_000, gt=0,
    )
    learn_min_lists: int = _doc("`reranker learn`: judged lists per arm below which a canary is never promoted.", 1_000, gt=0)
    learn_max_canary_lists: int = _doc(
        "`reranker learn`: judged canary lists after which a canary with no decision is withdrawn (a tie: the main "
        "head stays).", 20_000, gt=0,
    )
    learn_alpha: float = _doc(
        "`reranker learn`: error rate of the online test (an always-valid confidence sequence): a canary that is no "
        "better is promoted with probability at most alpha / 2, however often the learner looks.", 0.05, gt=0, lt=1,
    )
    learn_effect: float = _doc(
        "`reranker learn`: relative online gain the test detects fastest (its mixture scale = this x the main arm's "
        "NDCG before the canary); it changes speed, not validity.", 0.1, gt=0,
    )
    learn_metrics_address: str = _doc("`reranker learn`: host:port of the learner's Prometheus /metrics; empty = off.", "", host_port=True)


@dataclass(frozen=True)
class ObservabilitySettings(_Section):
    """observability: logging, the access log, Prometheus metrics and OpenTelemetry tracing."""

    log_level: str = _doc("Python logging level.", "INFO")
    log_format: str = _doc("`text` (human) or `json` (one JSON object per line, for log shippers).", "text", choices=("text", "json"))
    access_log: bool = _doc("Log one line per RPC (request id, bucket, variant, fallback, latency).", True)
    access_log_sample: float = _doc(
        "Share in [0, 1] of successful calls (personalized Reranks, writes, reads) that get an access-log "
        "line; errors, fallbacks, bypass and control answers are always written. 1.0 = every line (each costs ~40 us of the request).",
        0.01, ge=0, le=1,
    )
    log_user_salt: str = _doc(
        "When set, access-log lines carry `user_hash` = salted hash of the user id (raw ids are never logged).", ""
    )
    metrics_address: str = _doc(
        "host:port of the Prometheus /metrics HTTP endpoint; empty = off. Use 0.0.0.0:9464 in a pod.",
        "127.0.0.1:9464", host_port=True,
    )
    otel_enabled: bool = _doc(
        "OpenTelemetry tracing of every RPC (needs the `otel` extra); the standard OTEL_* variables apply "
        "(OTEL_SDK_DISABLED=true keeps it off).", False
    )
    otel_endpoint: str = _doc(
        "OTLP/gRPC collector endpoint for traces, e.g. http://localhost:4317; overrides "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT. Empty = those variables, else the exporter default.", ""
    )
    otel_service_name: str = _doc(
        "service.name resource attribute of the exported traces; overrides OTEL_SERVICE_NAME and "
        "OTEL_RESOURCE_ATTRIBUTES. Empty = those variables, else `reranker`.", ""
    )


# --- checks that relate fields of one section --------------------------------------------------------
def _tls_problems(s: ServerSettings) -> list[str]:
    if bool(s.tls_cert_path) != bool(s.tls_key_path) or (s.tls_client_ca_path and not s.tls_cert_path):
        return ["TLS needs tls_cert_path and tls_key_path together (tls_client_ca_path adds mTLS)"]
    return []


def _remote_encoder_problems(s: ModelSettings) -> list[str]:
    if s.encoder != "remote":
        return []
    problems = []
    if not s.encoder_url.startswith(("http://", "https://")):
        problems.append("encoder=remote needs encoder_url, an http:// or https:// URL")
    if not s.encoder_model:
        problems.append("encoder=remote needs encoder_model (the model name the server serves)")
    return problems


def _onnx_problems(s: ModelSettings) -> list[str]:
    if s.runtime != "onnx":
        return []
    problems = []
    if s.dtype not in ("float32", "int8") or s.device == "cuda":
        problems.append("runtime=onnx runs on cpu with dtype float32 or int8")
    if s.pooling in POOLINGS and s.pooling != "mean":
        problems.append(f"runtime=onnx supports pooling=mean only (got {s.pooling}); use runtime=torch")
    return problems


def _event_weight_problems(s: UserModelSettings) -> list[str]:
    try:
        weights = s.parsed_event_weights()
    except ValueError as exc:
        return [str(exc)]
    problems = []
    largest = max([1.0, *(abs(w) for w in weights.values())])  # 1 = the weight of an unlisted type
    if s.max_event_weight and s.max_event_weight < largest:
        problems.append(f"max_event_weight {s.max_event_weight} is below the largest event_weights value {largest}")
    if not all(math.isfinite(w) for w in weights.values()):
        problems.append("event_weights must be finite")
    return problems


def _arm_problems(s: RankingSettings) -> list[str]:
    try:
        arms = s.parsed_experiment_arms()
    except ValueError as exc:
        return [str(exc)]
    if sum(percent for _, percent, _ in arms) > s.treatment_percent + 1e-9:
        return ["experiment_arms: the arms' percents add up to more than treatment_percent"]
    return []


def _arm_entry(part: str) -> tuple[str, float, str]:
    """One `name=percent:path` entry of experiment_arms, checked."""
    name, sep, rest = part.partition("=")
    percent, sep2, path = rest.partition(":")
    name = name.strip()
    if not sep or not sep2 or not path.strip():
        raise ValueError(f"experiment_arms entry {part!r} is not name=percent:path")
    if not ARM_NAME.fullmatch(name) or name in RESERVED_ARMS:
        raise ValueError(f"experiment_arms: arm name {name!r} must be [A-Za-z0-9_-] and not one of {RESERVED_ARMS}")
    try:
        value = float(percent)
    except ValueError:
        raise ValueError(f"experiment_arms entry {part!r} has a non-numeric percent") from None
    if not 0.0 < value <= 100.0:
        raise ValueError(f"experiment_arms entry {part!r}: percent must be in (0, 100]")
    return name, value, path.strip()


# --- the whole: one attribute per section ------------------------------------------------------------
SECTIONS: dict[str, type[_Section]] = {
    "server": ServerSettings,
    "limits": LimitsSettings,
    "model": ModelSettings,
    "users": UserModelSettings,
    "redis": RedisSettings,
    "stream": StreamSettings,
    "ranking": RankingSettings,
    "learning": LearningSettings,
    "observability": ObservabilitySettings,
}
# Flat setting name (flag, environment variable, runtime settings file key) -> its section.
SECTION_OF: dict[str, str] = {
    f.name: section for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)  # type: ignore[arg-type]
}


@dataclass(frozen=True, init=False)
class Settings:
    """Every section. `Settings(**values)` takes sections by name (`model=ModelSettings(...)`) and
    single settings by their flat name (`blend_weight=0.2`, put into their section); a section not
    given gets its defaults. Every problem of every section is reported in one SettingsError."""

    server: ServerSettings
    limits: LimitsSettings
    model: ModelSettings
    users: UserModelSettings
    redis: RedisSettings
    stream: StreamSettings
    ranking: RankingSettings
    learning: LearningSettings
    observability: ObservabilitySettings

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(SECTIONS) - set(SECTION_OF))
        if unknown:
            raise TypeError(f"Settings got unknown settings: {', '.join(unknown)}")
        problems: list[str] = []
        for name, kind in SECTIONS.items():
            given = values.get(name) or kind()
            flat = {k: v for k, v in values.items() if SECTION_OF.get(k) == name}
            try:
                object.__setattr__(self, name, dataclasses.replace(given, **flat) if flat else given)
            except SettingsError as exc:
                problems.extend(exc.problems)
        if problems:
            raise SettingsError(problems)

    def value(self, name: str) -> Any:
        """One setting by its flat name (for code that handles settings generically: flags, files)."""
        return getattr(getattr(self, SECTION_OF[name]), name)

    @classmethod
    def from_sources(cls, argv: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from flags (highest precedence), then `RERANKER_*` variables, then defaults."""
        values: dict[str, Any] = {}
        for f in flat_fields():
            raw = (env or {}).get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(f, raw)
        parsed = settings_parser().parse_args(list(argv))
        values.update((f.name, getattr(parsed, f.name)) for f in flat_fields() if getattr(parsed, f.name) is not None)
        return cls(**values)


def flat_fields(section: str | None = None) -> Iterator[dataclasses.Field[Any]]:
    """Every setting's field, section by section (or one section's); a field's name is its flat name."""
    for name, kind in SECTIONS.items():
        if section is None or section == name:
            yield from dataclasses.fields(kind)  # type: ignore[arg-type]


def _field_type(f: dataclasses.Field[Any]) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def _coerce(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _field_type(f)
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a boolean")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None


def _section_title(kind: type) -> str:
    return (kind.__doc__ or "").strip().splitlines()[0]


def settings_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add one flag per setting, grouped by section (defaults None, so unset flags don't mask the environment)."""
    parser = parser or argparse.ArgumentParser(add_help=False)
    for name, kind in SECTIONS.items():
        group = parser.add_argument_group(_section_title(kind))
        for f in flat_fields(name):
            flag = "--" + f.name.replace("_", "-")
            allowed = allowed_text(f)
            help_text = (f"{f.metadata['doc']}{' Allowed: ' + allowed + '.' if allowed else ''} "
                         f"[env {ENV_PREFIX}{f.name.upper()}, default {f.default!r}]")
            kind_of = _field_type(f)
            if kind_of is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                group.add_argument(flag, type=kind_of, default=None, help=help_text)
    return parser


def settings_markdown() -> str:
    """The settings reference, one table per section (`reranker settings`; docs/settings.md embeds it)."""
    parts = []
    for name, kind in SECTIONS.items():
        section, _, about = _section_title(kind).partition(": ")
        parts += [f"## `{section}`: {about}", "",
                  "| flag | environment variable | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
        for f in flat_fields(name):
            flag = "--" + f.name.replace("_", "-")
            parts.append(f"| `{flag}` | `{ENV_PREFIX}{f.name.upper()}` | `{f.default!r}` | {allowed_text(f)} | {f.metadata['doc']} |")
        parts.append("")
    return "\n".join(parts).rstrip("\n")


def settings_page_markdown() -> str:
    """docs/settings.md, generated: `python scripts/gen_settings_doc.py` writes it; a test fails when it is stale."""
    return "\n".join([
        "# Settings",
        "",
        "[Back to the README](../README.md)",
        "",
        "<!-- Generated by scripts/gen_settings_doc.py from reranker/config.py; do not edit by hand. -->",
        "",
        "Every setting is a flag of `reranker serve` and a `RERANKER_*` environment variable (flag wins);",
        "`reranker settings` prints these tables. In code, settings come in one section per component",
        "(`settings.ranking.blend_weight`); each component receives only its own section.",
        "",
        settings_markdown(),
        "",
    ])
