"""The README's python snippets run as written (given the inputs they name but do not build)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _given(tmp_path: Path) -> dict[str, object]:
    """What the snippets take from the reader: a model folder and its prompt ids; q, k, v."""
    g = torch.Generator().manual_seed(0)
    given: dict[str, object] = {
        "q": torch.randn(1, 4, 300, 64, generator=g),
        "k": torch.randn(1, 2, 300, 64, generator=g),
        "v": torch.randn(1, 2, 300, 64, generator=g),
        "ids": torch.randint(0, 128, (1, 24), generator=g),
    }
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    given["path"] = str(tmp_path / "model")
    return given


def test_readme_has_the_three_snippets() -> None:
    heads = [s.splitlines()[0] for s in _snippets()]
    assert heads == ["import kvtier, kvtier.hf", "from kvtier import HGAConfig, hga_attention", "import torch"]


@pytest.mark.parametrize("index", range(3))
def test_readme_snippet_runs(index, tmp_path, capsys) -> None:
    namespace = _given(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. transformers' past_key_values deprecation
        exec(compile(_snippets()[index], f"README.md snippet {index + 1}", "exec"), namespace)
    if index == 0:
        assert namespace["out"].shape[1] > namespace["ids"].shape[1]
        assert "mean_keys_per_query" in capsys.readouterr().out
    if index == 1:
        assert namespace["out"].shape == namespace["q"].shape and namespace["step"].shape == (1, 4, 1, 64)
    if index == 2:
        assert namespace["failed"] == [] and namespace["missed"] == []
