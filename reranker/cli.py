"""Command line: `reranker serve | consume | embed-catalog | settings | bench | eval | train | convert | learn`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from reranker.signals import install_early

if TYPE_CHECKING:
    from reranker.config import Settings


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the program (the `reranker` script): the process's signals are ours
        install_early(sys.argv[1:])  # before the heavy imports below: a signal never kills a command by its default action
    argv = list(sys.argv[1:] if argv is None else argv)
    from reranker.config import settings_parser
    from reranker.tools.bench import add_arguments as add_bench_arguments
    from reranker.tools.bench import run as run_bench
    from reranker.tools.bench import run_tool
    from reranker.tools.benches import BENCHES

    if len(argv) > 1 and argv[0] == "bench" and argv[1] in BENCHES:  # a tool with its own flags
        return run_tool(argv[1], argv[2:])

    parser = argparse.ArgumentParser(prog="reranker", description="gRPC reranking sidecar")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server", parents=[settings_parser()])
    serve.set_defaults(handler=_serve)
    consume = commands.add_parser("consume", help="record user events from a Redis Stream consumer group",
                                  parents=[settings_parser()])
    consume.set_defaults(handler=_consume)
    embed = commands.add_parser("embed-catalog", help="encode items.tsv once into a shared, memory-mapped catalog",
                                parents=[settings_parser()])
    embed.add_argument("--items", required=True, help="items.tsv (header, then item_id<TAB>text)")
    embed.add_argument("--out", required=True, help="catalog file to write (atomically replaced; serve it as catalog_path)")
    embed.add_argument("--vector-dtype", choices=("float16", "float32"), default="float16",
                       help="precision of the stored vectors (default float16: half the pages)")
    embed.set_defaults(handler=_embed_catalog)
    show = commands.add_parser("settings", help="print the settings reference (markdown)")
    show.set_defaults(handler=_print_settings)
    from reranker.evaluation.commands import add_commands  # eval, train, convert

    add_commands(commands)
    from reranker.learner.learncli import add_command as add_learn_command  # learn run | status | bench

    add_learn_command(commands)
    bench = commands.add_parser("bench", help="benchmarks and measurement tools (`reranker bench --help` lists them)")
    add_bench_arguments(bench)
    bench.set_defaults(handler=run_bench)
    soak = commands.add_parser("soak", help="load/soak test a server started as a child process")
    _add_soak(soak)
    args = parser.parse_args(argv)
    return int(args.handler(args, argv[1:]) or 0)


def _print_settings(_args: argparse.Namespace, _argv: Sequence[str]) -> int:
    from reranker.config import settings_markdown

    print(settings_markdown())
    return 0


def _serve(_args: argparse.Namespace, argv: Sequence[str]) -> int:
    import faulthandler

    from reranker.serving.server import serve

    faulthandler.enable()  # a fatal signal (SIGBUS: a mapped file cut short under us) says where before the process dies

    return _with_settings(argv, serve)


def _consume(_args: argparse.Namespace, argv: Sequence[str]) -> int:
    from reranker.streamconsumer import consume

    return _with_settings(argv, consume)


def _embed_catalog(args: argparse.Namespace, argv: Sequence[str]) -> int:
    own = {"--items", "--out", "--vector-dtype"}
    rest = [a for i, a in enumerate(argv)
            if a not in own and a.split("=", 1)[0] not in own and (i == 0 or argv[i - 1] not in own)]

    def run(settings: Settings) -> int:
        import time
        from pathlib import Path

        from reranker.model.catalog import CatalogError, embed_catalog
        from reranker.model.loader import load_encoder
        from reranker.evaluation.formats import read_items

        items = read_items(Path(args.items))
        encoder = load_encoder(settings.model)
        started = time.perf_counter()
        try:
            m = embed_catalog(items.items(), encoder.encode, Path(args.out), model_version=encoder.version,
                              dtype=args.vector_dtype, batch_size=settings.model.encode_batch_size)
        except CatalogError as exc:  # e.g. a row that is not finite: nothing was written, the old file stays
            print(f"reranker embed-catalog: {exc}", file=sys.stderr)
            return 1
        print(f"{args.out}: {m.count} items x {m.dim} {m.dtype}, model {m.model_version}, checksum {m.checksum[:16]}..., "
              f"encoded in {time.perf_counter() - started:.1f} s")
        return 0

    return _with_settings(rest, run)


def _with_settings(argv: Sequence[str], run: Callable[[Settings], int]) -> int:
    """Settings from flags and RERANKER_* variables (exit 2 on a bad one), logging, then `run`."""
    from reranker.config import Settings

    try:
        settings = Settings.from_sources(argv, os.environ)
    except ValueError as exc:
        print(f"reranker: {exc}", file=sys.stderr)
        return 2
    from reranker.serving.logs import configure_logging

    configure_logging(settings.observability)
    return run(settings)


def _add_soak(parser: argparse.ArgumentParser) -> None:
    from reranker.tools.chaos import add_chaos_arguments, run_chaos_command
    from reranker.tools.loadtest import add_soak_arguments, run_soak_command

    add_soak_arguments(parser)
    add_chaos_arguments(parser)
    parser.set_defaults(handler=lambda args, _argv: run_chaos_command(args) if args.chaos else run_soak_command(args))


if __name__ == "__main__":
    sys.exit(main())
