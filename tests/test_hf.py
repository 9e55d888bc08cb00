"""kvtier.hf on tiny random-config models of each supported family (CPU, float32).

Budgets are scaled down with the models (chunks of 16 tokens, groups of 4) so that a few
hundred tokens exercise sinks, local window, routed chunks and the store's disk tier.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvtier.hf  # noqa: E402  (registers "hga")
from kvtier import HGAConfig, StoreConfig  # noqa: E402
from kvtier.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

VOCAB = 96
SMALL = dict(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2)
FULL = HGAConfig.full_coverage(**SMALL)
SPARSE = HGAConfig(**SMALL, top_chunks=2, top_groups=3, fetch_groups=4)


def tiny_model(family: str, *, theta: float = 1e4, **extra: object) -> torch.nn.Module:
    """2 layers, hidden 64, 4 query heads over 2 KV heads (GQA ratio 2), random weights."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rope_theta=theta, tie_word_embeddings=False,
    )
    common.update(extra)
    cls_name, cfg_name = {
        "llama": ("LlamaForCausalLM", "LlamaConfig"),
        "mistral": ("MistralForCausalLM", "MistralConfig"),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
    }[family]
    if family == "qwen3":
        common["head_dim"] = 16
    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(**common)
    model = getattr(transformers, cls_name)(config).eval()
    model.set_attn_implementation("hga")
    return model


def logits_with(model: torch.nn.Module, impl: str, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return model(ids, **kwargs).logits
    finally:
        model.set_attn_implementation("hga")


def prefill_in_pieces(model: torch.nn.Module, ids: torch.Tensor, cache: kvtier.hf.TieredCache, cuts: list[int]) -> torch.Tensor:
    """Feed ``ids`` through the cache in pieces split at ``cuts``; concatenated logits."""
    out, prev = [], 0
    with torch.no_grad():
        for cut in [*cuts, ids.shape[1]]:
            out.append(model(ids[:, prev:cut], **kvtier.hf.cache_kwargs(model, cache)).logits)
            prev = cut
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 181), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_full_coverage_matches_sdpa(family: str, ids: torch.Tensor) -> None:
    model = tiny_model(family)
    ref = logits_with(model, "sdpa", ids)
    kvtier.hf.configure(model, hga=FULL)
    no_cache = logits_with(model, "hga", ids)
    with kvtier.hf.TieredCache(model.config, hga=FULL, store=StoreConfig(gpu_bytes=0, host_bytes="4MiB")) as cache:
        cached = prefill_in_pieces(model, ids, cache, [37, 100, 101])  # odd cuts, one single token
        assert cache.get_seq_length() == ids.shape[1]
        assert cache.stats()["density"] == pytest.approx(1.0)
    assert (no_cache - ref).abs().max().item() < 1e-4
    assert (cached - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_full_coverage_greedy_tokens_identical(family: str, ids: torch.Tensor) -> None:
    model = tiny_model(family)
    prompt = ids[:, :70]
    model.set_attn_implementation("sdpa")
    dense = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    model.set_attn_implementation("hga")
    with kvtier.hf.TieredCache(model.config, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
        hga = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                             max_new_tokens=24, do_sample=False)
    assert torch.equal(dense, hga)


def test_causal_through_the_model(ids: torch.Tensor) -> None:
    """Changing tokens from position 120 on never changes the logits before it (sparse budgets)."""
    model = tiny_model("llama")
    changed = ids.clone()
    changed[:, 120:] = (changed[:, 120:] + 7) % VOCAB
    kvtier.hf.configure(model, hga=SPARSE)
    a, b = logits_with(model, "hga", ids), logits_with(model, "hga", changed)
    assert torch.equal(a[:, :120], b[:, :120])
    assert not torch.equal(a[:, 120:], b[:, 120:])
    outs = []
    for seq in (ids, changed):
        with kvtier.hf.TieredCache(model.config, hga=SPARSE, store=StoreConfig(gpu_bytes=0)) as cache:
            outs.append(prefill_in_pieces(model, seq, cache, [64]))
    assert torch.equal(outs[0][:, :120], outs[1][:, :120])


@pytest.mark.parametrize("scores", [("sum", "sum"), ("running_max+max_group", "bound")])
def test_sparse_cache_equals_cacheless_hga(ids: torch.Tensor, scores: tuple[str, str]) -> None:
    """Per-position routing: the tiered path, fed in pieces, routes exactly like one pass over the full K/V.

    The cuts fall inside chunks, so a running chunk score crosses them through the routing carry.
    """
    model = tiny_model("qwen2")
    cfg = HGAConfig(**SMALL, top_chunks=2, top_groups=3, fetch_groups=4, chunk_score=scores[0], group_score=scores[1])
    stats = kvtier.hf.configure(model, hga=cfg)
    ref = logits_with(model, "hga", ids)
    with kvtier.hf.TieredCache(model.config, hga=cfg, store=StoreConfig(gpu_bytes=0)) as cache:
        got = prefill_in_pieces(model, ids, cache, [50, 51, 130])
        assert cache.stats()["mean_keys_per_query"] == pytest.approx(stats.mean_keys_per_query)
    assert (got - ref).abs().max().item() < 1e-5
    assert stats.density < 0.8  # the budgets really are sparse at 181 tokens


def test_sparse_generation_spilled_to_disk_is_reproducible(ids: torch.Tensor, tmp_path) -> None:
    model = tiny_model("llama")
    prompt = ids[:, :150]
    layout_chunk_bytes = 2 * 2 * 16 * 16 * 4  # [2, Hkv=2, C=16, D=16] float32
    runs = []
    for run in range(2):
        store = StoreConfig(gpu_bytes=2 * layout_chunk_bytes, host_bytes=8 * layout_chunk_bytes,
                            disk_dir=tmp_path / f"run{run}", disk_bytes="8MiB")
        with kvtier.hf.TieredCache(model.config, hga=SPARSE, store=store) as cache:
            torch.manual_seed(5)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                 max_new_tokens=20, do_sample=False)
            st = cache.stats()["store"]
            assert st["disk"]["chunks"] > 0 and st["disk"]["bytes_read"] > 0  # routed chunks came from disk
            assert st["host"]["used_bytes"] <= 8 * layout_chunk_bytes
        runs.append(out)
    assert torch.equal(runs[0], runs[1])
    kvtier.hf.configure(model, hga=SPARSE)
    model.set_attn_implementation("hga")
    cacheless = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False,
                               max_new_tokens=20, do_sample=False)
    assert torch.equal(runs[0], cacheless)


