"""``kvtier eval``: HGA beside dense attention, Quest and oracle top-k on a real model.

For each context length and method, one teacher-forced pass over the first ``length``
tokens of a text gives the mean negative log-likelihood (nats per token) of the last part
of it (``--score-fraction``, default the second half) and the gap to dense attention. All
sparse methods attend the same number of keys per query: HGA's sinks, local window and
current chunk plus ``budget - (sinks + local + 1) * chunk_size`` routed keys (HGA: groups of
16, Quest: pages of 16 ranked by the min/max bound, oracle: the true top keys).

``--needles`` adds a needle-in-a-haystack grid: a sentence ``"<key> <value>."`` is planted at
several depths of the text, the text ends with ``"<key>"`` and a needle counts as found when
the model's greedy choice is the value's token at every step (teacher-forced, the same as
greedy generation producing the value first).

Example (CPU, about 15 to 30 minutes at 8K on 2 cores)::

    kvtier eval --model smollm2 --lengths 2048,4096,8192 --methods dense,hga,quest,oracle --needles --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from kvtier.cli.args import UsageError, nonnegative_int, positive_int
from kvtier.cli.plots import PLOT_HINT, plot_lines
from kvtier.cli.results import add_output_arguments, dense_tokens, output_file, source_commit
from kvtier.config import GROUP_MERGES, HGAConfig
from kvtier.errors import ConfigError

__all__ = ["EvalRow", "NEEDLES", "method_config", "answer_correct", "answer_margin", "needle_cells", "add_arguments", "run", "hga_config_for_budget", "default_budget",
           "sequence_nll", "plant_needle", "markdown_table", "diagnose", "diagnosis_table", "plot_eval"]

METHODS = ("dense", "hga", "quest", "oracle")
#: Method names also accept ``hga-<chunk_score>`` and ``hga-<chunk_score>-<group_score>`` (an HGA routing
#: option, see ``HGAConfig``), e.g. ``hga-max_group``, ``hga-running_max-bound``, ``hga-sum+max_group``.
HGA_PREFIX = "hga-"


def method_config(method: str, hga: HGAConfig) -> tuple[str, HGAConfig]:
    """``(kind, config)`` of a method name: kind is one of METHODS; hga options applied to ``hga``.

    Raises
    ------
    ValueError
        On an unknown method or routing option.
    """
    if method in METHODS:
        return method, hga
    if not method.startswith(HGA_PREFIX) or method.count("-") > 2:
        raise ValueError(f"expected one of {', '.join(METHODS)} or hga-<chunk_score>[-<group_score>], got {method!r}")
    chunk_score, _, group_score = method[len(HGA_PREFIX):].partition("-")
    fields = {**asdict(hga), "chunk_score": chunk_score, "group_score": group_score or "sum"}
    if "max_group" not in chunk_score:  # --max-group-size concerns the rules that have the term
        fields["max_group_size"] = None
    if "+" not in fields["group_score"]:  # --group-merge concerns the rules that rank groups twice
        fields["group_merge"], fields["group_reserve"] = "split", 0
    try:
        return "hga", HGAConfig(**fields)
    except ConfigError as exc:
        raise ValueError(f"{method!r}: {exc}") from None

#: (statement, value, question): the haystack gets ``statement + value + "."``; the prompt ends with
#: ``"Question: <question>\nAnswer: <statement>"`` and the model must copy the value. Values are
#: single rare upper-case words so that a 135M model can copy them (two-word and numeric values
#: failed under dense attention too in a first trial).
NEEDLES: tuple[tuple[str, str, str], ...] = (
    ("The secret word that opens the lighthouse museum door is", " PERIWINKLE",
     "What is the secret word that opens the lighthouse museum door?"),
    ("The name painted on the harbour master's rowing boat is", " MARIGOLD",
     "What is the name painted on the harbour master's rowing boat?"),
    ("The password for the ferry office computer is", " JUNIPER",
     "What is the password for the ferry office computer?"),
)


@dataclass
class EvalRow:
    """One result row (the JSON schema of ``--json``).

    ``needle_accuracy`` is set on needle and task rows (``nats_per_token`` is then None);
    ``depth`` on per-needle rows only; ``task`` and ``seed`` on task-suite rows (``seed`` None:
    the mean over seeds). ``answer_margin`` (per-prompt rows only) is the smallest, over the
    answer's tokens, of the right token's logit minus the best other one: positive when the
    greedy answer is right, and how far it is from turning (a steadier measure than right or
    wrong on one prompt). ``needle`` (per-needle rows only) is the index into
    :data:`NEEDLES` of the needle planted (see :func:`needle_cells`).
    """

    method: str
    length: int
    nats_per_token: float | None
    gap_vs_dense: float | None
    density: float
    mean_keys_per_query: float
    budget: int
    seconds: float
    scored_tokens: int = 0
    needle_accuracy: float | None = None
    depth: float | None = None
    task: str | None = None
    seed: int | None = None
    answer_margin: float | None = None
    needle: int | None = None


def default_budget(config: HGAConfig) -> int:
    """Keys per query of HGA with ``config``: sinks + local window + a full chunk + routed groups."""
    return (config.sink_chunks + config.local_chunks + 1) * config.chunk_size + config.top_groups * config.group_size


def hga_config_for_budget(budget: int, base: HGAConfig | None = None) -> tuple[HGAConfig, int]:
    """HGA configuration attending ``budget`` keys per query (everything counted), and its routed keys.

    Raises
    ------
    ValueError
        If the budget is below the windows, or its routed part is not a whole number of groups.
    """
    from kvtier.reference.baselines import routed_keys_for_budget

    base = HGAConfig() if base is None else base
    routed = routed_keys_for_budget(base, budget)
    if routed % base.group_size:
        raise ValueError(
            f"budget: expected the windows plus a multiple of group_size={base.group_size}, got {budget} "
            f"({routed} routed keys)"
        )
    groups = routed // base.group_size
    chunks = max(base.top_chunks, -(-groups // base.groups_per_chunk))
    fields = {**asdict(base), "top_groups": groups, "top_chunks": chunks,
              "fetch_groups": max(base.fetch_groups, groups)}
    return HGAConfig(**fields), routed


def _backbone(model: Any) -> Any:
    return getattr(model, model.base_model_prefix)


@torch.no_grad()
def sequence_nll(model: Any, ids: torch.Tensor, score_from: int, *, slice_tokens: int = 512) -> tuple[float, int]:
    """Mean NLL in nats of tokens ``score_from + 1 .. L - 1`` given their prefixes, and their count.

    The LM head runs on slices of ``slice_tokens`` positions: full logits at 8K tokens and
    a 49K vocabulary would be 1.6 GB in float32.

    Parameters
    ----------
    model : transformers causal LM (its attention implementation already chosen)
    ids : Tensor ``[1, L]`` int64
    score_from : int
        First position whose next-token prediction is scored.
    """
    hidden = _backbone(model)(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    length = ids.shape[1]
    for s in range(score_from, length - 1, slice_tokens):
        e = min(length - 1, s + slice_tokens)
        logp = torch.log_softmax(head(hidden[:, s:e]).float(), dim=-1)
        target = ids[:, s + 1 : e + 1]
        total -= float(logp.gather(-1, target[..., None]).sum())
        count += target.numel()
    return total / max(count, 1), count


def plant_needle(
    haystack: list[int], tokenizer: Any, needle: tuple[str, str, str], depth: float, length: int
) -> tuple[torch.Tensor, int, int]:
    """Token ids of ``length`` tokens: haystack with the needle at ``depth``, ending in question and answer.

    Returns
    -------
    ids : Tensor ``[1, length]``
    answer_start : int
        Position of the value's first token (the prediction of position ``answer_start - 1``
        must be it).
    answer_len : int
    """
    key, value, question = needle
    planted = tokenizer(f" {key}{value}.", add_special_tokens=False).input_ids
    cue = tokenizer(f"\n\nQuestion: {question}\nAnswer: {key}", add_special_tokens=False).input_ids
    answer = tokenizer(value, add_special_tokens=False).input_ids
    room = length - len(planted) - len(cue) - len(answer)
    if room <= 0 or room > len(haystack):
        raise ValueError(f"length: expected between {len(planted) + len(cue) + len(answer) + 1} and "
                         f"{len(haystack) + len(planted) + len(cue) + len(answer)} tokens, got {length}")
    at = int(round(depth * room))
    for back in range(min(at, 200)):  # plant between sentences, not inside a word
        if tokenizer.decode(haystack[at - back - 1 : at - back]).rstrip(" ").endswith((".", "\n")):
            at -= back
            break
    body = haystack[:at] + planted + haystack[at:room]
    ids = body + cue + answer
    return torch.tensor([ids]), len(body) + len(cue), len(answer)


def _use(model: Any, method: str, hga: HGAConfig, routed: int, backend: str = "auto") -> Any:
    """Switch the model to ``method`` (a name of :func:`method_config`); return the stats accumulator (None for dense)."""
    import kvtier.hf

    kind, cfg = method_config(method, hga)
    if kind == "dense":
        model.set_attn_implementation("sdpa")
        return None
    model.set_attn_implementation(kvtier.hf.ATTN_IMPLEMENTATION)
    return kvtier.hf.configure(model, hga=cfg, method=kind, routed_keys=routed, backend=backend)


def _density_of(stats: Any, length: int) -> tuple[float, float]:
    """``(density, keys per query)``; dense attends the whole causal context, (L + 1) / 2 keys on average."""
    return (1.0, (length + 1) / 2) if stats is None else (stats.density, stats.mean_keys_per_query)


def _is_dense(row: EvalRow, dense_upto: int | None) -> bool:
    """Whether a sparse method's row attended every key (what ran was dense attention)."""
    if row.method == "dense":
        return False
    if row.nats_per_token is not None or row.depth is not None:
        return row.density >= 1.0 - 1e-9
    return dense_upto is not None and row.length <= dense_upto


