"""Issue 11's fidelity sweeps as a queue of ``kvtier eval`` runs, resumable across device calls.

Each item is one ``kvtier eval`` invocation (one length, one budget or one grid) writing its
own JSON. Items run in priority order until ``--seconds`` are spent; an item whose JSON says
it finished is skipped the next time, so consecutive calls on one warm machine continue the
queue (``--state`` keeps the JSON files between calls). This file only lists and runs
``kvtier eval`` command lines: every number comes from the command users run.

    python bench/fidelity_queue.py --state /tmp/kvtier-fid --seconds 540 --out $OUT
    python bench/fidelity_queue.py --list          # the queue, in order
    python bench/fidelity_queue.py --list --done bench/results/h200-2026-12-03-fidelity-accuracy  # what is left of it
    python bench/fidelity_queue.py --part 1 --list # the first sweep (the newest part is the default)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

#: Methods compared at every budget (the paper's rule, the measured-best option so far, the baselines).
CORE = "dense,hga,hga-max_group,quest,oracle"
#: Every item but one runs the spec: its numbers do not depend on the device.
REFERENCE = ["--backend", "reference"]
#: The task suite of every part: every task at 2K, 4K and 8K, seeds 0 and 1 (42 samples per method).
TASK_SUITE = ["--tasks-only", "--tasks", "all", "--lengths", "2048,4096,8192", "--seeds", "2"]
#: The needle grid of every part: 2K to 8K (the depths are ``kvtier eval``'s default 0.1, 0.5, 0.9).
NEEDLE_GRID = ["--lengths", "2048,4096,6144,8192", "--needles-only"]


def first_sweep() -> list[tuple[str, list[str]]]:
    """Part 1, ``(name, kvtier eval arguments)`` in the order they run: the paper's 16 chunks
    and the routing options beside it."""
    items: list[tuple[str, list[str]]] = []
    for n in (4096, 8192):  # 1. the default budget, the spec on the GPU (compare with the CPU tables)
        items.append((f"nll_b1216_{n}", ["--lengths", str(n), "--methods", CORE + ",hga-sum+max_group", *REFERENCE]))
    items.append(("nll_b1216_4096_kernels", ["--lengths", "4096", "--methods", "dense,hga,hga-max_group",
                                             "--backend", "triton"]))  # 2. the product path beside the spec
    for d in ("0.1,0.5,0.9",):  # 3. needles, 2K to 8K
        items.append(("needles_b1216", ["--lengths", "2048,4096,6144,8192", "--depths", d, "--needles-only",
                                        "--methods", CORE, *REFERENCE]))
    for n in (8192, 4096):  # 4. a wider first level, and the window/routed split, at the same budget
        for tc in (32, 128):
            items.append((f"nll_b1216_{n}_tc{tc}", ["--lengths", str(n), "--methods", "dense,hga,hga-max_group",
                                                    "--top-chunks", str(tc), *REFERENCE]))
        items.append((f"nll_b1216_{n}_local4", ["--lengths", str(n), "--methods", CORE, "--local-chunks", "4", *REFERENCE]))
    for n in (8192, 4096):  # 5. budget sweeps: 8 to 112 routed groups beside the paper's windows
        for b in (832, 960, 1728, 2496):
            items.append((f"nll_b{b}_{n}", ["--lengths", str(n), "--budget", str(b), "--methods", CORE, *REFERENCE]))
    items.append(("tasks_b1216", [*TASK_SUITE, "--methods", CORE, *REFERENCE]))  # 6. the task suite
    items.append(("needles_b1216_variants", [*NEEDLE_GRID,
                                             "--methods", "hga-max_group,hga-sum+max_group,hga-running_max_group",
                                             "--top-chunks", "32", *REFERENCE]))
    items.append(("needles_b1216_local4", [*NEEDLE_GRID, "--local-chunks", "4",
                                           "--methods", CORE, *REFERENCE]))
    items.append(("tasks_b1216_seeds34", ["--tasks-only", "--tasks", "all", "--lengths", "2048,4096,8192",
                                          "--seeds", "4", "--methods", CORE, *REFERENCE]))
    return items


def followup() -> list[tuple[str, list[str]]]:
    """Part 2: the rows the first sweep lacked once the default became 32 chunks (the task
    suite and budget sweeps for it and for the 4-chunk local window)."""
    local4 = ["--local-chunks", "4"]
    items: list[tuple[str, list[str]]] = [
        ("tasks_b1216_tc32", [*TASK_SUITE, "--methods", "hga", *REFERENCE]),  # 1. the default on the whole suite
        ("tasks_b1216_local4", [*TASK_SUITE, "--methods", "hga,quest,oracle", *local4, *REFERENCE]),
    ]
    for n in (8192, 4096):  # 2. budget sweeps at 32 chunks (dense again: the gap is within one run)
        for b in (960, 1728, 2496):
            items.append((f"nll_b{b}_{n}_tc32", ["--lengths", str(n), "--budget", str(b), "--methods", "dense,hga", *REFERENCE]))
    for b in (1728, 2496):  # 3. the 4-chunk window above the default budget
        items.append((f"nll_b{b}_8192_local4", ["--lengths", "8192", "--budget", str(b), "--methods", CORE, *local4, *REFERENCE]))
    return items


def split_groups() -> list[tuple[str, list[str]]]:
    """Part 3: the group level split between the summed summary and Quest's bound
    (``group_score="sum+bound"``), with the chunk level by the sum, by the best bounded group,
    or half by each; at the default budget, then with 4 local chunks, then against budget."""
    split = ["hga-sum-sum+bound", "hga-sum+max_group-sum+bound", "hga-max_group-sum+bound"]
    local4 = ["--local-chunks", "4"]
    items: list[tuple[str, list[str]]] = []
    for n in (4096, 8192):  # 1. NLL at the default budget (dense again: the gap is within one run)
        items.append((f"nll_b1216_{n}_split", ["--lengths", str(n), "--methods", ",".join(["dense", *split]), *REFERENCE]))
    items.append(("needles_b1216_split", [*NEEDLE_GRID,  # 2. needles
                                          "--methods", ",".join(split), *REFERENCE]))
    for method in split[1:] + split[:1]:  # 3. the task suite, one method per item
        items.append((f"tasks_b1216_{method[4:]}", [*TASK_SUITE, "--methods", method, *REFERENCE]))
    for n in (4096, 8192):  # 4. the 4-chunk window (48 routed groups at the same budget)
        items.append((f"nll_b1216_{n}_split_local4", ["--lengths", str(n), "--methods", ",".join(["dense", *split[1:]]),
                                                      *local4, *REFERENCE]))
    for n in (8192, 4096):  # 5. against budget
        for b in (960, 1728, 2496):
            items.append((f"nll_b{b}_{n}_split", ["--lengths", str(n), "--budget", str(b),
                                                  "--methods", ",".join(["dense", *split[1:]]), *REFERENCE]))
    items.append(("needles_b1216_split_local4", [*NEEDLE_GRID,
                                                 "--methods", ",".join(split[1:]), *local4, *REFERENCE]))
    items.append(("tasks_b1216_split_local4", [*TASK_SUITE, "--methods", ",".join(split[1:]), *local4, *REFERENCE]))
    return items


def windows() -> list[tuple[str, list[str]]]:
    """Part 4: the default's rule with other splits of the same 1,216 keys between the windows
    and the routed groups (fewer sink chunks, 3 to 6 local chunks), a wider first level and
    groups of 8; NLL at 8K and 4K, then the task suite and needles for the likeliest gains."""
    variants = {
        "sink1": ["--sink-chunks", "1"],  # 52 routed groups
        "sink1_local5": ["--sink-chunks", "1", "--local-chunks", "5"],  # 48
        "local5": ["--local-chunks", "5"],  # 44
        "local6": ["--local-chunks", "6"],  # 40
        "local3": ["--local-chunks", "3"],  # 52
        "sink1_local3": ["--sink-chunks", "1", "--local-chunks", "3"],  # 56
        "tc64": ["--top-chunks", "64"],  # 48, from 64 chunks at the first level
        "gs8": ["--group-size", "8"],  # 96 groups of 8
    }
    items: list[tuple[str, list[str]]] = []
    for n in (8192, 4096):  # 1. NLL at the default budget, the baselines with the same windows
        for name, extra in variants.items():
            items.append((f"nll_b1216_{n}_{name}", ["--lengths", str(n), "--methods", "dense,hga,quest,oracle",
                                                    *extra, *REFERENCE]))
    for name in ("sink1", "tc64", "sink1_local3"):  # 2. the task suite, one variant per item
        items.append((f"tasks_b1216_{name}", [*TASK_SUITE, "--methods", "hga", *variants[name], *REFERENCE]))
    items.append(("needles_b1216_sink1", [*NEEDLE_GRID, "--methods", "hga",
                                          *variants["sink1"], *REFERENCE]))
    items.append(("tasks_b1216_sink1_baselines", [*TASK_SUITE, "--methods", "quest,oracle", *variants["sink1"], *REFERENCE]))
    return items


def fine_groups() -> list[tuple[str, list[str]]]:
    """Part 5: groups of 8 (the best 8K gap of part 4) with part 4's best task windows (one
    sink chunk, 3 local chunks), and part 4's winners again for their raw rows; NLL at 8K and
    4K, the product path beside the spec, then the task suite and needles."""
    variants = {
        "gs8_sink1": ["--group-size", "8", "--sink-chunks", "1"],  # 104 routed groups of 8
        "gs8_local3": ["--group-size", "8", "--local-chunks", "3"],  # 104
        "gs8_sink1_local3": ["--group-size", "8", "--sink-chunks", "1", "--local-chunks", "3"],  # 112
        "sink1": ["--sink-chunks", "1"],  # 52 groups of 16
        "gs8": ["--group-size", "8"],  # 96
    }
    items: list[tuple[str, list[str]]] = []
    for n in (8192, 4096):  # 1. NLL at the default budget; Quest's pages stay 16 tokens, so its rows are sink1's
        for name in ("gs8_sink1", "gs8_local3", "gs8_sink1_local3"):
            items.append((f"nll_b1216_{n}_{name}", ["--lengths", str(n), "--methods", "dense,hga", *variants[name],
                                                    *REFERENCE]))
        items.append((f"nll_b1216_{n}_sink1", ["--lengths", str(n), "--methods", "dense,hga,quest,oracle",
                                               *variants["sink1"], *REFERENCE]))
    items.append(("nll_b1216_4096_gs8_sink1_kernels", ["--lengths", "4096", "--methods", "dense,hga",
                                                       *variants["gs8_sink1"], "--backend", "triton"]))
    for name in ("gs8_sink1", "sink1"):  # 2. the task suite and needles, one variant per item
        items.append((f"tasks_b1216_{name}", [*TASK_SUITE, "--methods", "hga", *variants[name], *REFERENCE]))
        items.append((f"needles_b1216_{name}", [*NEEDLE_GRID, "--methods", "hga", *variants[name], *REFERENCE]))
    items.append(("tasks_b1216_sink1_quest", [*TASK_SUITE, "--methods", "quest", *variants["sink1"], *REFERENCE]))
    items.append(("tasks_b1216_gs8", [*TASK_SUITE, "--methods", "hga", *variants["gs8"], *REFERENCE]))
    items.append(("tasks_b1216_gs8_sink1_local3", [*TASK_SUITE, "--methods", "hga", *variants["gs8_sink1_local3"],
                                                   *REFERENCE]))
    items.append(("tasks_b1216_sink1_oracle", [*TASK_SUITE, "--methods", "oracle", *variants["sink1"], *REFERENCE]))
    return items


def above_budget() -> list[tuple[str, list[str]]]:
    """Part 6: the default of part 5 (one sink chunk, 52 groups) above the default budget, beside
    Quest with the same windows (the budget sweeps of parts 1 to 3 had two sink chunks)."""
    return [(f"nll_b{b}_{n}_default", ["--lengths", str(n), "--budget", str(b), "--methods", "dense,hga,quest",
                                       *REFERENCE])
            for b in (1728, 2496) for n in (8192, 4096)]


def accuracy_budget() -> list[tuple[str, list[str]]]:
    """Part 7: two more task seeds at the default budget (84 samples per method, for the target
    "within 2 points of dense"), then needles and the task suite against budget (608 to 2,496
    keys per query) for the default, Quest and the oracle with its windows: parts 1 to 6 measured
    accuracy at 1,216 keys only (about 36 device minutes from the part-5 timings; dense does not
    depend on the budget)."""
    needles = [*NEEDLE_GRID, "--methods", "hga,quest,oracle", *REFERENCE]
    tasks = [*TASK_SUITE, *REFERENCE]
    items = [("tasks_b1216_default_seeds23", [*tasks, "--first-seed", "2", "--methods", "dense,hga,quest"])]
    items += [(f"needles_b{b}_default", ["--budget", str(b), *needles]) for b in (608, 960, 1728, 2496)]
    for b in (960, 1728, 608, 2496):  # the budgets nearest the default first
        items.append((f"tasks_b{b}_default", ["--budget", str(b), "--methods", "hga,quest", *tasks]))
    return items


def robustness() -> list[tuple[str, list[str]]]:
    """Part 8: how much the accuracy targets rest on one prompt per cell, and groups of 8 under a
    first level of groups of 16. The needle grid at the default budget with every needle at
    every cell (36 cells per method, ``--every-needle``: on the CPU the default missed 2 of 4
    cells dense finds when other needles were planted there), one item per method; groups of 8
    with ``max_group_size=16`` (CPU: 8K +0.0193 against the default's +0.0211) on NLL, the
    needle grid (both ways) and the task suite; then seeds 4 and 5 of the task suite (126
    samples per method with parts 5 and 7) and the oracle's seeds 2 and 3. About 35 device
    minutes from the part-7 timings."""
    every = [*NEEDLE_GRID, "--every-needle", *REFERENCE]
    units = ["--group-size", "8", "--max-group-size", "16"]
    items = [(f"needles_b1216_every_{m}", [*every, "--methods", m]) for m in ("hga", "dense")]
    for n in (8192, 4096):
        items.append((f"nll_b1216_{n}_gs8_mg16", ["--lengths", str(n), "--methods", "dense,hga", *units, *REFERENCE]))
    items.append(("needles_b1216_gs8_mg16", [*NEEDLE_GRID, "--methods", "hga", *units, *REFERENCE]))
    items.append(("tasks_b1216_gs8_mg16", [*TASK_SUITE, "--methods", "hga", *units, *REFERENCE]))
    items.append(("needles_b1216_every_gs8_mg16", [*every, "--methods", "hga", *units]))
    items += [(f"needles_b1216_every_{m}", [*every, "--methods", m]) for m in ("quest", "oracle")]
    items.append(("tasks_b1216_default_seeds45", [*TASK_SUITE, "--first-seed", "4", "--methods", "dense,hga,quest",
                                                  *REFERENCE]))
    items.append(("tasks_b1216_oracle_seeds23", [*TASK_SUITE, "--first-seed", "2", "--methods", "oracle", *REFERENCE]))
    return items


def paper_every_needle() -> list[tuple[str, list[str]]]:
    """Part 9: the paper's rule (``HGAConfig.paper()``: summed summaries, 16 chunks, 2 sink and
    8 local chunks) on the every-needle grid of part 8, so that the gain over it is shown on 36
    prompts per method, not on the 12 of the one-needle grid (where it finds 5). About 3 device
    minutes."""
    paper = ["--methods", "hga-sum-sum", "--top-chunks", "16", "--sink-chunks", "2", "--local-chunks", "8"]
    return [("needles_b1216_every_paper", [*NEEDLE_GRID, "--every-needle", *paper, *REFERENCE])]


def narrow_windows() -> list[tuple[str, list[str]]]:
    """Part 10: the same 1,216 keys with a local window narrower than the default's 4 chunks
    (part 4's trend with one sink chunk: 5, 4, 3 local chunks gave +0.0217, +0.0211, +0.0202 at
    8K), no sink chunk, and other first-level widths. NLL at 8K and 4K first (seconds each); then
    needles, every needle and six task seeds for the two likeliest to meet the 8K target while
    keeping the default's accuracy (2 local chunks, 48 chunks at the first level). About 30
    device minutes if every item runs."""
    every = [*NEEDLE_GRID, "--every-needle", *REFERENCE]
    variants = {
        "sink1_local2": ["--local-chunks", "2"],
        "sink1_local1": ["--local-chunks", "1"],
        "tc48": ["--top-chunks", "48"],
        "tc24": ["--top-chunks", "24"],
        "sink1_local2_tc48": ["--local-chunks", "2", "--top-chunks", "48"],
        "sink0": ["--sink-chunks", "0"],
    }
    items: list[tuple[str, list[str]]] = []
    for n in (8192, 4096):  # 1. NLL; Quest and the oracle where the windows are new to them
        for name, flags in variants.items():
            methods = "dense,hga" if name.startswith("tc") else "dense,hga,quest,oracle"
            items.append((f"nll_b1216_{n}_{name}", ["--lengths", str(n), "--methods", methods, *flags, *REFERENCE]))
    for name in ("sink1_local2", "tc48"):  # 2. accuracy for the two likeliest
        items.append((f"needles_b1216_{name}", [*NEEDLE_GRID, "--methods", "hga", *variants[name], *REFERENCE]))
        items.append((f"tasks_b1216_{name}", [*TASK_SUITE, "--methods", "hga", *variants[name], *REFERENCE]))
    for name in ("sink1_local2", "tc48"):  # 3. the same at 36 prompts and 126 samples
        items.append((f"needles_b1216_every_{name}", [*every, "--methods", "hga", *variants[name]]))
        for first in ("2", "4"):
            items.append((f"tasks_b1216_{name}_seeds{first}{int(first) + 1}",
                          [*TASK_SUITE, "--first-seed", first, "--methods", "hga", *variants[name], *REFERENCE]))
    return items


def task_seed_items(name: str, args: list[str], firsts: tuple[str, ...] = ("0", "2", "4")) -> list[tuple[str, list[str]]]:
    """The task suite in items of two seeds each (``{name}_seeds01``, ``_seeds23`` ...), so that
    a call cut short by the device's time limit loses one pair, not the whole suite."""
    return [(f"{name}_seeds{first}{int(first) + 1}", [*TASK_SUITE, "--first-seed", first, *args]) for first in firsts]


