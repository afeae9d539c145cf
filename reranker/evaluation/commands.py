"""`reranker eval`, `reranker train` and `reranker convert`: argument parsing and wiring."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from reranker.config import Settings, settings_parser


def add_commands(commands: Any) -> None:
    """Register the subcommands on cli.py's subparsers."""
    ev = commands.add_parser(
        "eval", help="offline quality evaluation through a real server", parents=[settings_parser()],
        description="Leave-last-out evaluation: upstream order vs the server's order (see README, Ranking quality).",
    )
    _data_args(ev)
    ev.add_argument("--candidates", type=Path, default=None, help="candidates.tsv (user_id, item_id, score[, label]); default: built-in retrievers")
    # --address (a settings flag) given explicitly means: evaluate the server running there.
    ev.set_defaults(address_help="evaluate a running server at host:port instead of starting one in-process")
    ev.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    ev.add_argument("--plot", type=Path, default=None, help="write a PNG plot here (needs matplotlib)")
    ev.add_argument("--max-users", type=int, default=0, help="evaluate only the first N users (0 = all)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ev.set_defaults(handler=_eval)

    tr = commands.add_parser(
        "train", help="train a ranking head on an events file's histories", parents=[settings_parser()],
        description="Fits a ranking head (adapter + learned blend) on histories only; the last event per user is never used.",
    )
    # The default head learns from all list kinds, including the LLMRank 1+19 lists (no upstream signal).
    _data_args(tr, retriever_default="popularity,itemknn,als,sampled")
    tr.add_argument("--output", type=Path, required=True, help="where to write the head artefact (.npz)")
    tr.add_argument("--adapter-epochs", type=int, default=3, help="epochs of the next-item adapter training")
    tr.add_argument("--neighbours", type=int, default=50,
                    help="neighbours kept per item in the head's covisit/transition tables (artefact ~ 2 x 8 x k bytes per item)")
    tr.add_argument("--blend-users", type=int, default=5000,
                    help="users whose lists and profiles the blend is fitted on (bounds memory; 0 = all)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    tr.set_defaults(handler=_train)

    cv = commands.add_parser("convert", help="convert ml-100k (RecBole) or MIND files to the eval format")
    cv.add_argument("format", choices=("ml100k", "mind"))
    cv.add_argument("--input", type=Path, required=True, help="directory with ml-100k.inter/.item or behaviors.tsv/news.tsv")
    cv.add_argument("--output", type=Path, required=True, help="directory to write items.tsv, events.tsv (candidates.tsv)")
    cv.add_argument("--min-rating", type=float, default=0.0, help="ml100k: keep ratings >= this (default: all)")
    cv.set_defaults(handler=_convert)


def _data_args(parser: argparse.ArgumentParser, retriever_default: str = "popularity,itemknn,als") -> None:
    parser.add_argument("--items", type=Path, required=True, help="items.tsv (item_id, text)")
    parser.add_argument("--events", type=Path, required=True, help="events.tsv (user_id, item_id, timestamp[, event_type])")
    parser.add_argument("--retriever", default=retriever_default,
                        help="comma list of popularity, itemknn, als, ease, sasrec (sequential), sampled (target + N random negatives)")
    parser.add_argument("--num-candidates", default="100", help="candidates per user from each retriever; a comma list compares counts")
    parser.add_argument("--negatives", type=int, default=19, help="random negatives per target for --retriever sampled")
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampled negatives, training)")
    parser.add_argument("--include-seen", action="store_true",
                        help="built-in retrievers keep items the user already consumed (as real upstream lists do)")


def _settings(args: argparse.Namespace) -> Settings:
    """Environment, then the settings flags given on the command line (flag > environment > default)."""
    base = Settings.from_sources([], os.environ)
    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if f.name != "address" and getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(base, **flags)


def _common(args: argparse.Namespace) -> tuple[Settings, tuple[str, ...], tuple[int, ...]]:
    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = tuple(n.strip() for n in args.retriever.split(",") if n.strip())
    from reranker.evaluation.retrievers import ALL_RETRIEVERS, SAMPLED

    unknown = [n for n in names if n not in ALL_RETRIEVERS + (SAMPLED,)]
    if unknown or not names:
        raise ValueError(f"--retriever: unknown {unknown}; choose from {', '.join(ALL_RETRIEVERS + (SAMPLED,))}")
    counts = tuple(int(n) for n in args.num_candidates.split(",") if n.strip())
    if not counts or min(counts) <= 0:
        raise ValueError("--num-candidates must be positive integers")
    return settings, names, counts


def _eval(args: argparse.Namespace, _argv: Any) -> int:
    from reranker.evaluation import report as report_module
    from reranker.evaluation.progress import ProgressBar
    from reranker.evaluation.runner import EvalConfig, run

    try:
        settings, names, counts = _common(args)
    except ValueError as exc:
        print(f"reranker eval: {exc}", file=sys.stderr)
        return 2
    cfg = EvalConfig(
        items=args.items, events=args.events, candidates=args.candidates, retrievers=names, num_candidates=counts,
        sampled_negatives=args.negatives, max_users=args.max_users, address=args.address or "", seed=args.seed,
        include_seen=args.include_seen,
    )
    progress = ProgressBar(enabled=not args.no_progress)
    report = run(cfg, settings, progress)
    progress.close()
    print(report_module.table(report))
    if args.output:
        report_module.write_json(report, args.output)
        print(f"report written to {args.output}")
    if args.plot:
        from reranker.evaluation.plot import PlotUnavailable, plot

        try:
            plot(report, args.plot)
            print(f"plot written to {args.plot}")
        except PlotUnavailable as exc:
            print(f"reranker eval: no plot: {exc}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace, _argv: Any) -> int:
    from reranker.evaluation import formats, train
    from reranker.evaluation.progress import ProgressBar

    try:
        settings, names, counts = _common(args)
    except ValueError as exc:
        print(f"reranker train: {exc}", file=sys.stderr)
        return 2
    threads = settings.torch_threads or 1
    if args.adapter_epochs < 0 or args.neighbours < 1 or args.blend_users < 0:
        print("reranker train: --adapter-epochs and --blend-users must be >= 0 and --neighbours >= 1", file=sys.stderr)
        return 2
    cfg = train.TrainConfig(
        retrievers=names, num_candidates=counts[0], sampled_negatives=args.negatives,
        adapter_epochs=args.adapter_epochs, seed=args.seed, threads=threads, neighbours=args.neighbours,
        include_seen=args.include_seen, blend_users=args.blend_users,
    )
    items, events = formats.read_items(args.items), formats.read_events(args.events)
    progress = ProgressBar(enabled=not args.no_progress)
    from threadpoolctl import threadpool_limits

    try:
        # numpy's BLAS on one thread, as the server runs the head: the feature products are small, and
        # multi-threaded BLAS spin-waits (7x slower per list on a busy 2-core machine).
        with threadpool_limits(1, "blas"):
            head, report = train.train(
                items, events, settings, cfg, data_id=train.data_hash([args.items, args.events]), progress=progress,
            )
    except ValueError as exc:  # e.g. too little history, or EASE asked for on a catalog too large for it
        print(f"reranker train: {exc}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    head.save(args.output)
    print(json.dumps(report, indent=2))
    print(f"head {head.version} written to {args.output}")
    return 0


def _convert(args: argparse.Namespace, _argv: Any) -> int:
    if args.format == "ml100k":
        from reranker.evaluation.convert_ml100k import convert

        counts = convert(args.input, args.output, args.min_rating)
    else:
        from reranker.evaluation.convert_mind import convert as convert_mind

        counts = convert_mind(args.input, args.output)
    print(json.dumps(counts))
    return 0
