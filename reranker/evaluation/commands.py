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

from reranker.config import Settings, flat_fields, settings_parser


def add_commands(commands: Any) -> None:
    """Register the subcommands on cli.py's subparsers."""
    ev = commands.add_parser(
        "eval", help="offline quality evaluation through a real server", parents=[settings_parser()],
        description="Leave-last-out evaluation: upstream order vs the server's order (see docs/ranking-quality.md).",
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
    _data_args(tr, retriever_default="popularity,itemknn,als,sampled", events_required=False)
    tr.add_argument("--training-log", type=Path, default=None,
                    help="a server's training_log_dir: its events (instead of --events) and its served lists (instead "
                         "of --candidates; each labelled by its user's first event at or after it); the built-in "
                         "retrievers are used only when --retriever is given")
    tr.add_argument("--output", type=Path, required=True, help="where to write the head artefact (.npz)")
    tr.add_argument(
        "--candidates", type=Path, default=None,
        help="the upstream's own served lists (candidates.tsv; a `timestamp` column labels each list with the "
             "user's first event at or after it, else the user's last event is its label); with it the built-in "
             "retrievers are used only when --retriever is given",
    )
    tr.add_argument("--adapter-epochs", type=int, default=3, help="epochs of the next-item adapter training")
    tr.add_argument("--neighbours", type=int, default=50,
                    help="neighbours kept per item in the head's covisit/transition tables (artefact ~ 2 x 8 x k bytes per item)")
    tr.add_argument("--blend-users", type=int, default=5000,
                    help="users whose lists and profiles the blend is fitted on (bounds memory; 0 = all)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    tr.set_defaults(handler=_train)

    rp = commands.add_parser(
        "replay", help="play an events file against a running server as live traffic (Rerank before each event)",
        description="Replays events in time order: a Rerank of the upstream (item-kNN) list before each event, then "
        "the event (see reranker/evaluation/replay.py). With the server's training log on, the log is what "
        "`reranker train --training-log` learns from.",
    )
    rp.add_argument("--target", required=True, help="host:port of the running server")
    rp.add_argument("--items", type=Path, required=True, help="items.tsv (item_id, text)")
    rp.add_argument("--events", type=Path, required=True, help="events.tsv (user_id, item_id, timestamp[, event_type])")
    rp.add_argument("--max-users", type=int, default=0, help="replay only the first N users to appear (0 = all)")
    rp.add_argument("--fit-fraction", type=float, default=0.5, help="share of the timeline the upstream retriever is fitted on")
    rp.add_argument("--start", type=float, default=0.5, help="share of the timeline recorded without lists (profiles) before lists start")
    rp.add_argument("--stop", type=float, default=1.0, help="share of the timeline where the replay stops")
    rp.add_argument("--num-candidates", type=int, default=50, help="upstream list length")
    rp.add_argument("--top-k", type=int, default=10, help="top_k of each Rerank (and the k of the client-side hits@k)")
    rp.add_argument("--no-upsert", action="store_true", help="do not send the catalog texts (UpsertItems) first")
    rp.add_argument("--include-seen", action="store_true",
                    help="keep the user's consumed items in the upstream lists (real upstream lists do)")
    rp.add_argument("--no-bootstrap", action="store_true",
                    help="do not send the events before --start (an earlier replay that stopped there sent them)")
    rp.set_defaults(handler=_replay)

    cv = commands.add_parser("convert", help="convert ml-100k (GroupLens or RecBole files) or MIND files to the eval format")
    cv.add_argument("format", choices=("ml100k", "mind"))
    cv.add_argument("--input", type=Path, required=True,
                    help="directory with u.data/u.item (GroupLens) or ml-100k.inter/.item (RecBole), or behaviors.tsv/news.tsv")
    cv.add_argument("--output", type=Path, required=True, help="directory to write items.tsv, events.tsv (candidates.tsv)")
    cv.add_argument("--min-rating", type=float, default=0.0, help="ml100k: keep ratings >= this (default: all)")
    cv.set_defaults(handler=_convert)


def _data_args(
    parser: argparse.ArgumentParser, retriever_default: str = "popularity,itemknn,als", events_required: bool = True
) -> None:
    parser.add_argument("--items", type=Path, required=True, help="items.tsv (item_id, text)")
    parser.add_argument("--events", type=Path, required=events_required, help="events.tsv (user_id, item_id, timestamp[, event_type])")
    parser.add_argument("--retriever", default=None,
                        help="comma list of popularity, itemknn, als, ease, sasrec (sequential), sampled (target + N random "
                             "negatives); default " + retriever_default)
    parser.set_defaults(retriever_default=retriever_default)
    parser.add_argument("--num-candidates", default="100", help="candidates per user from each retriever; a comma list compares counts")
    parser.add_argument("--negatives", type=int, default=19, help="random negatives per target for --retriever sampled")
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampled negatives, training)")
    parser.add_argument("--include-seen", action=argparse.BooleanOptionalAction, default=None,
                        help="built-in retrievers keep items the user already consumed, as real upstream lists do "
                             "(default: on for train, off for eval)")


def _settings(args: argparse.Namespace) -> Settings:
    """Environment, then the settings flags given on the command line (flag > environment > default)."""
    base = Settings.from_sources([], os.environ)
    flags = {
        f.name: getattr(args, f.name)
        for f in flat_fields()
        if f.name != "address" and getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(base, **flags)


def _retriever_names(args: argparse.Namespace) -> tuple[str, ...]:
    """--retriever, or its command's default; `train` with served lists (--candidates, --training-log)
    uses those alone unless retrievers are asked for. Unknown names (or none, outside train) raise."""
    given = args.retriever
    served = getattr(args, "candidates", None) is not None or getattr(args, "training_log", None) is not None
    if given is None and served and args.handler is _train:
        given = ""  # train --candidates / --training-log: the served lists alone, unless retrievers are asked for
    names = tuple(n.strip() for n in (args.retriever_default if given is None else given).split(",") if n.strip())
    from reranker.evaluation.retrievers import ALL_RETRIEVERS, SAMPLED

    unknown = [n for n in names if n not in ALL_RETRIEVERS + (SAMPLED,)]
    if unknown or (not names and args.handler is not _train):
        raise ValueError(f"--retriever: unknown {unknown}; choose from {', '.join(ALL_RETRIEVERS + (SAMPLED,))}")
    return names


def _common(args: argparse.Namespace) -> tuple[Settings, tuple[str, ...], tuple[int, ...]]:
    settings = _settings(args)
    logging.basicConfig(level=settings.observability.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = _retriever_names(args)
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
        include_seen=bool(args.include_seen),
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


def _check_train_args(args: argparse.Namespace) -> None:
    """Raise ValueError on `reranker train` flags out of range or an events source not given exactly once."""
    if args.adapter_epochs < 0 or args.neighbours < 1 or args.blend_users < 0:
        raise ValueError("--adapter-epochs and --blend-users must be >= 0 and --neighbours >= 1")
    if (args.events is None) == (args.training_log is None) or (args.training_log is not None and args.candidates is not None):
        raise ValueError("give --events (optionally with --candidates) or --training-log")


def _read_training_log(args: argparse.Namespace) -> tuple[list[Any], list[Any], list[Path]]:
    """Events, served lists and source files from --training-log (a summary of it on stderr)."""
    from reranker.learning.traininglog import log_files, read_training_log

    logged = read_training_log(args.training_log)
    print(json.dumps({"training_log": str(args.training_log), "files": logged.files, "events": len(logged.events),
                      "served_lists": len(logged.lists), "torn_lines": logged.torn_lines,
                      "incomplete_lists": logged.incomplete_lists}), file=sys.stderr)
    return logged.events, logged.lists, [args.items, *log_files(args.training_log)]


def _read_events_and_candidates(args: argparse.Namespace) -> tuple[list[Any], list[Any], list[Path]]:
    """Events, served lists and source files from --events and the optional --candidates."""
    from reranker.evaluation import formats

    events = formats.read_events(args.events)
    served = formats.read_served_lists(args.candidates) if args.candidates is not None else []
    sources = [args.items, args.events] + ([args.candidates] if args.candidates is not None else [])
    return events, served, sources


def _train(args: argparse.Namespace, _argv: Any) -> int:
    from reranker.evaluation import formats, train
    from reranker.evaluation.progress import ProgressBar

    try:
        settings, names, counts = _common(args)
        _check_train_args(args)
    except ValueError as exc:
        print(f"reranker train: {exc}", file=sys.stderr)
        return 2
    cfg = train.TrainConfig(
        retrievers=names, num_candidates=counts[0], sampled_negatives=args.negatives,
        adapter_epochs=args.adapter_epochs, seed=args.seed, threads=settings.model.torch_threads or 1,
        neighbours=args.neighbours, include_seen=args.include_seen is not False, blend_users=args.blend_users,
    )
    items = formats.read_items(args.items)
    if args.training_log is not None:
        try:
            events, served, sources = _read_training_log(args)
        except formats.FormatError as exc:
            print(f"reranker train: {exc}", file=sys.stderr)
            return 2
    else:
        events, served, sources = _read_events_and_candidates(args)
    if not names and not served:
        print("reranker train: no training lists: give --retriever, or --candidates / --training-log with lists",
              file=sys.stderr)
        return 2
    progress = ProgressBar(enabled=not args.no_progress)
    from threadpoolctl import threadpool_limits

    try:
        # numpy's BLAS on one thread, as the server runs the head: the feature products are small, and
        # multi-threaded BLAS spin-waits (7x slower per list on a busy 2-core machine).
        with threadpool_limits(1, "blas"):
            head, report = train.train(
                items, events, settings, cfg, data_id=train.data_hash(sources), progress=progress, served_lists=served,
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


def _replay(args: argparse.Namespace, _argv: Any) -> int:
    from reranker.client import RerankerClient
    from reranker.evaluation import formats, replay

    if not 0.0 <= args.fit_fraction <= 1.0 or not 0.0 <= args.start <= args.stop <= 1.0 or args.num_candidates < 1:
        print("reranker replay: need 0 <= --start <= --stop <= 1, --fit-fraction in [0, 1], --num-candidates >= 1",
              file=sys.stderr)
        return 2
    items = formats.read_items(args.items)
    events = replay.timeline(formats.read_events(args.events), args.max_users)
    with RerankerClient(args.target, timeout_s=30.0) as client:
        report = replay.replay(
            client, items, events, fit_fraction=args.fit_fraction, start=args.start, stop=args.stop,
            num_candidates=args.num_candidates, top_k=args.top_k, upsert=not args.no_upsert,
            bootstrap=not args.no_bootstrap, include_seen=args.include_seen,
        )
    print(json.dumps(report.summary(args.top_k), indent=2))
    return 0 if report.failed == 0 else 1


def _convert(args: argparse.Namespace, _argv: Any) -> int:
    if args.format == "ml100k":
        from reranker.evaluation.convert_ml100k import convert

        counts = convert(args.input, args.output, args.min_rating)
    else:
        from reranker.evaluation.convert_mind import convert as convert_mind

        counts = convert_mind(args.input, args.output)
    print(json.dumps(counts))
    return 0
