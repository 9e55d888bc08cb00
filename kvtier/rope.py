"""RoPE as the model computes it: per-pair frequencies, layout and magnitude, one definition.

HGA's mixed-RoPE summaries need, for every rotated pair of head dims, the frequency the
model rotates it by, and which dims pair up; nothing else about the position encoding.
:class:`RopeSpec` holds exactly that, and the reference (:mod:`kvtier.reference.rope`,
:mod:`kvtier.reference.summaries`, :func:`kvtier.reference.hga_attention`), the kernel path
(:func:`kvtier.hga_attention`, which passes summaries to the kernels) and the
transformers integration all take their frequencies from one.

Layout. Pair i of a spec with rotary dim R (``R <= D``) is dims ``(i, i + R/2)`` of the
first R dims (the ``rotate_half`` convention: Llama, Qwen, Gemma, Phi-3, gpt-oss) or, with
``interleaved``, dims ``(2i, 2i + 1)`` (GLM). Dims ``R .. D-1`` carry no position.

:func:`rope_spec_of` reads the frequencies from transformers itself: it builds the model's
own rotary-embedding module from the config (transformers' RoPE initialisation functions
run inside it), takes its ``original_inv_freq`` and ``attention_scaling``, and checks the
layout by rotating a probe vector with the model's own ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import ConfigError

__all__ = ["RopeSpec", "rope_spec_of", "SUPPORTED_ROPE_TYPES"]

#: ``rope_type`` values :func:`rope_spec_of` accepts. "dynamic" only while the context stays
#: within ``max_position_embeddings`` (its frequencies are the unscaled ones there and change
#: with the length beyond); "longrope" in either regime (short factors up to
#: ``original_max_position_embeddings``, long factors beyond), never across the switch.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """Per-pair RoPE frequencies of one attention layer, and where they hold.

    Attributes
    ----------
    head_dim : int
        D, the size of one head's query/key vector.
    inv_freq : Tensor ``[R/2]`` float64 (CPU)
        Angle per position of each rotated pair, ``R = 2 * len(inv_freq) <= D``.
    attention_scaling : float
        Factor the model multiplies cos and sin by (YaRN's and longrope's magnitude
        factor; 1.0 otherwise): post-RoPE rotated dims are ``attention_scaling * R(p) x``,
        the position-free dims stay ``x``.
    interleaved : bool
        Pairs are dims ``(2i, 2i + 1)`` instead of ``(i, i + R/2)``.
    rope_type : str
        Name of the scheme the frequencies come from (for messages).
    min_seq_len, max_seq_len : int, int or None
        Context lengths (tokens, ``max position + 1``) for which the model uses these
        frequencies; outside them it uses others (longrope's switch, dynamic NTK growth).
    """

    head_dim: int
    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    interleaved: bool = False
    rope_type: str = "default"
    min_seq_len: int = 0
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.inv_freq, torch.Tensor) or self.inv_freq.dim() != 1:
            raise TypeError(f"inv_freq: expected a 1-D tensor, got {type(self.inv_freq).__name__}")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"head_dim: expected a positive int, got {self.head_dim!r}")
        if 2 * self.inv_freq.numel() > self.head_dim:
            raise ValueError(
                f"inv_freq: expected at most head_dim / 2 = {self.head_dim // 2} pairs, got {self.inv_freq.numel()}"
            )
        if not self.attention_scaling > 0:
            raise ValueError(f"attention_scaling: expected a positive number, got {self.attention_scaling}")
        object.__setattr__(self, "inv_freq", self.inv_freq.detach().to("cpu", torch.float64))

    @classmethod
    def plain(cls, head_dim: int, theta: float) -> RopeSpec:
        """Unscaled RoPE over the whole head: ``inv_freq[i] = theta ** (-i / (D/2))``, in float64."""
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim: expected an even number, got {head_dim}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"rope_theta: expected a positive number, got {theta!r}")
        i = torch.arange(head_dim // 2, dtype=torch.float64)
        return cls(head_dim, float(theta) ** (-i / (head_dim // 2)))

    @property
    def rotary_dim(self) -> int:
        """R, the number of rotated dims (the first R of the head)."""
        return 2 * self.inv_freq.numel()

    def dim_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Frequency of every head dim ``[D]`` float64 (0 for the position-free dims)."""
        return self.pair_to_dims(self.inv_freq, 0.0).to(device)

    def pair_to_dims(self, per_pair: torch.Tensor, fill: float | bool) -> torch.Tensor:
        """Spread ``per_pair [..., R/2]`` over the head dims ``[..., D]``; ``fill`` for dims R..D-1."""
        both = per_pair.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((per_pair, per_pair), dim=-1)
        rest = per_pair.new_full((*per_pair.shape[:-1], self.head_dim - self.rotary_dim), fill)
        return torch.cat((both, rest), dim=-1)

    def partner(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., D]`` -> the vector whose dim j is ``-x[pair mate]`` (first of a pair) or ``+x[mate]``.

        ``x * cos + partner(x) * sin`` is the rotation; position-free dims get 0.
        """
        r = self.rotary_dim
        rot = x[..., :r]
        if self.interleaved:
            mate = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            mate = torch.cat((-x2, x1), dim=-1)
        return torch.cat((mate, torch.zeros_like(x[..., r:])), dim=-1)

    def check_context(self, seq_len: int) -> None:
        """Raise :class:`ConfigError` if the model would use other frequencies at ``seq_len`` tokens."""
        if seq_len < self.min_seq_len or (self.max_seq_len is not None and seq_len > self.max_seq_len):
            hi = "any" if self.max_seq_len is None else str(self.max_seq_len)
            raise ConfigError(
                f"rope_type {self.rope_type!r}: expected a context of {self.min_seq_len} to {hi} tokens "
                f"(where the model's RoPE frequencies are fixed), got {seq_len}"
            )

    def __repr__(self) -> str:
        return (
            f"RopeSpec(rope_type={self.rope_type!r}, head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"interleaved={self.interleaved}, attention_scaling={self.attention_scaling:.6g}, "
            f"seq_len=[{self.min_seq_len}, {self.max_seq_len}])"
        )


# --------------------------------------------------------------------------- from transformers


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _is_rotary(module: Any) -> bool:
    return hasattr(module, "original_inv_freq") or any(
        name.endswith("_original_inv_freq") for name, _ in module.named_buffers(recurse=False)
    )


def _rotary_class_in(module_name: str, config: Any) -> type:
    """The text rotary-embedding class of a transformers modeling module."""
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(f"RoPE: expected a transformers modeling module {module_name}, found none") from None
    names = [n for n in dir(mod) if n.endswith("RotaryEmbedding") and not any(w in n for w in ("Vision", "Audio", "Video"))]
    prefix = type(config).__name__.removesuffix("Config")
    names.sort(key=lambda n: (not n.startswith(prefix), len(n)))  # "Gemma3Text..." before "Gemma3..."
    if not names:
        raise ConfigError(f"RoPE: expected a rotary embedding class in {module_name}, found none")
    return getattr(mod, names[0])


def _rotary_source(source: Any) -> tuple[Any, type]:
    """(text config, rotary-embedding class) of a model, an attention module or a config."""
    if isinstance(source, torch.nn.Module):
        for m in source.modules():
            if _is_rotary(m) and hasattr(m, "config"):
                return m.config, type(m)
        config = getattr(source, "config", None)
        if config is None:
            raise ConfigError(f"RoPE: expected a transformers model or config, got {type(source).__name__}")
        return _text_config(config), _rotary_class_in(type(source).__module__, _text_config(config))
    config = _text_config(source)
    module = type(config).__module__
    if ".configuration_" not in module:
        raise ConfigError(f"RoPE: expected a transformers model or config, got {type(source).__name__}")
    return config, _rotary_class_in(module.replace(".configuration_", ".modeling_"), config)


def _layer_kind(rotary: Any, layer_type: str | None) -> tuple[str, str | None]:
    """(rope_type, the per-layer-type key or None) of the layers HGA serves."""
    kinds = rotary.rope_type
    if not isinstance(kinds, dict):
        return str(kinds), None
    key = layer_type or "full_attention"
    if key not in kinds:
        raise ConfigError(f"RoPE: expected layer type {key!r} among {sorted(kinds)}, got none")
    return str(kinds[key]), key


def _probe_layout(rotary: Any, key: str | None, spec: RopeSpec) -> bool:
    """Whether the model's own ``apply_rotary_pos_emb`` pairs dims as ``spec`` says (True) or the other way."""
    from kvtier.reference.rope import apply_rope

    mod = sys.modules[type(rotary).__module__]
    apply_fn = getattr(mod, "apply_rotary_pos_emb", None)
    if apply_fn is None:
        raise ConfigError(f"RoPE: expected apply_rotary_pos_emb in {mod.__name__}, found none")
    limit = spec.max_seq_len or 64
    pos = torch.tensor([p for p in (0, 1, 2, 3, 5, 8, 13, 21, 34, 55) if p < limit])
    q = torch.randn(1, 1, pos.numel(), spec.head_dim, generator=torch.Generator().manual_seed(0))
    kw = {"layer_type": key} if key is not None and "layer_type" in inspect.signature(rotary.forward).parameters else {}
    with torch.no_grad():
        cos, sin = rotary(q, pos[None], **kw)
        got = apply_fn(q, q, cos, sin)[0].double()
    for interleaved in (spec.interleaved, not spec.interleaved):
        cand = RopeSpec(spec.head_dim, spec.inv_freq, spec.attention_scaling, interleaved, spec.rope_type,
                        spec.min_seq_len, spec.max_seq_len)  # fmt: skip
        if float((apply_rope(q.double(), pos, cand) - got).abs().max()) < 1e-4:
            return interleaved
    raise ConfigError(
        f"RoPE layout of {mod.__name__}: expected pairs (i, i + R/2) or (2i, 2i + 1) over the first R dims "
        "rotated by the model's inv_freq, got neither"
    )


# Families whose full-attention layers apply no RoPE at all (the module skips apply_rotary_pos_emb).
_NOPE_FULL_LAYERS = ("cohere2",)


def _position_free(config: Any, layer_type: str | None, layer_idx: int | None) -> bool:
    """Whether the layer asked for applies no RoPE (Cohere2's full layers, SmolLM3's ``no_rope_layers``)."""
    if layer_idx is not None and getattr(config, "no_rope_layers", None):
        return not config.no_rope_layers[layer_idx]
    if getattr(config, "model_type", None) in _NOPE_FULL_LAYERS:
        types = getattr(config, "layer_types", None)
        kind = types[layer_idx] if (layer_idx is not None and types) else (layer_type or "full_attention")
        return kind == "full_attention"
    return False


def rope_spec_of(
    source: Any, *, layer_type: str | None = None, seq_len: int | None = None, layer_idx: int | None = None
) -> RopeSpec:
    """The RoPE frequencies a transformers model uses in its full-attention layers.

    Parameters
    ----------
    source : transformers.PreTrainedModel, an attention module, or a PretrainedConfig
        Its rotary-embedding class is built afresh from the config (the model's own
        buffers are never touched), so the frequencies are transformers' own.
    layer_type : str, optional
        Key of ``rope_parameters`` for models with one RoPE per layer type (Gemma-3);
        "full_attention" when omitted.
    seq_len : int, optional
        Context length in use (max position + 1); picks longrope's short or long factors
        and checks that dynamic NTK is within ``max_position_embeddings``.
    layer_idx : int, optional
        The layer asked for, for families whose layers differ: a layer without RoPE
        (Cohere2's full-attention layers, SmolLM3's ``no_rope_layers``) gets a spec with no
        rotated dims.

    Returns
    -------
    RopeSpec

    Raises
    ------
    ConfigError
        A ``rope_type`` outside :data:`SUPPORTED_ROPE_TYPES`, dynamic NTK past
        ``max_position_embeddings``, a layout other than half-split or interleaved pairs over
        the first R dims (multi-head latent attention), or a source that is not a
        transformers decoder.
    """
    config, rotary_cls = _rotary_source(source)
    if getattr(config, "qk_rope_head_dim", None) is not None:
        raise ConfigError(
            f"multi-head latent attention (DeepSeek-V2/V3 style, qk_rope_head_dim={config.qk_rope_head_dim}): expected "
            "RoPE over the first R dims of a query/key head, got RoPE on a separate tail of each head; not served"
        )
    if _position_free(config, layer_type, layer_idx):
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        return RopeSpec(head_dim, torch.zeros(0, dtype=torch.float64), rope_type="none")
    try:
        rotary = rotary_cls(config)
    except Exception as exc:  # a config the class cannot build is not a model we can serve
        raise ConfigError(f"RoPE: expected {rotary_cls.__name__} to build from the config, got {exc}") from None
    kind, key = _layer_kind(rotary, layer_type)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_type: expected one of {SUPPORTED_ROPE_TYPES}, got {kind!r}")
    prefix = f"{key}_" if key is not None else ""
    inv = getattr(rotary, f"{prefix}original_inv_freq")
    scaling = float(getattr(rotary, f"{prefix}attention_scaling", getattr(rotary, "attention_scaling", 1.0)))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    lo, hi, orig = 0, None, None
    if kind == "dynamic":
        hi = int(rotary.original_max_seq_len)
    elif kind == "longrope":
        params = config.rope_parameters[key] if key is not None else config.rope_parameters
        orig = int(params["original_max_position_embeddings"])
        if seq_len is not None and seq_len > orig:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            kw = {"layer_type": key} if key is not None else {}
            inv, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=orig + 1, **kw)  # the long factors
            lo = orig + 1
        else:
            hi = orig
    if seq_len is not None:
        RopeSpec(head_dim, inv, scaling, False, kind, lo, hi).check_context(seq_len)
    # The probe runs the fresh rotary module at positions where it uses its initial frequencies.
    short_hi = orig if kind == "longrope" else hi
    probe = RopeSpec(head_dim, getattr(rotary, f"{prefix}original_inv_freq"), scaling, False, kind, 0, short_hi)
    return RopeSpec(head_dim, inv, scaling, _probe_layout(rotary, key, probe), kind, lo, hi)