def wide_first_level_narrow_window() -> list[tuple[str, list[str]]]:
    """Part 11: accuracy for part 10's one row under 0.02 at 8K (2 local chunks, 48 chunks at the
    first level, 60 groups: +0.0196), in the order that decides soonest whether it can be the
    default: the needle grid, the task suite's six seeds, every needle at every cell. About 16
    device minutes from the part-10 timings."""
    flags = ["--local-chunks", "2", "--top-chunks", "48"]
    items = [("needles_b1216_sink1_local2_tc48", [*NEEDLE_GRID, "--methods", "hga", *flags, *REFERENCE])]
    items += task_seed_items("tasks_b1216_sink1_local2_tc48", ["--methods", "hga", *flags, *REFERENCE])
    items.append(("needles_b1216_every_sink1_local2_tc48",
                  [*NEEDLE_GRID, "--every-needle", "--methods", "hga", *flags, *REFERENCE]))
    return items


def baselines_same_windows() -> list[tuple[str, list[str]]]:
    """Part 12: Quest and the oracle with the windows of the default of 2026-12-04 (1 sink and 2
    local chunks: 60 pages or 960 routed keys), so that the default is compared at the same
    windows on every prompt (parts 1 to 11 gave them 4 local chunks), and the product path
    (Triton kernels, the engine) beside the spec at the new default. Part 11's seed-0/1 Quest
    run was cut short at 39 of 42 samples; it runs again here. About 15 device minutes."""
    flags = ["--local-chunks", "2"]  # the default's windows, stated so that the JSON says them
    baselines = ["--methods", "quest,oracle", *flags, *REFERENCE]
    tasks = task_seed_items("tasks_b1216_baselines_local2", baselines)
    return [tasks[0],
            ("needles_b1216_baselines_local2", [*NEEDLE_GRID, *baselines]),
            ("nll_b1216_4096_kernels_local2", ["--lengths", "4096", "--methods", "dense,hga", "--backend", "triton"]),
            ("needles_b1216_every_baselines_local2", [*NEEDLE_GRID, "--every-needle", *baselines]),
            *tasks[1:]]


