"""Argument parsing shared by the commands: one-line errors, exit status 2, never a traceback.

Every bad argument ends as a single line ``kvtier <cmd>: --opt: expected X, got Y`` on stderr
and exit status 2, whether argparse finds it (through :class:`Parser` and the ``type=``
functions below) or the command does after parsing (by raising :class:`UsageError`).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict
from typing import Any, NoReturn

from kvtier.config import HGAConfig

__all__ = [
    "Parser",
    "UsageError",
    "byte_size",
    "fraction",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "positive_ints",
    "token_counts",
    "format_tokens",
    "HGA_PRESETS",
    "hga_overrides",
]


class UsageError(Exception):
    """A bad argument found after parsing; :func:`kvtier.cli.main` prints it on one line, exit 2."""


# argparse's own messages, rewritten into the "expected X, got Y" form of every other error.
_REWRITES = (
    (re.compile(r"^argument (\S+?)(?:/\S+)?: invalid choice: (.+?) \(choose from (.+)\)$"),
     r"\1: expected one of \3, got \2"),
    (re.compile(r"^argument (\S+?)(?:/\S+)?: invalid (\w+) value: (.+)$"), r"\1: expected \2, got \3"),
    (re.compile(r"^argument (\S+?)(?:/\S+)?: expected one argument$"), r"\1: expected a value, got none"),
    (re.compile(r"^the following arguments are required: (.+)$"), r"expected \1, got none"),
    (re.compile(r"^unrecognized arguments: (.+)$"), r"expected no further arguments (see --help), got \1"),
    (re.compile(r"^argument (\S+?)(?:/\S+)?: (.+)$"), r"\1: \2"),
)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``<prog>: <what was expected, what came>``."""

    def error(self, message: str) -> NoReturn:
        for pattern, replacement in _REWRITES:
            if pattern.match(message):
                message = pattern.sub(replacement, message)
                break
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _number(text: str, kind: type, what: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """``type=`` for an int >= 1."""
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """``type=`` for an int >= 0."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """``type=`` for a finite float > 0."""
    value = _number(text, float, "a number > 0")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """``type=`` for a finite float >= 0."""
    value = _number(text, float, "a number >= 0")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """``type=`` for a probability in [0, 1]."""
    value = _number(text, float, "a fraction in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


def byte_size(text: str) -> int:
    """``type=`` for a byte count such as ``4GiB`` or ``512MB`` (see :func:`kvtier.config.parse_bytes`)."""
    from kvtier.config import parse_bytes
    from kvtier.errors import ConfigError

    try:
        return parse_bytes(text, name="size")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected a byte count like '4GiB' or '512MB', got {text!r}") from None


def positive_ints(text: str) -> list[int]:
    """``type=`` for a comma-separated list of ints >= 1, e.g. ``1,4``."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def token_counts(text: str) -> list[int]:
    """``type=`` for comma-separated token counts with K (1024) and M (1024**2) suffixes, e.g. ``8K,1M``."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        mult = {"K": 1024, "M": 1024 * 1024}.get(part[-1:], 1)
        try:
            value = float(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            value = 0.0
        if value < 1 or value != int(value):
            raise argparse.ArgumentTypeError(f"expected token counts like 8K,32K,1M, got {text!r}")
        out.append(int(value))
    return out


def format_tokens(n: int) -> str:
    """``8192 -> '8K'``, ``2**20 -> '1M'``, and exact counts otherwise (``256 -> '256'``, ``1536 -> '1.5K'``)."""
    for unit, size in (("M", 1024 * 1024), ("K", 1024)):
        if n >= size and (n * 10) % size == 0:
            return f"{n / size:g}{unit}"
    return str(n)


#: ``--hga`` presets: a leading name picks the configuration the overrides apply to.
HGA_PRESETS = {"default": HGAConfig, "paper": HGAConfig.paper, "lean": HGAConfig.lean}


def hga_overrides(text: str, base: HGAConfig) -> HGAConfig:
    """``base`` with the ``--hga`` overrides ``"top_chunks=16,chunk_score=sum"`` applied.

    A leading preset name (``"paper"``, ``"lean"``, ``"default"``: ``HGAConfig.paper()`` ...)
    replaces ``base``, e.g. ``"lean,top_chunks=24"``. Raises ``ValueError("--hga: expected
    ..., got ...")`` for an unknown key or preset, a bad number or a configuration
    :class:`HGAConfig` refuses.
    """
    parts = [p for p in text.split(",") if p.strip()]
    if parts and "=" not in parts[0]:
        name = parts.pop(0).strip()
        if name not in HGA_PRESETS:
            raise ValueError(f"--hga: expected a preset among {sorted(HGA_PRESETS)} or key=value, got {name!r}")
        base = HGA_PRESETS[name]()
    values: dict[str, Any] = asdict(base)
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in values:
            raise ValueError(f"--hga: expected key=value with keys among {sorted(values)}, got {part!r}")
        try:
            if key in ("chunk_score", "group_score", "group_merge"):  # names, checked by HGAConfig
                values[key] = value.strip()
            else:
                values[key] = float(value) if key == "rope_cutoff_rad" else int(value)
        except ValueError:
            raise ValueError(f"--hga: expected a number for {key}, got {value!r}") from None
    try:
        return HGAConfig(**values)
    except ValueError as exc:
        raise ValueError(f"--hga: {exc}") from None