def test_generation_inside_inference_mode(ids: torch.Tensor, tmp_path) -> None:
    """Runtimes generate inside torch.inference_mode(): the store's I/O threads (prefetch from
    disk) and later calls outside it keep working, with the same tokens as under no_grad."""
    model = tiny_model("llama")
    prompt = ids[:, :150]
    chunk_bytes = 2 * 2 * 16 * 16 * 4
    runs, stats = [], []
    for run, mode in enumerate((torch.inference_mode, torch.no_grad)):
        store = StoreConfig(gpu_bytes=0, host_bytes=12 * chunk_bytes, disk_dir=tmp_path / f"r{run}", disk_bytes="8MiB")
        # Routing wider than what is attended, so the fetch set reaches chunks no query attended yet.
        hga = HGAConfig(**SMALL, top_chunks=4, top_groups=2, fetch_groups=8)
        with kvtier.hf.TieredCache(model.config, hga=hga, store=store) as cache:
            with mode():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                     max_new_tokens=12, do_sample=False)
            with torch.no_grad():  # the same cache, continued outside inference mode
                model(out[:, -1:], **kvtier.hf.cache_kwargs(model, cache))
            stats.append(cache.stats())
        runs.append(out)
    assert torch.equal(runs[0], runs[1])
    st = stats[0]
    assert st["store"]["disk"]["bytes_read"] > 0 and st["prefetch_issued"] > 0
    assert st["prefetch_needed"] == st["prefetch_hits"] + st["disk_waits"]


def test_sampled_generation_is_seeded(ids: torch.Tensor) -> None:
    model = tiny_model("mistral")
    outs = []
    for _ in range(2):
        with kvtier.hf.TieredCache(model.config, hga=SPARSE, store=StoreConfig(gpu_bytes=0)) as cache:
            torch.manual_seed(11)
            outs.append(model.generate(ids[:, :90], attention_mask=torch.ones_like(ids[:, :90]),
                                       past_key_values=cache, max_new_tokens=12, do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1])