def group_rules_at_default() -> list[tuple[str, list[str]]]:
    """Part 13: the default's two group-level rules alone, at the default's windows and first
    level. Part 12's one task sample the default loses to Quest (``multikey`` 2K seed 2) is
    solved by either rule alone and lost by their half-and-half split (CPU, 2026-12-04), so the
    suite runs again with the bound alone at the group level (Quest's rule there), then its NLL
    and needles, then the summed summaries alone. About 12 device minutes."""
    items: list[tuple[str, list[str]]] = []
    for method in ("hga-sum+max_group-bound", "hga-sum+max_group-sum"):
        name = "groups_" + method.rsplit("-", 1)[1]  # the group rule alone: bound or sum
        items += task_seed_items(f"tasks_b1216_{name}", ["--methods", method, *REFERENCE])
        if method.endswith("-bound"):
            for n in ("8192", "4096"):
                items.append((f"nll_b1216_{n}_{name}", ["--lengths", n, "--methods", f"dense,{method}", *REFERENCE]))
            items.append((f"needles_b1216_{name}", [*NEEDLE_GRID, "--methods", method, *REFERENCE]))
    return items


def rank_merge() -> list[tuple[str, list[str]]]:
    """Part 14: the default with ``group_merge="rank"``: the 60 groups of least rank sum under
    the summed summary and the bound, instead of half by each. Part 13 found each rule alone
    winning samples the split loses, and on the CPU the rank merge solves ``multikey`` 2K seed 2
    (+0.86; the split -1.31). The 8K NLL first (it decides whether it can be the default), then
    the task suite, the needles, the 4K NLL (the reference's, then the Triton kernels') and every
    needle at every cell. About 15 device minutes from part 13's timings. The CPU ran the two
    reference NLL items and the needle grid under these file names
    (bench/results/cpu-2026-12-04-rank-merge/, the reference's numbers are the same on both
    machines): DONE=that folder skips them."""
    flags = ["--methods", "hga", "--group-merge", "rank", *REFERENCE]
    nll = {n: (f"nll_b1216_{n}_groups_rank", ["--lengths", n, "--methods", "dense,hga", "--group-merge", "rank",
                                              *REFERENCE]) for n in ("8192", "4096")}
    tasks = task_seed_items("tasks_b1216_groups_rank", flags)
    # The rank kernel at the model's scale: its 4K gap beside the reference's (the plans are the
    # reference's under the interpreter, at small shapes).
    kernels = ("nll_b1216_4096_kernels_groups_rank",
               ["--lengths", "4096", "--methods", "dense,hga", "--group-merge", "rank", "--backend", "triton"])
    return [nll["8192"], tasks[0], ("needles_b1216_groups_rank", [*NEEDLE_GRID, *flags]), nll["4096"], kernels,
            *tasks[1:], ("needles_b1216_every_groups_rank", [*NEEDLE_GRID, "--every-needle", *flags])]


