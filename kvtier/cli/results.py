"""The long CSV format every benchmark appends to (``bench/results/*.csv``), defined once."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["CSV_COLUMNS", "append_csv"]

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


def append_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows (keys = :data:`CSV_COLUMNS`), writing the header when the file is new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
