"""bench/routing_rows.py: a row's label names what differs from the paper's configuration, so runs do not merge."""

from __future__ import annotations

from tests.bench_scripts import load_bench_script


def test_labels_name_windows_and_group_size() -> None:
    label = load_bench_script("routing_rows").label
    split = dict(chunk_score="sum+max_group", group_score="sum+bound", top_chunks=32)
    assert label("hga", {"hga": dict(split, sink_chunks=2, local_chunks=4)}) == "hga-sum+max_group-sum+bound tc32 local4"
    assert label("hga", {"hga": dict(split, sink_chunks=1, local_chunks=4)}) == "hga-sum+max_group-sum+bound tc32 sink1 local4"
    # the baselines take the windows from the run's conditions (--sink-chunks), else from HGA's
    assert label("quest", {"sink_chunks": 1, "hga": dict(split, sink_chunks=1, local_chunks=4)}) == "quest sink1 local4"
    assert label("oracle", {"sink_chunks": None, "hga": dict(split, sink_chunks=2, local_chunks=8)}) == "oracle"
    assert label("hga", {"group_size": 8, "hga": dict(split, sink_chunks=2, local_chunks=4)}).endswith("local4 gs8")
    units = dict(split, sink_chunks=1, local_chunks=4, group_size=8, max_group_size=16)
    assert label("hga", {"group_size": 8, "hga": units}).endswith("sink1 local4 gs8 mg16")
    assert label("quest", {"group_size": 8, "hga": units}) == "quest sink1 local4 gs8"  # Quest has no max_group term
    # runs before issue 11 recorded no routing scores, sink chunks nor width: the paper's rule at 16 chunks
    assert label("hga", {}) == "hga (sum) tc16"
    paper = {"top_chunks": 16, "sink_chunks": 2, "local_chunks": 8, "hga": dict(split, sink_chunks=1, local_chunks=4)}  # paper() by flags
    assert label("hga-sum-sum", paper) == label("hga-sum", paper) == "hga (sum) tc16"
    # a budget whose groups need 33 chunks widens the first level; the rule (and its line) stays tc32
    wide = dict(split, sink_chunks=1, local_chunks=4, top_chunks=33, top_groups=132)
    assert label("hga", {"top_chunks": None, "hga": wide}) == "hga-sum+max_group-sum+bound tc32 sink1 local4"
    assert label("hga", {"top_chunks": 16, "hga": dict(wide, top_chunks=16)}).endswith("tc16 sink1 local4")
    # the default of 2026-12-04 records 48 chunks without a flag: its rows are tc48, not tc32
    lead = dict(split, sink_chunks=1, local_chunks=2, top_chunks=48, top_groups=60)
    assert label("hga", {"top_chunks": None, "hga": lead}) == "hga-sum+max_group-sum+bound tc48 sink1 local2"


def test_accuracy_by_budget_counts_complete_grids_only() -> None:
    accuracy_by_budget = load_bench_script("routing_rows").accuracy_by_budget

    def needle(label, budget, length, depth, ok):
        return dict(label=label, budget=budget, length=length, depth=depth, needle_accuracy=ok, task=None, seed=None)

    def task(label, budget, seed, ok):
        return dict(label=label, budget=budget, length=2048, depth=None, needle_accuracy=ok, task="single", seed=seed)

    rows = [needle("hga", b, n, d, float(n == 2048 or b > 960)) for b in (960, 1216) for n in (2048, 4096)
            for d in (0.1, 0.5)]
    rows += [needle("quest", 960, 2048, 0.1, 1.0)]  # half a grid: left out, not counted as 1 of 4
    rows += [needle("other", 960, 2048, 0.1, 1.0)]  # not a requested label
    rows += [dict(needle("hga", 960, 8192, 0.1, 1.0), every_needle=True)]  # another measurement: not a grid cell
    rows += [task("hga", 1216, s, 1.0) for s in (0, 1)] + [task("hga", 1216, 2, 1.0)]  # seed 2 is not counted
    rows += [task("quest", 1216, 0, 0.0), task("quest", 1216, 1, 1.0), task("quest", 960, 0, 1.0)]
    needles, tasks = accuracy_by_budget(rows, ("hga", "quest"))
    assert needles == ({"hga": {960: 2.0, 1216: 4.0}}, 4)
    assert tasks == ({"hga": {1216: 2.0}, "quest": {1216: 1.0}}, 2)
