"""`reranker learn [run|status|bench]`: argument parsing and wiring of the learner (learner.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from reranker.config import Settings, flat_fields, settings_parser


def add_command(commands: Any) -> None:
    p = commands.add_parser(
        "learn", help="train, canary, promote or roll back a ranking head from the sidecars' training logs",
        parents=[settings_parser()],
        description="run: the learner loop (docs/learning-loop.md); status: print the decision history; "
                    "bench: the online gate's error rates on generated traffic.",
    )
    p.add_argument("action", nargs="?", choices=("run", "status", "bench"), default="run")
    p.add_argument("--once", action="store_true", help="run: one look, then exit")
    p.add_argument("--candidate", type=Path, default=None,
                   help="run: canary this head file first (trained elsewhere; the offline gate is skipped)")
    p.add_argument("--json", action="store_true", help="status: the history as JSON lines")
    p.add_argument("--runs", type=int, default=20, help="bench: runs per kind")
    p.add_argument("--kinds", default="aa,worse", help="bench: comma list of aa, worse, better")
    p.add_argument("--quality", type=float, default=0.5,
                   help="bench: probability that the next item is in the top k under main (sets the NDCG level)")
    p.add_argument("--look", type=int, default=500, help="bench: lists between two looks")
    p.add_argument("--max-lists", type=int, default=60_000, help="bench: lists per run at most")
    p.set_defaults(handler=_learn)


def _settings(args: argparse.Namespace) -> Settings:
    base = Settings.from_sources([], os.environ)
    flags = {f.name: getattr(args, f.name) for f in flat_fields()
             if f.name != "address" and getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **flags)


def _learn(args: argparse.Namespace, _argv: Any) -> int:
    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"reranker learn: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.observability.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.action == "status":
        return _status(settings, args.json)
    if args.action == "bench":
        from reranker.learner import bench

        kinds = [k for k in args.kinds.split(",") if k]
        if any(k not in bench.KINDS for k in kinds) or args.runs < 1:
            print(f"reranker learn bench: --kinds from {', '.join(bench.KINDS)}, --runs >= 1", file=sys.stderr)
            return 2
        given = {name: settings.value(name) for name in _given(args) if name.startswith("learn_")}
        report = bench.run(kinds, args.runs, quality=args.quality, look=args.look, max_lists=args.max_lists, **given)
        print(json.dumps(report, indent=2))
        return 0
    return _run(settings, args)


def _given(args: argparse.Namespace) -> set[str]:
    return {f.name for f in flat_fields() if getattr(args, f.name, None) is not None}


def _status(settings: Settings, as_json: bool) -> int:
    from reranker.learner.learner import status_lines
    from reranker.learning.publishing import History

    path = Path(settings.learning.learn_history_path)
    if not path.exists():
        print(f"reranker learn status: no history at {path} (the learner has not decided anything yet)")
        return 0
    entries = History(path).entries
    if as_json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
    else:
        print("\n".join(status_lines(entries)))
    return 0


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from reranker.learner.learner import Learner
    from reranker.ranking import head as ranking_head

    candidate = None
    try:
        if args.candidate is not None:
            candidate = ranking_head.load(args.candidate)
        learner = Learner(settings, candidate=candidate)
    except (ValueError, OSError) as exc:
        print(f"reranker learn: {exc}", file=sys.stderr)
        return 2
    if settings.learning.learn_metrics_address:
        from prometheus_client import start_http_server

        host, _, port = settings.learning.learn_metrics_address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=learner.registry)
    if args.once:
        entry = learner.tick()
        print(json.dumps(entry, sort_keys=True) if entry else "no decision")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    learner.run(stop.is_set, lambda seconds: stop.wait(seconds))
    return 0
