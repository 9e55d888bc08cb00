"""Command line: ``kvtier demo | eval | bench io | bench attention | stress``.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together, importing each lazily so that
``kvtier --help`` stays fast and a missing optional dependency only affects its command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

# (command path, module, help). Modules are imported only when their command runs.
_COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("demo",), "kvtier.cli.demo", "HGA against dense attention on the embedded default"),
    (("bench", "io"), "kvtier.cli.bench_io", "disk and host-to-GPU throughput of the store beside raw baselines"),
    (("bench", "attention"), "kvtier.cli.bench_attention", "HGA decode/prefill kernels beside torch SDPA, 8K to 1M tokens"),
    (("stress",), "kvtier.cli.stress", "random store workload with injected faults, checked byte for byte"),
    (("eval",), "kvtier.cli.eval", "HGA against dense, Quest and oracle top-k on a real model: NLL gap and needles"),
]


def _build_parser() -> argparse.ArgumentParser:
    """Top-level parser, used only for ``--help`` and for unknown commands."""
    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for path, _, help_text in _COMMANDS:
        sub.add_parser(" ".join(path), help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvtier`` console script and of ``python -m kvtier``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for path, module_name, help_text in sorted(_COMMANDS, key=lambda c: -len(c[0])):
        if tuple(argv[: len(path)]) == path:
            module = importlib.import_module(module_name)
            parser = argparse.ArgumentParser(prog="kvtier " + " ".join(path), description=help_text)
            module.add_arguments(parser)
            return int(module.run(parser.parse_args(argv[len(path) :])) or 0)
    _build_parser().parse_args(argv)  # prints help, or an error naming the valid commands
    return 2