def rank_merge_reserved() -> list[tuple[str, list[str]]]:
    """Part 15: the rank merge with 27 groups reserved to each score (``group_reserve=27``: 27 by
    the sum, 27 by the bound, the last 6 of the 60 by the rank sum). On a CPU screen of 9
    prompts it keeps the two needles the plain rank merge loses (4K and 6K at depth 0.1, by
    margins of +0.11 and +0.04) and gains ``multikey`` 2K seed 2 and 8K seed 0 on the default,
    but loses ``single`` 4K seed 2 and is +0.0088 / +0.0201 at 4K / 8K (docs/fidelity.md,
    section 5). Part 14's order; about 15 device minutes."""
    merge = ["--group-merge", "rank", "--group-reserve", "27"]
    flags = ["--methods", "hga", *merge, *REFERENCE]
    nll = {n: (f"nll_b1216_{n}_groups_rank_r27", ["--lengths", n, "--methods", "dense,hga", *merge, *REFERENCE])
           for n in ("8192", "4096")}
    tasks = task_seed_items("tasks_b1216_groups_rank_r27", flags)
    return [nll["8192"], tasks[0], ("needles_b1216_groups_rank_r27", [*NEEDLE_GRID, *flags]), nll["4096"], *tasks[1:],
            ("needles_b1216_every_groups_rank_r27", [*NEEDLE_GRID, "--every-needle", *flags])]


