"""Command line: ``kvtier demo | eval | bench io | bench attention | bench decode | stress``.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together, importing each lazily so that
``kvtier --help`` stays fast and a missing optional dependency only affects its command.

Errors a user can cause end as one line on stderr, never a traceback: a bad argument
(:class:`kvtier.cli.args.UsageError`, or a :class:`kvtier.ConfigError` raised by the library
from an argument) exits with status 2, a failure of the store or a transfer
(:class:`kvtier.KvtierError`) with status 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

# (command path, module, help). Modules are imported only when their command runs.
_COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("demo",), "kvtier.cli.demo", "HGA against dense attention on the embedded default"),
    (("bench", "io"), "kvtier.cli.bench_io", "disk and host-to-GPU throughput of the store beside raw baselines"),
    (("bench", "attention"), "kvtier.cli.bench_attention", "HGA decode/prefill kernels beside torch SDPA, 8K to 1M tokens"),
    (("bench", "decode"), "kvtier.cli.bench_decode", "end-to-end generation: HGA over a TieredCache beside dense and offloaded caches"),
    (("stress",), "kvtier.cli.stress", "random store workload with injected faults, checked byte for byte"),
    (("eval",), "kvtier.cli.eval", "HGA against dense, Quest and oracle top-k on a real model: NLL gap and needles"),
]


def _listing(prefix: tuple[str, ...]) -> str:
    """Usage and the commands under ``prefix`` (all of them for the empty prefix)."""
    prog = " ".join(("kvtier", *prefix))
    rows = [(" ".join(path[len(prefix):]), text) for path, _, text in _COMMANDS if path[: len(prefix)] == prefix]
    width = max(len(name) for name, _ in rows)
    lines = [f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in rows]
    return "\n".join(lines)


def _run(path: tuple[str, ...], module_name: str, help_text: str, rest: list[str]) -> int:
    from kvtier.cli.args import Parser, UsageError
    from kvtier.errors import ConfigError, KvtierError

    prog = "kvtier " + " ".join(path)
    module = importlib.import_module(module_name)
    parser = Parser(prog=prog, description=help_text)
    module.add_arguments(parser)
    try:
        args = parser.parse_args(rest)
    except SystemExit as exc:  # --help (0) or a bad argument, already printed on one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(module.run(args) or 0)
    except (UsageError, ConfigError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KvtierError as exc:
        print(f"{prog}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvtier`` console script and of ``python -m kvtier``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for path, module_name, help_text in sorted(_COMMANDS, key=lambda c: -len(c[0])):
        if tuple(argv[: len(path)]) == path:
            return _run(path, module_name, help_text, argv[len(path) :])
    # No command matched: the longest group prefix given (``bench``), then its listing or an error.
    prefix: tuple[str, ...] = ()
    while len(prefix) < len(argv) and any(p[: len(prefix) + 1] == (*prefix, argv[len(prefix)]) for p, _, _ in _COMMANDS):
        prefix = (*prefix, argv[len(prefix)])
    rest = argv[len(prefix) :]
    if not rest or rest[0] in ("-h", "--help"):
        print(_listing(prefix))
        return 0
    if not prefix and rest[0] == "--version":
        from kvtier import __version__

        print(f"kvtier {__version__}")
        return 0
    names = sorted({p[len(prefix)] for p, _, _ in _COMMANDS if p[: len(prefix)] == prefix})
    prog = " ".join(("kvtier", *prefix))
    print(f"{prog}: expected a command, one of {', '.join(names)}, got {rest[0]!r} (see {prog} --help)", file=sys.stderr)
    return 2
