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
    # runs before issue 11 recorded no routing scores, sink chunks nor width: the paper's rule at 16 chunks
    assert label("hga", {}) == "hga (sum) tc16"