#: The sweeps by ``--part``.
QUEUES = {1: first_sweep, 2: followup, 3: split_groups, 4: windows, 5: fine_groups, 6: above_budget,
          7: accuracy_budget, 8: robustness, 9: paper_every_needle,
          10: narrow_windows, 11: wide_first_level_narrow_window, 12: baselines_same_windows,
          13: group_rules_at_default, 14: rank_merge,
          15: rank_merge_reserved}


def finished(path: Path) -> bool:
    """Whether an item's JSON exists and holds its final rows (``kvtier eval`` marks its last write)."""
    try:
        return bool(json.loads(path.read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def pending(items: list[tuple[str, list[str]]], state: Path, done: list[Path]) -> list[tuple[str, list[str]]]:
    """The items still to run: those with no finished JSON in ``state`` (this machine's earlier
    calls) nor in any ``done`` folder (an earlier session's results, committed under bench/results)."""
    return [(name, argv) for name, argv in items
            if not any(finished(folder / f"{name}.json") for folder in (state, *done))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=Path("/tmp/kvtier-fid"))
    parser.add_argument("--seconds", type=float, default=540.0)
    parser.add_argument("--out", type=Path, default=None, help="folder for a tar of every JSON and log so far")
    parser.add_argument("--model", default="smollm2", help="passed to kvtier eval (a tiny model folder to try the queue)")
    parser.add_argument("--part", type=int, choices=sorted(QUEUES), default=max(QUEUES), help="which sweep (see QUEUES; default the newest)")
    parser.add_argument("--done", type=Path, action="append", default=[],
                        help="a folder of finished item JSON from an earlier session: those items are skipped (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the items still to run, in order, and stop")
    args = parser.parse_args()
    todo = pending(QUEUES[args.part](), args.state, args.done)
    if args.list:
        for name, argv in todo:
            print(name, " ".join(argv))
        return 0
    args.state.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.seconds
    for name, argv in todo:
        path = args.state / f"{name}.json"
        left = deadline - time.monotonic()
        if left < 20:
            print(f"[queue] out of time before {name}", flush=True)
            break
        cmd = [sys.executable, "-m", "kvtier", "eval", "--model", args.model, *argv, "--json", str(path), "--out", str(args.state)]
        print(f"[queue] {name}: {' '.join(cmd[3:])} ({left:.0f} s left)", flush=True)
        t0 = time.monotonic()
        with open(args.state / f"{name}.log", "w") as log:
            try:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=left).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        print(f"[queue] {name}: exit {code} after {time.monotonic() - t0:.0f} s", flush=True)
        log_tail = (args.state / f"{name}.log").read_text().splitlines()[-3:]
        print("\n".join("    " + line for line in log_tail), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.out / "fidelity.tar.gz", "w:gz") as tar:
            for p in sorted(args.state.glob("*.json")) + sorted(args.state.glob("*.log")):
                tar.add(p, arcname=p.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
