"""Slow, obviously correct torch implementations: the specification every kernel is tested against."""

from kvtier.reference.attention import dense_attention_ref, expand_kv_heads, masked_attention_ref
from kvtier.reference.hga import (
    HGAStats,
    RouteCarry,
    RoutePlan,
    check_hga_inputs,
    hga_attention,
    hga_decode_ref,
    hga_prefill_ref,
    plan_widths,
    route_block,
)
from kvtier.reference.rope import apply_rope, as_rope_spec, invert_rope, rope_inv_freq, rotate_half
from kvtier.reference.summaries import (
    chunk_summaries_ref,
    group_bounds_ref,
    group_summaries_ref,
    merged_group_keys_ref,
    routing_summaries_ref,
    tokenwise_pairs,
    unit_summaries_ref,
)

__all__ = [
    "hga_attention",
    "hga_prefill_ref",
    "hga_decode_ref",
    "HGAStats",
    "RoutePlan",
    "RouteCarry",
    "plan_widths",
    "route_block",
    "check_hga_inputs",
    "dense_attention_ref",
    "masked_attention_ref",
    "expand_kv_heads",
    "rope_inv_freq",
    "as_rope_spec",
    "apply_rope",
    "invert_rope",
    "rotate_half",
    "tokenwise_pairs",
    "unit_summaries_ref",
    "chunk_summaries_ref",
    "group_summaries_ref",
    "group_bounds_ref",
    "merged_group_keys_ref",
    "routing_summaries_ref",
]