def markdown_table(rows: list[EvalRow], dense_upto: int | None = None) -> str:
    """Two markdown tables: NLL rows, then needle accuracy per method and length.

    Sparse rows that attended every key are marked ``(= dense)`` and explained below the
    tables; ``dense_upto`` (see :func:`kvtier.cli.results.dense_tokens`) marks needle lengths.
    """
    out = []
    marked = False
    nll = [r for r in rows if r.nats_per_token is not None]
    if nll:
        out.append("| length | method | nats/token | gap vs dense | keys/query | density | seconds |")
        out.append("|---:|---|---:|---:|---:|---:|---:|")
        for r in nll:
            keys = f"{r.mean_keys_per_query:.0f}"
            gap = "" if r.gap_vs_dense is None else f"{r.gap_vs_dense:+.4f}"
            method = r.method + (" (= dense)" if _is_dense(r, dense_upto) else "")
            marked |= _is_dense(r, dense_upto)
            out.append(f"| {r.length} | {method} | {r.nats_per_token:.4f} | {gap} | {keys} | {r.density:.3f} | {r.seconds:.0f} |")
    needles = [r for r in rows if r.needle_accuracy is not None and r.depth is None and r.task is None]
    tasks = [r for r in rows if r.task is not None and r.seed is None]
    if tasks:
        methods = list(dict.fromkeys(r.method for r in tasks))
        out.append("")
        out.append("| task | length | budget | " + " | ".join(methods) + " |")
        out.append("|---|---:|---:|" + "---:|" * len(methods))
        for key in dict.fromkeys((r.task, r.length, r.budget) for r in tasks):
            acc = {r.method: r.needle_accuracy for r in tasks if (r.task, r.length, r.budget) == key}
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                       + " | ".join(f"{100 * acc[m]:.0f}%" if m in acc else "" for m in methods) + " |")
    if needles:
        methods = list(dict.fromkeys(r.method for r in needles))
        lengths = sorted({r.length for r in needles})
        out.append("")
        out.append("| length | " + " | ".join(methods) + " |")
        out.append("|---:|" + "---:|" * len(methods))
        for length in lengths:
            acc = {r.method: r for r in needles if r.length == length}
            cells = [f"{100 * acc[m].needle_accuracy:.0f}%" + (" (= dense)" if _is_dense(acc[m], dense_upto) else "")
                     for m in methods if m in acc]
            marked |= any(_is_dense(acc[m], dense_upto) for m in methods if m in acc)
            out.append(f"| {length} | " + " | ".join(cells) + " |")
    if marked:
        limit = f" (up to {dense_upto} tokens at this budget)" if dense_upto else ""
        out.append("")
        out.append(f"(= dense): at that length the windows and the budget cover every key{limit}, so the sparse "
                   "method computed dense attention; it says nothing about its selection.")
    return "\n".join(out)


