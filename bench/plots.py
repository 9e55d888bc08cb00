"""Regenerate the plots in docs/ from the committed results: ``python bench/plots.py`` (needs kvtier[plot]).

* docs/decode_attention.png: decode step per layer against context, HGA beside SDPA
  (bench/results/attention.csv, the H200 sweep);
* docs/fidelity_gap.png: NLL gap to dense against context, HGA beside Quest and oracle top-k
  at 1,216 keys per query (docs/fidelity.json);
* docs/fidelity_methods.png: the same gaps per method, plus 8K at a budget of 1,728 keys;
* docs/needles.png: needles found per method and context (docs/fidelity.json);
* docs/decode_cpu.png: CPU ms per end-to-end decode step of SmolLM2 against context, HGA beside
  dense sdpa + DynamicCache, before and after the engine (bench/results/decode_cpu.csv).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from kvtier.cli.bench_attention import plot_decode
from kvtier.cli.bench_decode import plot_decode as plot_generation
from kvtier.cli.eval import plot_eval
from kvtier.cli.plots import PLOT_HINT, plot_available, plot_bars

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def main(out: Path = DOCS) -> int:
    """Write the PNGs into ``out`` (docs/); returns 1 without matplotlib."""
    if not plot_available():
        print(PLOT_HINT)
        return 1
    with (ROOT / "bench" / "results" / "attention.csv").open() as f:
        written = [plot_decode(list(csv.DictReader(f)), out / "decode_attention.png")]
    fid = json.loads((DOCS / "fidelity.json").read_text())
    model = fid["conditions"]["model"].split(" (")[0]
    written.append(plot_eval(fid["nll_default_budget"], out / "fidelity_gap.png", f"{model}, 1216 keys/query"))
    gaps: dict[str, dict[str, float | None]] = {}
    for key, budget in (("nll_default_budget", 1216), ("nll_8192_budget_1728", 1728)):
        for r in fid[key]:
            if r["method"] != "dense":
                gaps.setdefault(f"{r['length'] // 1024}K, {budget} keys", {})[r["method"]] = r["gap_vs_dense"]
    written.append(plot_bars(out / "fidelity_methods.png", gaps, "NLL gap to dense (nats/token)",
                             f"Fidelity per method at equal keys per query ({model})"))
    found: dict[str, dict[str, list[float]]] = {}
    for key in ("needles_default", "needles_quest_oracle"):
        for r in fid[key]:
            if r["depth"] is not None:
                found.setdefault(f"{r['length'] // 1024}K", {}).setdefault(r["method"], []).append(r["needle_accuracy"])
    acc = {length: {m: sum(v) / len(v) for m, v in by_method.items()} for length, by_method in sorted(
        found.items(), key=lambda kv: int(kv[0][:-1]))}
    written.append(plot_bars(out / "needles.png", acc, "needles found (fraction of depths 0.1, 0.5, 0.9)",
                             f"Needle retrieval at 1216 keys per query ({model})"))
    with (ROOT / "bench" / "results" / "decode_cpu.csv").open() as f:
        written.append(plot_generation(list(csv.DictReader(f)), out / "decode_cpu.png",
                                       "SmolLM2-135M end to end, fp32, 2 shared CPU cores", metric="cpu_ms",
                                       label="{impl} at {commit}"))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
