"""What the commands write and say about a run: the CSV format, the output folder, the commit.

* :data:`CSV_COLUMNS` / :func:`append_csv`: the long CSV format every benchmark appends to;
* :func:`add_output_arguments` / :func:`output_file`: results go to ``--out`` (default
  ``./kvtier-results``) unless ``--csv``/``--json`` name a file, never into the package;
* :func:`source_commit`: the commit that ran, or an honest "not a git checkout";
* :func:`dense_tokens`: up to which length HGA with a configuration attends every key.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_OUT",
    "add_output_arguments",
    "append_csv",
    "dense_tokens",
    "output_file",
    "source_commit",
]

#: Columns of one measurement row, in file order.
CSV_COLUMNS = (
    "bench",
    "op",
    "impl",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "p20",
    "p50",
    "p80",
    "config_json",
    "gpu",
    "commit",
    "timestamp",
)

#: Where results go when the user names no place: a folder in the current directory.
DEFAULT_OUT = Path("kvtier-results")


def append_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows (keys = :data:`CSV_COLUMNS`), writing the header when the file is new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def add_output_arguments(parser: argparse.ArgumentParser, stem: str, kinds: tuple[str, ...] = ("csv", "json")) -> None:
    """``--out DIR`` plus ``--csv``/``--json`` overrides; the PNG goes beside the CSV or JSON."""
    files = ", ".join(f"{stem}.{k}" for k in (*kinds, "png"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the results ({files}); default ./{DEFAULT_OUT}")
    if "csv" in kinds:
        parser.add_argument("--csv", default=None, help=f"append CSV rows to this file instead of OUT/{stem}.csv ('' to skip)")
    if "json" in kinds:
        parser.add_argument("--json", default=None, help=f"write JSON to this file instead of OUT/{stem}.json ('' to skip)")


def output_file(args: argparse.Namespace, kind: str, stem: str) -> Path | None:
    """The file of ``kind`` ("csv", "json", "png"): the user's ``--csv``/``--json``, else ``OUT/<stem>.<kind>``.

    A PNG goes beside the CSV (or, without one, the JSON) so that a plot sits next to its numbers.
    Returns None when the user asked for none (``--csv ''``).
    """
    if kind == "png":
        beside = output_file(args, "csv", stem) if hasattr(args, "csv") else None
        beside = beside or (output_file(args, "json", stem) if hasattr(args, "json") else None)
        return (beside.parent if beside else Path(args.out)) / f"{stem}.png"
    explicit = getattr(args, kind, None)
    if explicit == "":
        return None
    return Path(explicit) if explicit is not None else Path(args.out) / f"{stem}.{kind}"


def source_commit() -> str:
    """The commit of the kvtier that runs: ``$KVTIER_COMMIT``, else git, else why there is none.

    git is asked about the folder kvtier was imported from, not the current directory (which
    may be another repository), and only when that folder is the checkout's own ``kvtier/``:
    an installed copy inside some repository's ``.venv`` is not that repository's commit.
    """
    import kvtier
    from kvtier.config import env_flag

    given = env_flag("KVTIER_COMMIT")
    if given:
        return given
    pkg = Path(kvtier.__file__).resolve().parent

    def git(*cmd: str) -> str:
        res = subprocess.run(["git", "-C", str(pkg), *cmd], capture_output=True, text=True, timeout=10, check=False)
        return res.stdout.strip() if res.returncode == 0 else ""

    try:
        top = git("rev-parse", "--show-toplevel")
        if top and (Path(top) / "kvtier").resolve() == pkg:
            sha = git("rev-parse", "--short", "HEAD")
            if sha:
                dirty = git("status", "--porcelain", "--untracked-files=no")
                return sha + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"none (kvtier {kvtier.__version__} not run from a git checkout; set KVTIER_COMMIT)"


def dense_tokens(config: Any) -> int:
    """Longest context over which HGA with ``config`` attends every key, i.e. computes dense attention.

    A query in chunk ``c`` sees the sinks, the local window and its own chunk in full, and
    routes among the ``c - sink_chunks - local_chunks`` candidate chunks between them; nothing
    is left out while all candidates fit both ``top_chunks`` and ``top_groups`` (1216 tokens
    with the defaults: 1 + 2 window chunks, 15 routed chunks of 4 groups (``top_groups`` = 60
    binds before ``top_chunks``), the current chunk).
    """
    fit = min(config.top_chunks, config.top_groups // config.groups_per_chunk)
    return (config.sink_chunks + config.local_chunks + fit + 1) * config.chunk_size
