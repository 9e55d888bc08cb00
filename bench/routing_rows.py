"""Assemble docs/routing.json (issue 11) from kvtier eval JSON outputs and docs/fidelity.json, and plot it.

    python bench/routing_rows.py OUT1.json [OUT2.json ...]   # rows of `kvtier eval --json`

Rows of the paper's rule, dense, Quest and the oracle come from docs/fidelity.json (issue 5's
run: the same prompts, and the same code path for chunk_score="sum"); the routing options'
rows from the given files. Plots go to docs/routing_*.png through kvtier.cli.plots.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvtier.cli.plots import plot_bars, plot_lines

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main(paths: list[str]) -> None:
    fid = json.loads((DOCS / "fidelity.json").read_text())
    rows = []
    for key in ("nll_default_budget", "nll_8192_budget_1728", "needles_default", "needles_quest_oracle"):
        rows += [dict(r, source=f"fidelity.json:{key}") for r in fid[key] if key.startswith("nll") or r["depth"] is not None]
    for p in paths:
        rows += [dict(r, source=Path(p).name) for r in json.loads(Path(p).read_text())["rows"]
                 if r["nats_per_token"] is not None or r["depth"] is not None or r.get("task") is not None]
    dense = {r["length"]: r["nats_per_token"] for r in rows if r["method"] == "dense" and r["nats_per_token"] is not None}
    for r in rows:  # gaps of option rows measured without a dense pass of their own
        if r["nats_per_token"] is not None and r["gap_vs_dense"] is None and r["length"] in dense:
            r["gap_vs_dense"] = r["nats_per_token"] - dense[r["length"]]
    (DOCS / "routing.json").write_text(json.dumps({"conditions": fid["conditions"], "rows": rows}, indent=1))

    def label(method: str) -> str:
        return "hga (sum, the paper's rule)" if method == "hga" else method

    nll = [r for r in rows if r["nats_per_token"] is not None and r["method"] != "dense" and r["budget"] == 1216]
    bars = {}
    for r in nll:
        bars.setdefault(f"{r['length']} tokens", {})[label(r["method"])] = r["gap_vs_dense"]
    plot_bars(DOCS / "routing_nll.png", bars, "NLL gap to dense (nats/token)",
              "SmolLM2-135M, 1,216 keys per query: NLL gap by routing rule")
    sweep = {}
    for r in rows:
        if r["nats_per_token"] is not None and r["method"] != "dense" and r["length"] == 8192:
            sweep.setdefault(label(r["method"]), {})[r["budget"]] = r["gap_vs_dense"]
    series = {m: (sorted(v), [v[b] for b in sorted(v)]) for m, v in sweep.items()}
    if series:
        plot_lines(DOCS / "routing_budget.png", series, "keys per query (budget)", "NLL gap to dense (nats/token)",
                   "SmolLM2-135M at 8,192 tokens: NLL gap against budget")
    cells = {}  # one result per (method, length, depth): a cell measured twice is the same prompt
    for r in rows:
        if r["depth"] is not None and r["needle_accuracy"] is not None:
            cells[(label(r["method"]), r["length"], r["depth"])] = r["needle_accuracy"]
    found = {}
    for (m, n, _), ok in cells.items():
        found.setdefault(m, {}).setdefault(n, []).append(ok)
    series = {m: (sorted(v), [sum(v[n]) / len(v[n]) for n in sorted(v)]) for m, v in found.items()}
    plot_lines(DOCS / "routing_needles.png", series, "context (tokens)", "needles found (fraction of depths)",
               "SmolLM2-135M, 1,216 keys per query: needles by routing rule")


if __name__ == "__main__":
    main(sys.argv[1:])
