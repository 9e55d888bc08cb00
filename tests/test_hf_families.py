"""The model families people run, through transformers with attn_implementation="hga" (CPU, float32).

Each family is a tiny random-weight config with its real RoPE and layer settings
(tests/families.py). The context (200 tokens) is longer than the sliding window (48) and
than 2 x (sinks + local) chunks (96), so sliding layers really slide and HGA really routes.
:data:`SUPPORT` is the support matrix; docs/hf.md carries it verbatim
(``test_docs_carry_the_support_matrix``; regenerate with ``python -m tests.test_hf_families``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvtier.hf  # noqa: E402  (registers "hga")
import kvtier.hf_layers  # noqa: E402
from kvtier import HGAConfig, StoreConfig  # noqa: E402
from kvtier.errors import ConfigError  # noqa: E402

from .families import FAMILIES, WINDOW, family_config, family_model, padded_batch  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]

SMALL = dict(chunk_size=16, group_size=4, sink_chunks=1, local_chunks=2)
FULL = HGAConfig.full_coverage(**SMALL)
SPARSE = HGAConfig(**SMALL, top_chunks=2, top_groups=3, fetch_groups=4)
LENGTH = 200

#: family -> (RoPE, layers, status). status "hga": HGA on every full-attention layer, exact
#: windowed attention on sliding ones; "hga-torch:<feature>": the same, with sinks / soft-capping that the
#: HGA reference and the engine's torch flow have and the kernels not (torch ops on CUDA too); "exact": no
#: layer for HGA (every layer sliding), exact windowed attention everywhere; "refused: ..." a ConfigError naming it.
SUPPORT: dict[str, tuple[str, str, str]] = {
    "llama3.1": ("llama3", "full", "hga"),
    "qwen2.5-yarn": ("yarn", "full", "hga"),
    "gemma3": ("linear (full), default (sliding)", "sliding + full (1:1 here, 5:1 real)", "hga"),
    "phi3-longrope": ("longrope (short and long factors)", "full", "hga"),
    "phi4mini-partial": ("longrope, partial rotary 0.75", "full", "hga"),
    "glm4-partial": ("default, interleaved pairs, partial rotary 0.5", "full", "hga"),
    "cohere2": ("default interleaved (sliding), none (full)", "sliding + full", "hga"),
    "llama-dynamic": ("dynamic NTK within max_position_embeddings", "full", "hga"),
    "mistral-v0.1": ("default", "all sliding", "exact"),
    "gpt-oss": ("yarn", "sliding + full, attention sinks", "hga-torch:attention sinks"),
    "gemma2": ("default", "sliding + full, logit soft-capping", "hga-torch:logit soft-capping"),
}


def _reference_impl(name: str) -> str:
    """The implementation HGA is compared with: sdpa, or eager where the family has no sdpa."""
    return "eager" if name in ("gpt-oss", "gemma2") else "sdpa"


def _logits(model: torch.nn.Module, impl: str, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 96, (1, LENGTH), generator=torch.Generator().manual_seed(1))


SERVED = [n for n, (_, _, status) in SUPPORT.items() if not status.startswith("refused")]


def test_every_family_is_in_the_matrix() -> None:
    assert sorted(SUPPORT) == sorted(FAMILIES)


@pytest.mark.parametrize("name", SERVED)
def test_full_coverage_equals_the_model(name: str, ids: torch.Tensor) -> None:
    """Budgets covering the context: logits equal sdpa to 1e-4 and greedy tokens are identical."""
    model = family_model(name)
    ref = _logits(model, _reference_impl(name), ids)
    prompt = ids[:, :150]
    dense = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    stats = kvtier.hf.configure(model, hga=FULL)
    got = _logits(model, "hga", ids)
    assert (got - ref).abs().max().item() < 1e-4
    assert (stats.queries > 0) == (SUPPORT[name][2] != "exact")  # HGA layers ran (none in an all-sliding model)
    hga = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert torch.equal(hga, dense)


@pytest.mark.parametrize("name", SERVED)
def test_sparse_budgets_route_and_stay_causal(name: str, ids: torch.Tensor) -> None:
    """Sparse budgets: changing tokens from 150 on leaves earlier logits bit-identical; output differs from dense."""
    model = family_model(name)
    dense = _logits(model, _reference_impl(name), ids)
    stats = kvtier.hf.configure(model, hga=SPARSE)
    a = _logits(model, "hga", ids)
    changed = ids.clone()
    changed[:, 150:] = (changed[:, 150:] + 7) % 93 + 3
    b = _logits(model, "hga", changed)
    assert torch.equal(a[:, :150], b[:, :150])
    if SUPPORT[name][2] != "exact":
        assert stats.density < 0.8  # routing is active
        assert (a - dense).abs().max().item() > 1e-3
    else:  # no full-attention layer: exact windowed attention, whatever the budgets
        assert stats.queries == 0
        assert (a - dense).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["gpt-oss", "gemma2"])
def test_sinks_and_softcap_reach_hga_layers(name: str, ids: torch.Tensor) -> None:
    """gpt-oss sinks / Gemma-2 soft-capping on full layers: HGA applies them (dropping them breaks exactness).

    Random tiny weights give logits far below Gemma-2's cap of 50: a cap of 0.01 makes it bite here.
    """
    model = family_model(name, **({"attn_logit_softcapping": 0.01} if name == "gemma2" else {}))
    ref = _logits(model, "eager", ids)
    kvtier.hf.configure(model, hga=FULL)
    full_layer = model.model.layers[1].self_attn
    if name == "gpt-oss":
        saved = full_layer.sinks.data.clone()
        full_layer.sinks.data.fill_(-1e4)  # sinks that take no mass: what ignoring them would compute
    else:
        saved = full_layer.attn_logit_softcapping
        full_layer.attn_logit_softcapping = None
    without = _logits(model, "hga", ids)
    if name == "gpt-oss":
        full_layer.sinks.data.copy_(saved)
    else:
        full_layer.attn_logit_softcapping = saved
    assert (_logits(model, "hga", ids) - ref).abs().max().item() < 1e-4
    assert (without - ref).abs().max().item() > 1e-3


def _drop_logit_feature(model: torch.nn.Module, name: str) -> None:
    """What ignoring gpt-oss's sinks / Gemma-2's soft-capping on the full layer would compute."""
    full_layer = model.model.layers[1].self_attn
    if name == "gpt-oss":
        full_layer.sinks.data.fill_(-1e4)  # sinks that take no mass
    else:
        full_layer.attn_logit_softcapping = None


@pytest.mark.parametrize("name", ["gpt-oss", "gemma2"])
def test_tiered_cache_applies_sinks_and_softcap(name: str, ids: torch.Tensor) -> None:
    """gpt-oss sinks / Gemma-2 soft-capping through TieredCache (the engine's torch flow), fed in pieces: full
    coverage = eager (1e-4), sparse budgets = the cache-less path (1e-5); dropping the feature breaks both."""
    extra = {"attn_logit_softcapping": 0.01} if name == "gemma2" else {}  # a cap that bites on random weights
    model = family_model(name, **extra)
    ref = _logits(model, "eager", ids)
    kvtier.hf.configure(model, hga=SPARSE)
    cacheless = _logits(model, "hga", ids)

    def tiered(m: torch.nn.Module, cfg: HGAConfig) -> torch.Tensor:
        with kvtier.hf.TieredCache(m, hga=cfg, store=StoreConfig(gpu_bytes=0)) as cache:
            assert cache.logit_features == (SUPPORT[name][2].split(":", 1)[1],)
            out = torch.cat([_logits(m, "hga", ids[:, a:b], **kvtier.hf.cache_kwargs(m, cache))
                             for a, b in ((0, 70), (70, 71), (71, LENGTH))], dim=1)  # fmt: skip
            assert cache.stats()["engine"]["backend"] == "torch"
            return out

    assert (tiered(model, FULL) - ref).abs().max().item() < 1e-4
    sparse = tiered(model, SPARSE)
    assert (sparse - cacheless).abs().max().item() < 1e-5
    _drop_logit_feature(model, name)
    assert (tiered(model, FULL) - ref).abs().max().item() > 1e-3
    assert (tiered(model, SPARSE) - cacheless).abs().max().item() > 1e-3


def test_kernels_refuse_sinks_and_softcap_by_name() -> None:
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    with pytest.raises(ValueError, match="backend='triton': expected no sinks and no softcap"):
        kvtier.hga_attention(q, k, k, config=FULL, rope_theta=1e4, sinks=torch.zeros(4), backend="triton")
    with pytest.raises(ValueError, match=r"sinks: expected a tensor \[4\]"):
        kvtier.hga_attention(q, k, k, config=FULL, rope_theta=1e4, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="softcap: expected a positive number"):
        kvtier.hga_attention(q, k, k, config=FULL, rope_theta=1e4, softcap=-1.0)


def test_sliding_layers_keep_their_window(ids: torch.Tensor) -> None:
    """Mistral v0.1: the window is applied (dropping it would change the logits past 48 tokens)."""
    model = family_model("mistral-v0.1")
    windowed = _logits(model, "hga", ids)
    unwindowed = family_model("mistral-v0.1", sliding_window=None)
    kvtier.hf.configure(unwindowed, hga=FULL)
    full = _logits(unwindowed, "hga", ids)
    assert torch.equal(windowed[:, :WINDOW], full[:, :WINDOW])
    assert (windowed[:, WINDOW:] - full[:, WINDOW:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["gemma3", "cohere2"])
def test_tiered_cache_serves_hybrid_models(name: str, ids: torch.Tensor) -> None:
    """Gemma-3 / Cohere2 through TieredCache: sliding layers keep transformers' window layer (exact), full layers
    HGA over the store. Full coverage = sdpa; sparse, fed in pieces = the cache-less path; greedy tokens = sdpa."""
    model = family_model(name)
    ref = _logits(model, "sdpa", ids)
    with kvtier.hf.TieredCache(model, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
        assert cache.layer_types == ("sliding_attention", "full_attention")
        got = torch.cat([_logits(model, "hga", ids[:, a:b], **kvtier.hf.cache_kwargs(model, cache))
                         for a, b in ((0, 70), (70, 71), (71, LENGTH))], dim=1)  # fmt: skip
        assert cache.get_seq_length() == LENGTH
        stats = cache.stats()  # of the full-attention layer (layer 0 is sliding: it never reaches the engine)
        assert (stats["tokens"], stats["closed_chunks"], stats["engine"]["tokens"]) == (LENGTH, LENGTH // 16, LENGTH)
    assert (got - ref).abs().max().item() < 1e-4
    kvtier.hf.configure(model, hga=SPARSE)
    cacheless = _logits(model, "hga", ids)
    with kvtier.hf.TieredCache(model, hga=SPARSE, store=StoreConfig(gpu_bytes=0)) as cache:
        got = torch.cat([_logits(model, "hga", ids[:, a:b], **kvtier.hf.cache_kwargs(model, cache))
                         for a, b in ((0, 90), (90, LENGTH))], dim=1)  # fmt: skip
        assert cache.stats()["density"] < 0.9
    assert (got - cacheless).abs().max().item() < 1e-5
    prompt = ids[:, :150]
    model.set_attn_implementation("sdpa")
    dense = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    model.set_attn_implementation("hga")
    with kvtier.hf.TieredCache(model, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
        hga = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             **kvtier.hf.cache_kwargs(model, cache))
    assert torch.equal(hga, dense)


@pytest.mark.parametrize("name, match", [
    ("mistral-v0.1", r"expected at least one 'full_attention' layer for HGA, got only sliding-window layers \(window 48\)"),
])
def test_tiered_cache_refusals_name_the_feature(name: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        kvtier.hf.TieredCache(family_config(name), hga=FULL)


def test_phi3_window_that_never_bites_is_full_attention(ids: torch.Tensor) -> None:
    """Phi-3-128k's sliding_window (2x max_position_embeddings) excludes nothing: HGA serves every layer."""
    model = family_model("phi3-longrope", sliding_window=8192)
    ref = _logits(model, "sdpa", ids)
    stats = kvtier.hf.configure(model, hga=FULL)
    assert (_logits(model, "hga", ids) - ref).abs().max().item() < 1e-4
    assert stats.queries == 2 * 4 * LENGTH  # both layers, every head and position


def test_scaling_other_than_head_dim(ids: torch.Tensor) -> None:
    """Gemma-3's query_pre_attn_scalar (24 over head dim 16): exact at full coverage, routes with sparse budgets."""
    model = family_model("gemma3")
    assert model.model.layers[1].self_attn.scaling != 16**-0.5
    ref = _logits(model, "sdpa", ids)
    kvtier.hf.configure(model, hga=FULL)
    assert (_logits(model, "hga", ids) - ref).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- the matrix in the docs


def support_table() -> str:
    """The support matrix as a markdown table (docs/hf.md carries it between markers)."""
    lines = ["| family (tiny config in tests/families.py) | RoPE | layers | status |", "|---|---|---|---|"]
    for name, (rope, layers, status) in SUPPORT.items():
        if status == "hga":
            status = ("served: HGA on full-attention layers, exact windowed attention on sliding ones"
                      if "sliding" in layers else "served: HGA on every layer")
        elif status.startswith("hga-torch:"):
            feature = status.split(":", 1)[1]
            status = (f"served: HGA with its {feature} on full-attention layers (with or without TieredCache), exact "
                      f"windowed attention on sliding ones; the kernels lack {feature}, so on CUDA these layers run "
                      "torch ops (the HGA reference, the engine's torch flow)")
        elif status == "exact":
            status = "served: exact windowed attention on every layer (no full-attention layer for HGA)"
        lines.append(f"| {FAMILIES[name][3]} | {rope} | {layers} | {status} |")
    return "\n".join(lines)


_DOC = Path(__file__).resolve().parents[1] / "docs" / "hf.md"
_BEGIN, _END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"


def test_docs_carry_the_support_matrix() -> None:
    text = _DOC.read_text()
    assert _BEGIN in text and _END in text, "docs/hf.md: support-matrix markers missing"
    body = text.split(_BEGIN, 1)[1].split(_END, 1)[0].strip()
    assert body == support_table(), "docs/hf.md: regenerate the matrix with `python -m tests.test_hf_families`"


if __name__ == "__main__":
    text = _DOC.read_text()
    head, rest = text.split(_BEGIN, 1)
    tail = rest.split(_END, 1)[1]
    _DOC.write_text(f"{head}{_BEGIN}\n{support_table()}\n{_END}{tail}")


# --------------------------------------------------------------------------- padded batches


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["llama3.1", "gemma3"])
def test_padded_batch_rows_equal_each_row_alone(name: str, side: str, ids: torch.Tensor) -> None:
    """Sparse budgets, rows of 150, 97 and 31 tokens: each row's real logits equal that row alone.

    Padding is never attended, routed or summarised (a padding token's K/V cannot reach a real one's
    output), positions are each row's own (generate's attention_mask.cumsum(-1) - 1).
    """
    model = family_model(name)
    stats = kvtier.hf.configure(model, hga=SPARSE)
    rows = [ids[0, :150], ids[0, 20:117], ids[0, 60:91]]
    batch, mask, _ = padded_batch(rows, side)
    if name == "gemma3":  # its sliding layers count the window over indices (as sdpa does): keep rows within it
        rows = [r[:WINDOW] for r in rows]
        batch, mask, _ = padded_batch(rows, side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    together = _logits(model, "hga", batch, attention_mask=mask, position_ids=pos)
    assert stats.density < 1.0 or name == "gemma3"
    for i, r in enumerate(rows):
        alone = _logits(model, "hga", r[None])
        real = mask[i].bool()
        assert (together[i, real] - alone[0]).abs().max().item() < 1e-5, i
    # the padding token ids do not matter: change them, the real logits stay bit-identical
    other = torch.where(mask.bool(), batch, (batch + 5) % 93 + 3)
    again = _logits(model, "hga", other, attention_mask=mask, position_ids=pos)
    assert torch.equal(again[mask.bool()], together[mask.bool()])


def test_padded_generation_equals_each_prompt_alone(ids: torch.Tensor) -> None:
    """Left-padded greedy generation (sparse budgets, transformers' DynamicCache) = each prompt alone."""
    model = family_model("qwen2.5-yarn")
    kvtier.hf.configure(model, hga=SPARSE)
    model.set_attn_implementation("hga")
    prompts = [ids[0, :130], ids[0, 40:107]]
    batch, mask, _ = padded_batch(prompts, "left")
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones_like(p[None]), max_new_tokens=8, do_sample=False)
        assert torch.equal(out[i, batch.shape[1] :], alone[0, p.numel() :]), i