def test_batch_of_equal_length_sequences() -> None:
    model = tiny_model("qwen3")
    batch = torch.randint(0, VOCAB, (3, 140), generator=torch.Generator().manual_seed(3))
    with kvtier.hf.TieredCache(model.config, hga=SPARSE, store=StoreConfig(gpu_bytes=0)) as cache:
        together = prefill_in_pieces(model, batch, cache, [64])
    for i in range(3):
        with kvtier.hf.TieredCache(model.config, hga=SPARSE, store=StoreConfig(gpu_bytes=0)) as cache:
            alone = prefill_in_pieces(model, batch[i : i + 1], cache, [64])
        assert (together[i : i + 1] - alone).abs().max().item() < 1e-5


def test_rope_theta_read_from_rope_parameters() -> None:
    model = tiny_model("llama", theta=1e5)
    assert kvtier.hf.rope_theta_of(model.config) == 1e5


def test_rope_scaling_is_refused_by_rope_theta_of_only() -> None:
    """A plain base does not exist for scaled RoPE; TieredCache takes the model's RopeSpec instead."""
    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    with pytest.raises(ConfigError, match="expected plain RoPE"):
        kvtier.hf.rope_theta_of(config)
    assert kvtier.hf.TieredCache(config).rope.rope_type == "linear"


def test_cache_needs_hga_attention(ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    with kvtier.hf.TieredCache(model.config, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
        with torch.no_grad():
            model(ids[:, :20], **kvtier.hf.cache_kwargs(model, cache))  # the first pass cannot tell (nothing cached yet)
            with pytest.raises(RuntimeError, match="attn_implementation='hga'"):
                model(ids[:, 20:30], **kvtier.hf.cache_kwargs(model, cache))


def test_bad_arguments() -> None:
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="expected an HGAConfig"):
        kvtier.hf.TieredCache(model.config, hga={"chunk_size": 16})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected one of"):
        kvtier.hf.configure(model, method="flash")
    cache = kvtier.hf.TieredCache(model.config, hga=FULL, store=StoreConfig(gpu_bytes=0))
    with pytest.raises(ValueError, match=r"expected \[B, 2, L, 16\]"):
        cache.update(torch.zeros(1, 3, 4, 16), torch.zeros(1, 3, 4, 16), 0)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.layers[0].reorder_cache(torch.tensor([0]))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cuda_full_coverage_and_sparse_disk(family: str, ids: torch.Tensor, tmp_path) -> None:
    """On the GPU: exact at full coverage through the kernels and the store, sparse run spilled to disk."""
    model = tiny_model(family).to("cuda")
    ids = ids.to("cuda")
    ref = logits_with(model, "sdpa", ids)
    kvtier.hf.configure(model, hga=FULL)
    assert (logits_with(model, "hga", ids) - ref).abs().max().item() < 1e-4
    with kvtier.hf.TieredCache(model.config, hga=FULL, store=StoreConfig(gpu_bytes="64KiB", host_bytes="1MiB")) as cache:
        assert (prefill_in_pieces(model, ids, cache, [37, 100]) - ref).abs().max().item() < 1e-4
    kvtier.hf.configure(model, hga=SPARSE)  # cache-less: the Triton kernels; cached: torch on CUDA + store
    kernels = logits_with(model, "hga", ids)
    with kvtier.hf.TieredCache(model.config, hga=SPARSE, store=StoreConfig(gpu_bytes="16KiB", host_bytes="1MiB")) as cache:
        assert (prefill_in_pieces(model, ids, cache, [64, 65]) - kernels).abs().max().item() < 1e-4
    prompt = ids[:, :150]
    runs = []
    for run in range(2):
        store = StoreConfig(gpu_bytes="16KiB", host_bytes="32KiB", disk_dir=tmp_path / f"r{run}", disk_bytes="8MiB")
        with kvtier.hf.TieredCache(model.config, hga=SPARSE, store=store) as cache:
            runs.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                       max_new_tokens=16, do_sample=False))
            assert cache.stats()["store"]["disk"]["chunks"] > 0
    assert torch.equal(runs[0], runs[1])
