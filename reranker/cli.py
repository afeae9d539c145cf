"""Command line: `reranker serve | settings | bench | eval | train | convert`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from reranker.bench import add_arguments as add_bench_arguments
from reranker.bench import run as run_bench
from reranker.config import Settings, settings_markdown, settings_parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="reranker", description="gRPC reranking sidecar")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server", parents=[settings_parser()])
    serve.set_defaults(handler=_serve)
    show = commands.add_parser("settings", help="print the settings reference (markdown)")
    show.set_defaults(handler=_print_settings)
    bench = commands.add_parser("bench", help="benchmarks: rerank vs gRPC echo, encoder, memory")
    add_bench_arguments(bench)
    bench.set_defaults(handler=run_bench)
    from reranker.evaluation.commands import add_commands  # eval, train, convert (issue 4)

    add_commands(commands)
    args = parser.parse_args(argv)
    return int(args.handler(args, argv[1:]) or 0)


def _print_settings(_args: argparse.Namespace, _argv: Sequence[str]) -> int:
    print(settings_markdown())
    return 0


def _serve(_args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        settings = Settings.from_sources(argv, os.environ)
    except ValueError as exc:
        print(f"reranker: {exc}", file=sys.stderr)
        return 2
    from reranker.logs import configure_logging
    from reranker.server import serve

    configure_logging(settings)
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