@torch.no_grad()
def diagnose(
    model: Any, ids: torch.Tensor, hga: HGAConfig, routed: int, *, num_blocks: int = 4, positions: list[int] | None = None
) -> list[dict[str, float]]:
    """Per layer, where the routed selections put the dense attention mass (last ``num_blocks`` chunks).

    One dense pass records each layer's post-RoPE q, k, v. For the queries of the last
    ``num_blocks`` chunks, with ``p`` the dense causal attention probabilities:

    * ``window_mass``: mass on the sinks, local window and current chunk (common to all);
    * ``hga_mass``, ``quest_mass``, ``oracle_mass``: mass on each method's routed keys (the
      oracle's is the most any selection of ``routed`` candidate keys can get);
    * ``hga_chunk_recall``: share of the oracle's routed mass inside HGA's routed *chunks*
      (what the first level kept); ``hga_mass / oracle_mass`` is what survived both levels;
    * ``*_err``: relative error ``|o - o_dense| / |o_dense|`` of the attention output;
    * ``head_oracle_mass``, ``head_hga_mass``: those two masses per query head (lists);
      ``worst_head``, ``worst_head_oracle_mass``, ``worst_head_hga_mass``: the head whose
      ``hga_mass / oracle_mass`` is lowest among the heads with ``oracle_mass >= 0.05`` (-1
      and NaNs when none has), and its two masses: a retrieval head the means hide.

    Averages are over heads and positions: every query of the last ``num_blocks`` chunks, or
    only those at ``positions`` (absolute, within those chunks; e.g. the positions whose
    predictions a task scores). ``ids`` is ``[1, L]`` with L a multiple of the chunk size.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvtier.layout import windows_at
    from kvtier.reference.attention import expand_kv_heads, masked_attention_ref
    from kvtier.reference.baselines import quest_bounds_ref
    from kvtier.reference.hga import hga_attention as hga_ref
    import kvtier.hf

    c, g, m = hga.chunk_size, hga.group_size, hga.groups_per_chunk
    length = ids.shape[1]
    first = length - num_blocks * c
    if positions is not None:
        if not positions or min(positions) < first or max(positions) >= length:
            raise ValueError(f"positions: expected some positions in [{first}, {length}), got {sorted(positions)[:3]}...")
        wanted = torch.zeros(length, dtype=torch.bool)
        wanted[torch.tensor(positions)] = True
    else:
        wanted = torch.ones(length, dtype=torch.bool)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kw: Any):
        captured[module.layer_idx] = (query[:, :, first:].float(), key.float(), value.float())
        return sdpa_attention_forward(module, query, key, value, *args, **kw)

    AttentionInterface.register("kvtier_capture", capture)
    model.set_attn_implementation("kvtier_capture")
    try:
        _backbone(model)(input_ids=ids, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    rope = kvtier.rope_spec_of(model.config, seq_len=length)  # the model's own RoPE (one definition)
    rows = []
    for layer in sorted(captured):
        q, k, v = captured[layer]
        acc: dict[str, float] = {}
        per_head = torch.zeros(2, q.shape[1], dtype=torch.float64)  # oracle and HGA mass summed per head
        n = 0  # (head, position) rows averaged
        _, hstats = hga_ref(q, k, v, config=hga, rope=rope, start_pos=first)
        for blk in range(num_blocks):
            pos0 = first + blk * c
            keep = wanted[pos0 : pos0 + c].to(q.device)  # this block's averaged positions
            if not keep.any():
                continue
            rows_b = slice(blk * c, (blk + 1) * c)
            qb = q[:, :, rows_b]
            win = windows_at(pos0, c, hga.sink_chunks, hga.local_chunks)
            lo, hi = win.sink_end * c, win.local_start * c
            kk = expand_kv_heads(k[:, :, : pos0 + c], q.shape[1])
            scores = torch.matmul(qb, kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            qpos = torch.arange(pos0, pos0 + c)
            kpos = torch.arange(pos0 + c)
            causal = kpos[None, :] <= qpos[:, None]
            p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            window = causal & ~((kpos >= lo) & (kpos < hi))[None, :]
            cand = p[..., lo:hi]
            top = min(routed, hi - lo)
            oracle_sel = torch.zeros_like(cand, dtype=torch.bool).scatter_(-1, torch.topk(cand, top, dim=-1).indices, True)
            bound = quest_bounds_ref(qb, k[:, :, lo:hi], g)
            pages = torch.zeros_like(bound, dtype=torch.bool)
            pages.scatter_(-1, torch.topk(bound, min(routed // g, bound.shape[-1]), dim=-1).indices, True)
            quest_sel = pages.repeat_interleave(g, dim=-1)
            gids = hstats.plan.group_ids[:, :, rows_b]
            cids = hstats.plan.chunk_ids[:, :, rows_b]
            groups = torch.zeros(*gids.shape[:3], hi // g + 1, dtype=torch.bool)
            groups.scatter_(-1, torch.where(gids < 0, hi // g, gids), True)
            hga_sel = groups[..., lo // g : hi // g].repeat_interleave(g, dim=-1)
            chunks = torch.zeros(*cids.shape[:3], hi // c + 1, dtype=torch.bool)
            chunks.scatter_(-1, torch.where(cids < 0, hi // c, cids), True)
            in_chunks = chunks[..., lo // c : hi // c].repeat_interleave(c, dim=-1)
            dense_out = torch.matmul(p, expand_kv_heads(v[:, :, : pos0 + c], q.shape[1]))
            oracle_mass = (cand * oracle_sel).sum(-1)
            vals = {
                "window_mass": (p * window).sum(-1),
                "hga_mass": (cand * hga_sel).sum(-1),
                "quest_mass": (cand * quest_sel).sum(-1),
                "oracle_mass": oracle_mass,
                "hga_chunk_recall": (cand * oracle_sel * in_chunks).sum(-1) / oracle_mass.clamp_min(1e-12),
            }
            for name, sel in (("hga", hga_sel), ("quest", quest_sel), ("oracle", oracle_sel)):
                vis = window.expand_as(p).clone()
                vis[..., lo:hi] = sel
                o = masked_attention_ref(qb, k[:, :, : pos0 + c], v[:, :, : pos0 + c], vis)
                vals[f"{name}_err"] = (o - dense_out).norm(dim=-1) / dense_out.norm(dim=-1).clamp_min(1e-12)
            for key, t in vals.items():  # t: [1, Hq, c]
                acc[key] = acc.get(key, 0.0) + float(t[..., keep].sum())
            for i, key in enumerate(("oracle_mass", "hga_mass")):
                per_head[i] += vals[key][0][:, keep].sum(-1).double().cpu()
            n += int(keep.sum()) * q.shape[1]
        head_mass = per_head / (n // q.shape[1])
        ratio = torch.where(head_mass[0] >= 0.05, head_mass[1] / head_mass[0].clamp_min(1e-12), math.inf)
        worst = int(ratio.argmin()) if bool(torch.isfinite(ratio).any()) else -1
        rows.append({"layer": layer, **{key: val / n for key, val in acc.items()},
                     "head_oracle_mass": head_mass[0].tolist(), "head_hga_mass": head_mass[1].tolist(), "worst_head": worst,
                     "worst_head_oracle_mass": float(head_mass[0, worst]) if worst >= 0 else math.nan,
                     "worst_head_hga_mass": float(head_mass[1, worst]) if worst >= 0 else math.nan})
    return rows


def diagnosis_table(rows: list[dict[str, float]]) -> str:
    """Markdown table of :func:`diagnose` rows plus their mean."""
    cols = ["window_mass", "oracle_mass", "quest_mass", "hga_mass", "hga_chunk_recall", "oracle_err", "quest_err", "hga_err"]
    out = ["| layer | " + " | ".join(cols) + " | worst head: oracle / hga mass |", "|---:|" + "---:|" * (len(cols) + 1)]
    for r in rows:
        worst = (f"{r['worst_head']}: {r['worst_head_oracle_mass']:.3f} / {r['worst_head_hga_mass']:.3f}"
                 if r.get("worst_head", -1) >= 0 else "-")
        out.append(f"| {int(r['layer'])} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {worst} |")
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in cols}
    out.append("| mean | " + " | ".join(f"{mean[c]:.3f}" for c in cols) + " | |")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvtier eval``."""
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local model folder (default smollm2)")
    parser.add_argument("--text-file", type=Path, default=None,
                        help="text to score (default: the essay shipped in kvtier/data)")
    parser.add_argument("--lengths", default="2048,4096,8192", help="comma-separated context lengths in tokens")
    parser.add_argument("--methods", default=None,
                        help=f"default dense,hga,quest,oracle (--smoke: dense,hga); comma-separated, from {METHODS} "
                             "or hga-<chunk_score>[-<group_score>] (e.g. hga-max_group, hga-running_max-bound, "
                             "hga-sum+max_group)")
    parser.add_argument("--budget", type=positive_int, default=None,
                        help="keys per query for every sparse method, sinks + local + current chunk included "
                             "(default: HGA's default configuration, 1216, also with --local-chunks, --sink-chunks or "
                             "--group-size)")
    parser.add_argument("--top-chunks", type=positive_int, default=None,
                        help="HGA's first-level routing width (default 48, HGAConfig's; the paper: 16); it does not change the keys attended")
    parser.add_argument("--local-chunks", type=nonnegative_int, default=None,
                        help="HGA's local window in chunks (default 2, HGAConfig's; the paper: 8); every sparse method "
                             "keeps the same windows")
    parser.add_argument("--sink-chunks", type=nonnegative_int, default=None,
                        help="HGA's sink chunks at the start of the context (default 1, HGAConfig's; the "
                             "paper: 2); every sparse method keeps the same windows")
    parser.add_argument("--group-size", type=positive_int, default=None,
                        help="HGA's group size in tokens, a divisor of 64 (default 16; Quest's pages stay 16 tokens)")
    parser.add_argument("--max-group-size", type=positive_int, default=None,
                        help="tokens of the unit HGA's max_group chunk term takes the best of (default: one group); "
                             "e.g. --group-size 8 --max-group-size 16 ranks chunks as groups of 16 and routes groups of 8")
    parser.add_argument("--group-merge", choices=GROUP_MERGES, default=None,
                        help="how HGA's group_score 'sum+bound' joins its two group rankings: half of the groups "
                             "by each (split, the default) or by the least sum of the two ranks (rank)")
    parser.add_argument("--group-reserve", type=nonnegative_int, default=None,
                        help="with --group-merge rank: groups taken first by each score alone before the rank "
                             "sum picks the rest (default 0)")
    parser.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                        help="HGA's path: the kernels on CUDA where they serve the routing option (auto), or "
                             "force the kernels or the reference (the spec, as the fidelity tables on CPU)")
    parser.add_argument("--score-fraction", type=float, default=0.5,
                        help="fraction of each length scored, at its end (default 0.5)")
    parser.add_argument("--needles", action="store_true", help="add the needle-in-a-haystack grid")
    parser.add_argument("--needles-only", action="store_true", help="run the needle grid without the NLL passes")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths as fractions (default 0.1,0.5,0.9); the needle planted rotates with the "
                        "positions in --depths and --lengths, so a part of a grid may plant other needles (rows say which)")
    parser.add_argument("--every-needle", action="store_true",
                        help=f"try every one of the {len(NEEDLES)} needles at each cell of the grid (that many passes per "
                             "cell and method) instead of one: a cell's result then depends less on one prompt")
    parser.add_argument("--diagnose", type=positive_int, default=None, metavar="LENGTH",
                        help="only: per-layer attention mass captured by each selection at LENGTH tokens")
    parser.add_argument("--diagnose-task", default=None, metavar="TASK",
                        help="with --diagnose: on sample --first-seed of TASK at LENGTH tokens, at the positions "
                             "whose predictions the task scores (default: the essay, its last 4 chunks)")
    parser.add_argument("--budgets", default=None,
                        help="comma-separated budgets (keys per query) to sweep; overrides --budget")
    parser.add_argument("--tasks", default=None,
                        help="task suite: 'all' or comma-separated from single, multikey, multivalue, multiquery, "
                             "vartrack, freqwords, randkey (see kvtier/cli/tasks.py)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="samples per task, length and method (default 3)")
    parser.add_argument("--first-seed", type=nonnegative_int, default=0,
                        help="the first sample's seed: --seeds N runs seeds first..first+N-1 (default 0); a sample "
                             "depends only on its task, length and seed, so --first-seed 2 --seeds 2 adds two new "
                             "samples to an earlier --seeds 2 run")
    parser.add_argument("--tasks-only", action="store_true", help="run the task suite without NLL passes or needles")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: every task once at 768 tokens with a 720-key budget, no NLL passes")
    add_output_arguments(parser, "eval", kinds=("json",))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise UsageError(f"--{name}: expected integers >= 2, got {text!r}")
    return values


def _fractions(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(0 <= x <= 1 for x in values):
        raise UsageError(f"--{name}: expected comma-separated fractions in [0, 1], got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; print the table; write JSON when asked. Returns the exit status."""
    args.commit = source_commit()  # the code this process loaded: HEAD may move during a long run
    lengths = _ints(args.lengths, "lengths")
    if args.methods is None:
        args.methods = "dense,hga" if args.smoke else "dense,hga,quest,oracle"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError(f"--methods: expected some of {', '.join(METHODS)}, got {args.methods!r}")
    for m in methods:
        try:
            method_config(m, HGAConfig())
        except ValueError as exc:
            raise UsageError(f"--methods: {exc}") from None
    if "dense" in methods:  # gaps are measured against it, so it runs first
        methods = ["dense"] + [m for m in methods if m != "dense"]
    depths = _fractions(args.depths, "depths")
    if not 0 < args.score_fraction <= 1:
        raise UsageError(f"--score-fraction: expected a fraction in (0, 1], got {args.score_fraction}")
    if args.diagnose_task is not None:
        from kvtier.cli.tasks import TASKS

        if args.diagnose is None:
            raise UsageError(f"--diagnose-task: expected --diagnose LENGTH with it, got {args.diagnose_task!r} alone")
        if args.diagnose_task not in TASKS:
            raise UsageError(f"--diagnose-task: expected one of {', '.join(TASKS)}, got {args.diagnose_task!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = {name: value for name, value in (("local_chunks", args.local_chunks), ("sink_chunks", args.sink_chunks))
               if value is not None}
    if args.group_size is not None:
        windows["group_size"] = args.group_size
        if HGAConfig().chunk_size % args.group_size:
            raise UsageError(f"--group-size: expected a divisor of the chunk size {HGAConfig().chunk_size}, got {args.group_size}")
    if args.max_group_size is not None:
        windows["max_group_size"] = args.max_group_size
    if args.group_merge is not None:
        windows["group_merge"] = args.group_merge
    if args.group_reserve is not None:
        windows["group_reserve"] = args.group_reserve
    base = HGAConfig(**windows) if args.top_chunks is None else HGAConfig(top_chunks=args.top_chunks, **windows)
    if args.smoke:  # seconds: one short length, one group routed, one seed of every task
        lengths, args.budget, args.budgets, args.seeds = [768], 720, None, 1
        args.tasks = args.tasks or "all"
    # The default budget is the default configuration's keys, whatever --local-chunks,
    # --sink-chunks or --group-size change: they move keys between windows and routed groups, not add them.
    budgets = [default_budget(HGAConfig())] if args.budget is None else [args.budget]
    if args.budgets:
        budgets = _ints(args.budgets, "budgets")
    configs = []
    for budget in budgets:
        try:
            configs.append((budget, *hga_config_for_budget(budget, base)))
        except ValueError as exc:
            option = "--budgets" if args.budgets else "--budget"
            raise UsageError(f"{option}: {str(exc).removeprefix('budget: ')}") from None
    tasks = _task_list(args.tasks)
    args.budget_list = budgets
    budget, hga, routed = configs[0]
    args.hga_base = hga  # the JSON records HGA's configuration (at the first budget)
    # and each HGA method's own: a named rule such as hga-sum-sum has its own scores
    args.method_configs = {m: asdict(cfg) for m in methods for kind, cfg in [method_config(m, hga)] if kind == "hga"}
    if args.text_file is not None and not args.text_file.is_file():
        raise UsageError(f"--text-file: expected a readable file, got {str(args.text_file)!r}")
    json_path = output_file(args, "json", "eval")
    from tqdm import tqdm

    import kvtier.hf  # noqa: F401  (registers "hga")
    from kvtier.models import load_model

    text = args.text_file.read_text() if args.text_file else resources.files("kvtier").joinpath("data/essay.txt").read_text()
    model, tokenizer = load_model(args.model, attn_implementation="sdpa", device=args.device)
    device = next(model.parameters()).device
    if args.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"--backend: expected a CUDA device for 'triton' (or TRITON_INTERPRET=1), got {device}")
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    too_long = [n for n in lengths if n > len(tokens)]
    if too_long:
        raise UsageError(f"--lengths: expected at most the text's {len(tokens)} tokens, got {too_long}")
    if args.diagnose:
        length = args.diagnose - args.diagnose % hga.chunk_size
        ids, where, positions, blocks = tokens[:length], "last 4 chunks", None, 4
        if args.diagnose_task:
            from kvtier.cli.tasks import make_sample

            sample = make_sample(args.diagnose_task, length, args.first_seed, tokenizer, tokens, text)
            ids = sample.ids
            positions = [p - 1 for lo, hi in sample.spans for p in range(lo, hi)]  # where each answer token is predicted
            blocks = length // hga.chunk_size - min(positions) // hga.chunk_size
            where = (f"task {args.diagnose_task} seed {args.first_seed}, the {len(positions)} positions predicting "
                     f"its answer {sample.answer!r}")
        rows_d = diagnose(model, torch.tensor([ids], device=device), hga, routed, num_blocks=blocks, positions=positions)
        print(f"kvtier eval --diagnose: {args.model}, {length} tokens, {where}, budget {budget} ({routed} routed)")
        print(diagnosis_table(rows_d))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            conditions = {"model": args.model, **_machine(args), "hga": asdict(hga)}
            json_path.write_text(json.dumps({"length": length, "budget": budget, "task": args.diagnose_task,
                                             "seed": args.first_seed if args.diagnose_task else None,
                                             "positions": positions, "conditions": conditions, "rows": rows_d}, indent=1))
            print(f"results: {json_path}")
        return 0
    rows: list[EvalRow] = []
    for budget, hga, routed in configs:
        print(f"kvtier eval: {args.model} on {device}, {len(tokens)} text tokens, budget {budget} keys/query "
              f"({routed} routed), methods {','.join(methods)}, lengths {','.join(map(str, lengths))}", flush=True)
        dense_upto = dense_tokens(hga)
        if min(lengths) <= dense_upto:
            print(f"note: at {dense_upto} tokens or fewer this budget covers every key: sparse rows there are dense "
                  "attention and are marked (= dense)", flush=True)
        _run_budget(args, rows, json_path, model, tokenizer, tokens, text, device, methods, lengths, depths, tasks,
                    budget, hga, routed)
    print(markdown_table(rows, dense_upto))
    written = []
    if json_path is not None:
        _write_json(json_path, rows, args, budgets, finished=True)
        written.append(str(json_path))
    png = plot_eval([asdict(r) for r in rows], output_file(args, "png", "eval"), f"{args.model}, budget {budget} keys/query")
    written.append(str(png) if png else PLOT_HINT)
    print("results: " + ", ".join(written))
    return 0


def _task_list(text: str | None) -> list[str]:
    from kvtier.cli.tasks import TASKS

    if not text:
        return []
    tasks = list(TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UsageError(f"--tasks: expected 'all' or some of {', '.join(TASKS)}, got {bad}")
    return tasks


def answer_margin(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The smallest ``logit[target] - max(other logits)`` over the answer's tokens (nats).

    Parameters
    ----------
    logits : Tensor ``[N, V]``
        The predictions for the answer's N tokens.
    targets : Tensor ``[N]``
        The answer's tokens.
    """
    logits = logits.float()
    right = logits.gather(-1, targets[:, None]).squeeze(-1)
    others = logits.scatter(-1, targets[:, None], float("-inf")).amax(-1)
    return float((right - others).min())


@torch.no_grad()
def answer_correct(model: Any, ids: torch.Tensor, spans: list[tuple[int, int]]) -> tuple[bool, float]:
    """Whether the greedy prediction is right at every token of every span (teacher-forced),
    and its :func:`answer_margin`.

    Parameters
    ----------
    ids : Tensor ``[1, L]``
    spans : list of ``[start, end)``
        Positions whose token the position before must predict.
    """
    hidden = _backbone(model)(input_ids=ids, use_cache=False).last_hidden_state
    pos = torch.tensor([p - 1 for s, e in spans for p in range(s, e)], device=ids.device)
    logits = model.get_output_embeddings()(hidden[0, pos])
    targets = ids[0, pos + 1]
    return bool(torch.equal(logits.argmax(-1), targets)), answer_margin(logits, targets)


def needle_cells(
    lengths: list[int], depths: list[float], methods: list[str], *, every_needle: bool = False
) -> list[tuple[int, float, int, str]]:
    """The needle grid's passes ``(length, depth, needle, method)``, ``needle`` an index into :data:`NEEDLES`.

    The needle rotates over the depths and lengths (the i-th depth of the j-th length holds
    needle ``(i + j) % len(NEEDLES)``), so each needle is tried at several depths. The rotation
    follows the positions in the lists, not the values: ``--lengths 4096`` plants at 4,096
    tokens another needle than the grid ``2048,4096,6144,8192`` does (rows record which).
    With ``every_needle`` each cell is tried with every needle, the rotation's first.
    """
    shifts = range(len(NEEDLES)) if every_needle else range(1)
    return [(n, d, (i + j + s) % len(NEEDLES), m) for j, n in enumerate(lengths) for i, d in enumerate(depths)
            for s in shifts for m in methods]


def _run_budget(args: argparse.Namespace, rows: list[EvalRow], json_path: Path | None, model: Any, tokenizer: Any,
                tokens: list[int], text: str, device: Any, methods: list[str], lengths: list[int],
                depths: list[float], tasks: list[str], budget: int, hga: HGAConfig, routed: int) -> None:
    """NLL passes, needles and tasks at one budget; rows are appended (and written) as they come."""
    from tqdm import tqdm

    from kvtier.cli.tasks import make_sample

    def save() -> None:
        if json_path is not None:
            _write_json(json_path, rows, args, args.budget_list)

    dense_upto = dense_tokens(hga)
    dense_nll: dict[int, float] = {}
    jobs = [] if (args.needles_only or args.tasks_only or args.smoke) else [(n, m) for n in lengths for m in methods]
    for length, method in tqdm(jobs, desc="nll", unit="pass", file=sys.stderr):
        ids = torch.tensor([tokens[:length]], device=device)
        stats = _use(model, method, hga, routed, args.backend)
        t0 = time.perf_counter()
        nll, count = sequence_nll(model, ids, int(length * (1 - args.score_fraction)))
        seconds = time.perf_counter() - t0
        density, keys = _density_of(stats, length)
        if method == "dense":
            dense_nll[length] = nll
        gap = nll - dense_nll[length] if length in dense_nll else None
        rows.append(EvalRow(method, length, nll, gap, density, keys, budget, seconds, count))
        tqdm.write(f"  {length:>6} {method:<7} {nll:.4f} nats/token" + ("" if gap is None else f"  gap {gap:+.4f}")
                   + ("" if stats is None else f"  {keys:.0f} keys/query, density {density:.3f}")
                   + (" (= dense)" if _is_dense(rows[-1], dense_upto) else ""), file=sys.stderr)
        save()
    if (args.needles or args.needles_only) and not args.tasks_only:
        cells = needle_cells(lengths, depths, methods, every_needle=args.every_needle)
        found: dict[tuple[str, int], list[bool]] = {}
        for length, depth, which, method in tqdm(cells, desc="needles", unit="pass", file=sys.stderr):
            ids, start, n_ans = plant_needle(tokens, tokenizer, NEEDLES[which], depth, length)
            ids = ids.to(device)
            stats = _use(model, method, hga, routed, args.backend)
            t0 = time.perf_counter()
            ok, margin = answer_correct(model, ids, [(start, start + n_ans)])
            density, keys = _density_of(stats, length)
            found.setdefault((method, length), []).append(ok)
            rows.append(EvalRow(method, length, None, None, density, keys, budget, time.perf_counter() - t0,
                                needle_accuracy=float(ok), depth=depth, answer_margin=margin, needle=which))
            save()
        for (method, length), oks in found.items():
            rows.append(EvalRow(method, length, None, None, float("nan"), float("nan"), budget, 0.0,
                                needle_accuracy=sum(oks) / len(oks)))
    cells = [(t, n, seed, m) for t in tasks for n in lengths for seed in _seeds(args) for m in methods]
    solved: dict[tuple[str, int, str], list[bool]] = {}
    for task, length, seed, method in tqdm(cells, desc="tasks", unit="pass", file=sys.stderr):
        sample = make_sample(task, length, seed, tokenizer, tokens, text)
        ids = torch.tensor([sample.ids], device=device)
        stats = _use(model, method, hga, routed, args.backend)
        t0 = time.perf_counter()
        ok, margin = answer_correct(model, ids, sample.spans)
        density, keys = _density_of(stats, length)
        solved.setdefault((task, length, method), []).append(ok)
        rows.append(EvalRow(method, length, None, None, density, keys, budget, time.perf_counter() - t0,
                            needle_accuracy=float(ok), task=task, seed=seed, answer_margin=margin))
        save()
    for (task, length, method), oks in solved.items():
        dens = [r.density for r in rows if r.task == task and r.length == length and r.method == method
                and r.budget == budget and r.seed is not None]
        rows.append(EvalRow(method, length, None, None, sum(dens) / len(dens), float("nan"), budget, 0.0,
                            needle_accuracy=sum(oks) / len(oks), task=task))
    save()


def _seeds(args: argparse.Namespace) -> range:
    """The task samples' seeds: ``--seeds`` of them from ``--first-seed``."""
    return range(args.first_seed, args.first_seed + args.seeds)


def plot_eval(rows: list[dict[str, Any]], path: str | Path, subtitle: str = "") -> Path | None:
    """PNG of the NLL gap to dense against context per sparse method (needle accuracy without NLL rows).

    ``rows`` are :class:`EvalRow` fields as dicts (the ``rows`` of the JSON). Returns the file,
    or None without matplotlib or without rows to plot.
    """
    nll = [r for r in rows if r["nats_per_token"] is not None and r["gap_vs_dense"] is not None and r["method"] != "dense"]
    if nll:
        key, ylabel, title = "gap_vs_dense", "NLL gap to dense (nats/token)", "Fidelity: NLL gap to dense attention"
        use = nll
    else:
        use = [r for r in rows if r["needle_accuracy"] is not None and r["depth"] is None and r.get("task") is None]
        key, ylabel, title = "needle_accuracy", "needles found (fraction)", "Needle retrieval"
    if not use:
        return None
    series = {}
    for method in dict.fromkeys(r["method"] for r in use):
        pts = {r["length"]: r[key] for r in use if r["method"] == method}
        xs = sorted(pts)
        series[method] = (xs, [pts[x] for x in xs])
    lengths = sorted({r["length"] for r in use})
    return plot_lines(path, series, "context (tokens)", ylabel, f"{title}{f' ({subtitle})' if subtitle else ''}",
                      logx=len(lengths) > 2, xticks=[(n, str(n)) for n in lengths])


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    """What every JSON of a run records about where and with what code it ran."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "commit": args.commit}


def _write_json(path: Path, rows: list[EvalRow], args: argparse.Namespace, budgets: list[int], *,
                finished: bool = False) -> None:
    """Rows so far and the run's conditions; ``finished`` only in the last write of a run."""

    def clean(x: Any) -> Any:
        return None if isinstance(x, float) and math.isnan(x) else x

    payload = {
        "conditions": {"model": args.model, "budget": budgets[0] if len(budgets) == 1 else budgets, "score_fraction": args.score_fraction,
                       "lengths": args.lengths, "methods": args.methods, **_machine(args), "backend": args.backend,
                       "local_chunks": args.local_chunks, "sink_chunks": args.sink_chunks,
                       "seeds": list(_seeds(args)) if args.tasks else None,
                       "top_chunks": args.top_chunks, "every_needle": args.every_needle,
                       "group_size": args.group_size, "max_group_size": args.max_group_size,
                       "group_merge": args.group_merge, "group_reserve": args.group_reserve,
                       "hga": asdict(args.hga_base) if hasattr(args, "hga_base") else None,
                       "method_configs": getattr(args, "method_configs", None),
                       "text_file": str(args.text_file) if args.text_file else "kvtier/data/essay.txt"},
        "rows": [{k: clean(v) for k, v in asdict(r).items()} for r in rows],
        "finished": finished,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
