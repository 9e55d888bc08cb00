"""bench/fidelity_queue.py: every item is a valid `kvtier eval` command line, and finished items are skipped."""

from __future__ import annotations

import argparse
import json

import pytest

from kvtier.cli.eval import add_arguments
from tests.bench_scripts import load_bench_script


def _queue_module():
    return load_bench_script("fidelity_queue")


@pytest.mark.parametrize("part", sorted(_queue_module().QUEUES))
def test_every_item_parses_as_kvtier_eval(part: int) -> None:
    q = _queue_module()
    items = q.QUEUES[part]()
    names = [name for name, _ in items]
    assert len(names) == len(set(names))  # one JSON file per item
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for name, argv in items:
        args = parser.parse_args(argv)
        assert args.backend in ("reference", "triton"), name  # the spec, or the kernels beside it
        if "--local-chunks" in argv or "--sink-chunks" in argv or "--budget" not in argv:
            assert f"_b{args.budget or 1216}" in name, name  # the file name says the budget it runs


def test_finished_reads_the_last_write(tmp_path) -> None:
    q = _queue_module()
    path = tmp_path / "item.json"
    assert not q.finished(path)  # not there
    path.write_text("{not json")
    assert not q.finished(path)
    path.write_text(json.dumps({"rows": [], "finished": False}))
    assert not q.finished(path)  # a run cut short
    path.write_text(json.dumps({"rows": [], "finished": True}))
    assert q.finished(path)


def test_pending_skips_items_finished_here_or_in_an_earlier_session(tmp_path) -> None:
    q = _queue_module()
    items = [("a", ["--lengths", "2048"]), ("b", ["--lengths", "4096"]), ("c", ["--lengths", "8192"])]
    state, earlier = tmp_path / "state", tmp_path / "earlier"
    for folder in (state, earlier):
        folder.mkdir()
    (state / "a.json").write_text(json.dumps({"rows": [], "finished": True}))
    (earlier / "b.json").write_text(json.dumps({"rows": [], "finished": True}))
    (earlier / "c.json").write_text(json.dumps({"rows": [], "finished": False}))  # cut short: runs again
    assert [n for n, _ in q.pending(items, state, [])] == ["b", "c"]
    assert [n for n, _ in q.pending(items, state, [earlier])] == ["c"]