def test_padded_positions_must_be_each_rows_own(ids: torch.Tensor) -> None:
    model = family_model("llama3.1")
    kvtier.hf.configure(model, hga=SPARSE)
    batch, mask, _ = padded_batch([ids[0, :40], ids[0, :25]], "left")
    with pytest.raises(ValueError, match=r"position_ids: expected row 1's real tokens at positions 0..24"):
        _logits(model, "hga", batch, attention_mask=mask)  # arange positions: the padding shifted row 1


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5-yarn", "glm4-partial"])
def test_tiered_cache_with_the_models_rope(name: str, ids: torch.Tensor) -> None:
    """llama3, YaRN, interleaved partial rotary through TieredCache: = sdpa at full coverage, and with sparse
    budgets, fed in pieces, exactly the cache-less path (per-position routing with the same RopeSpec)."""
    model = family_model(name)
    ref = _logits(model, "sdpa", ids)
    with kvtier.hf.TieredCache(model, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
        assert cache.rope.rope_type == SUPPORT[name][0].split(",")[0]
        got = torch.cat([_logits(model, "hga", ids[:, a:b], **kvtier.hf.cache_kwargs(model, cache))
                         for a, b in ((0, 70), (70, 71), (71, LENGTH))], dim=1)  # fmt: skip
    assert (got - ref).abs().max().item() < 1e-4
    kvtier.hf.configure(model, hga=SPARSE)
    cacheless = _logits(model, "hga", ids)
    assert (_pieces(model, ids, SPARSE, (90,)) - cacheless).abs().max().item() < 1e-5


def _pieces(model: torch.nn.Module, ids: torch.Tensor, cfg: HGAConfig, cuts: tuple[int, ...]) -> torch.Tensor:
    """Logits of ``ids`` fed through a fresh TieredCache in pieces split at ``cuts``."""
    bounds = (0, *cuts, ids.shape[1])
    with kvtier.hf.TieredCache(model, hga=cfg, store=StoreConfig(gpu_bytes=0)) as cache:
        return torch.cat([_logits(model, "hga", ids[:, a:b], **kvtier.hf.cache_kwargs(model, cache))
                          for a, b in zip(bounds, bounds[1:])], dim=1)  # fmt: skip


@pytest.mark.parametrize("name", ["phi3-longrope", "phi4mini-partial"])
def test_tiered_cache_serves_longrope_on_one_side_of_the_switch(name: str, ids: torch.Tensor) -> None:
    """longrope (switch at 128 tokens here): a sequence that starts past the switch gets the long factors
    throughout, one that stays below it the short ones; both = sdpa at full coverage and = the cache-less path at
    sparse budgets. A call that crosses the switch is refused by name; generate after a prefill = sdpa."""
    model = family_model(name)
    long_ref, short_ref = _logits(model, "sdpa", ids), _logits(model, "sdpa", ids[:, :120])
    assert (_pieces(model, ids, FULL, (150, 151)) - long_ref).abs().max().item() < 1e-4
    assert (_pieces(model, ids[:, :120], FULL, (60, 61)) - short_ref).abs().max().item() < 1e-4
    kvtier.hf.configure(model, hga=SPARSE)
    for length, cuts in ((LENGTH, (140, 141)), (120, (60, 61))):
        cacheless = _logits(model, "hga", ids[:, :length])
        assert (_pieces(model, ids[:, :length], SPARSE, cuts) - cacheless).abs().max().item() < 1e-5
    with kvtier.hf.TieredCache(model, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
        _logits(model, "hga", ids[:, :100], **kvtier.hf.cache_kwargs(model, cache))
        assert (cache.rope.min_seq_len, cache.rope.max_seq_len) == (0, 128)
        with pytest.raises(ConfigError, match=r"rope_type 'longrope': TieredCache expected every call of a sequence "
                                              r"to stay within the RoPE frequencies it started with \(0 to 128 tokens\), "
                                              r"got a call reaching 140 tokens"):  # fmt: skip
            _logits(model, "hga", ids[:, 100:140], **kvtier.hf.cache_kwargs(model, cache))
    # Phi-3's generate drops a cache at or below the switch once the sequence passes it: prefill first
    prompt = ids[:, :150]
    model.set_attn_implementation("sdpa")
    dense = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    model.set_attn_implementation("hga")
    with kvtier.hf.TieredCache(model, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
        _logits(model, "hga", prompt[:, :-1], **kvtier.hf.cache_kwargs(model, cache))
        hga = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             **kvtier.hf.cache_kwargs(model, cache))  # fmt: skip
        assert cache.get_seq_length() == 157  # the TieredCache served every step
    assert torch.equal(hga, dense)


def test_tiered_cache_serves_dynamic_ntk_within_max_positions(ids: torch.Tensor) -> None:
    """dynamic NTK (max_position_embeddings shrunk to 128): served while the sequence stays within it, refused by
    name at the call that passes it (the model would rescale every frequency) or at a first call past it."""
    model = family_model("llama-dynamic", max_position_embeddings=128)
    assert (_pieces(model, ids[:, :120], FULL, (60, 61)) - _logits(model, "sdpa", ids[:, :120])).abs().max() < 1e-4
    with kvtier.hf.TieredCache(model, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
        _logits(model, "hga", ids[:, :100], **kvtier.hf.cache_kwargs(model, cache))
        with pytest.raises(ConfigError, match=r"rope_type 'dynamic': TieredCache expected every call"):
            _logits(model, "hga", ids[:, 100:140], **kvtier.hf.cache_kwargs(model, cache))
    with kvtier.hf.TieredCache(model, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
        with pytest.raises(ConfigError, match=r"rope_type 'dynamic': expected a context of 0 to 128 tokens"):
            _logits(model, "hga", ids[:, :140], **kvtier.hf.cache_kwargs(model, cache))


def test_tiered_cache_takes_the_model_itself(ids: torch.Tensor) -> None:
    """TieredCache(model) reads model.config (issue 12): same logits as TieredCache(model.config)."""
    model = family_model("llama3.1", rope_parameters=None, rope_theta=1e4)
    ref = _logits(model, "sdpa", ids)
    for source in (model, model.config):
        with kvtier.hf.TieredCache(source, hga=FULL, store=StoreConfig(gpu_bytes=0)) as cache:
            got = _logits(model, "hga", ids, **kvtier.hf.cache_kwargs(model, cache))
        assert (got - ref).abs().max().item() < 1e-4
    with pytest.raises(ConfigError, match="expected a decoder config with heads and layers"):
        kvtier.hf.TieredCache(torch.nn.Linear(2, 2))  # no config at all: a clear error, not an AttributeError


def test_longrope_switch_inside_a_cache_is_refused(ids: torch.Tensor) -> None:
    """Phi-3: keys cached below the pretraining length (128), then a call past it, would mix short- and
    long-factor keys. generate() re-runs the whole sequence at the switch (served, equal to sdpa); a bare
    cache that crosses it is refused."""
    model = family_model("phi3-longrope")
    prompt = ids[:, :120]
    model.set_attn_implementation("sdpa")
    dense = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    kvtier.hf.configure(model, hga=FULL)
    model.set_attn_implementation("hga")
    hga = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(hga, dense)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, **kvtier.hf.cache_kwargs(model, cache))
        with pytest.raises(ConfigError, match=r"rope_type 'longrope': expected a cached context to stay within one"):
            model(ids[:, 120:140], **kvtier.hf.cache_kwargs(model, cache))


def test_other_layer_types_are_refused_by_name() -> None:
    """Llama-4's chunked-attention layers are neither full nor sliding: refused, never run as full attention."""
    cfg = transformers.Llama4TextConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        num_local_experts=2, attention_chunk_size=32)
    with pytest.raises(ConfigError, match=r"layer_types: expected only \('full_attention', 'sliding_attention'\) "
                                          r"layers, got \['chunked_attention'\]"):
        kvtier.hf_layers.layer_types_of(cfg)


def test_dense_method_and_sdpa_agree_on_a_padded_batch(ids: torch.Tensor) -> None:
    """configure(method="dense") over a left-padded batch: the real tokens' logits equal sdpa's with the same mask."""
    model = family_model("llama3.1")
    batch, mask, _ = padded_batch([ids[0, :90], ids[0, 10:43]], "left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = _logits(model, "sdpa", batch, attention_mask=mask, position_ids=pos)
    kvtier.hf.configure(model, method="dense")
    got = _logits(model, "hga", batch, attention_mask=mask, position_ids=pos)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() < 1e-4


def test_rows_of_an_unpadded_batch_must_share_positions(ids: torch.Tensor) -> None:
    model = family_model("llama3.1")
    kvtier.hf.configure(model, hga=SPARSE)
    batch = torch.stack([ids[0, :40], ids[0, 40:80]])
    pos = torch.stack([torch.arange(40), torch.arange(5, 45)])  # row 1 continues elsewhere: not this call's keys
    with pytest.raises(ValueError, match=r"position_ids: expected row 1's real tokens at positions 0..39"):
        _logits(model, "hga", batch, position_ids=pos)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt-oss", "gemma2"])
def test_cuda_sinks_and_softcap(name: str, ids: torch.Tensor) -> None:
    """On the GPU: the reference without a cache, the engine's torch flow with TieredCache (the kernels have
    neither feature); full coverage = eager, sparse TieredCache = the cache-less path."""
    extra = {"attn_logit_softcapping": 0.01} if name == "gemma2" else {}
    model = family_model(name, **extra).to("cuda")
    ids = ids.to("cuda")
    ref = _logits(model, "eager", ids)
    for cfg in (FULL, SPARSE):
        kvtier.hf.configure(model, hga=cfg)
        cacheless = _logits(model, "hga", ids)
        with kvtier.hf.TieredCache(model, hga=cfg, store=StoreConfig(gpu_bytes="64KiB", host_bytes="1MiB")) as cache:
            got = torch.cat([_logits(model, "hga", ids[:, a:b], **kvtier.hf.cache_kwargs(model, cache))
                             for a, b in ((0, 70), (70, 71), (71, LENGTH))], dim=1)  # fmt: skip
            assert cache.stats()["engine"]["backend"] == "torch"
        assert (got - cacheless).abs().max().item() < 1e-4
        if cfg is FULL:
            assert (cacheless - ref).abs().max().item() < 1e-4
