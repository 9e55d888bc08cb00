"""A RULER-style long-context task suite, generated locally from a seed (no downloads).

Every task builds one token sequence of a requested length: a haystack (the essay shipped
in ``kvtier/data``, or random text made of its words), some planted facts, and a question
followed by its answer. A sample is solved when the model's greedy choice is the right token
at every *scored* answer token, teacher-forced (the same as greedy generation of those
tokens, given the unscored glue between them). One forward pass per sample and method.

Tasks (values are rare upper-case words, which even dense SmolLM2-135M can copy; random
strings are used only where the task says so):

``single``     one needle at a depth drawn from the sample's seed;
``multikey``   four needles (different facts, different values); the question asks one
               (the others are distractors);
``multivalue`` one key with three values planted at three depths; the answer lists them in
               the order they appear;
``multiquery`` four needles; two questions, each answered;
``vartrack``   a chain of three assignments ("the word of box K7 is the word of box M2"),
               with a second, distracting chain; the question asks the chain's end;
``freqwords``  aggregation: a list of words in which one word is far more frequent than
               any other; the question asks for the most frequent;
``randkey``    a random 6-letter key and a random 6-character value (letters and digits)
               in random text: no semantic hook for the summaries.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TASKS", "Sample", "make_sample", "random_text_words"]

TASKS = ("single", "multikey", "multivalue", "multiquery", "vartrack", "freqwords", "randkey")

_VALUES = (
    "PERIWINKLE", "MARIGOLD", "JUNIPER", "SAFFRON", "LAVENDER", "TURQUOISE", "MAGENTA", "HAZELNUT",
    "BUTTERCUP", "DAFFODIL", "MISTLETOE", "THISTLE", "PRIMROSE", "BLUEBELL", "TAMARIND", "CARDAMOM",
)
#: (statement, question): distinct facts, so that a distractor differs from the asked fact by its
#: wording (a shared template with colour keys defeated dense SmolLM2-135M in a first trial).
_FACTS = (
    ("The secret word that opens the lighthouse museum door is", "What is the secret word that opens the lighthouse museum door?"),
    ("The name painted on the harbour master's rowing boat is", "What is the name painted on the harbour master's rowing boat?"),
    ("The password for the ferry office computer is", "What is the password for the ferry office computer?"),
    ("The name of the baker's grey cat is", "What is the name of the baker's grey cat?"),
    ("The word carved above the chapel gate is", "What is the word carved above the chapel gate?"),
    ("The code name of the winter rescue boat is", "What is the code name of the winter rescue boat?"),
    ("The flower the schoolteacher grows by the quay is the", "Which flower does the schoolteacher grow by the quay?"),
    ("The word written on the old fog bell is", "What is the word written on the old fog bell?"),
)
_FILLER_WORDS = (
    "stone", "river", "lamp", "window", "garden", "letter", "bridge", "candle", "forest", "engine",
    "pocket", "ladder", "market", "basket", "mirror", "shadow", "silver", "harbour", "kettle", "meadow",
)


@dataclass
class Sample:
    """One sequence and where its scored answer tokens are.

    Attributes
    ----------
    ids : list of int
        Token ids, exactly the requested length.
    spans : list of (int, int)
        ``[start, end)`` positions of scored answer tokens: the prediction at ``p - 1`` must be
        ``ids[p]`` for every ``p`` in every span.
    task : str
    answer : str
        The scored answer text, for reports.
    """

    ids: list[int]
    spans: list[tuple[int, int]]
    task: str
    answer: str = ""
    depths: list[float] = field(default_factory=list)


def random_text_words(text: str) -> list[str]:
    """The words of ``text`` (letters only, lower case): the vocabulary of random haystacks."""
    return [w.lower() for w in re.findall(r"[A-Za-z]+", text)]


class _Builder:
    """Token pieces in order; a scored piece records its span."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.spans: list[tuple[int, int]] = []

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def add(self, text: str, scored: bool = False) -> None:
        piece = self.encode(text)
        if scored:
            self.spans.append((len(self.ids), len(self.ids) + len(piece)))
        self.ids += piece


def _sentence_starts(tokenizer: Any, hay: list[int]) -> list[int]:
    """Positions in ``hay`` right after a sentence end (where a fact can be planted)."""
    out = []
    for i in range(1, len(hay)):
        piece = tokenizer.decode(hay[i - 1 : i])
        if piece.rstrip(" ").endswith((".", "\n")):
            out.append(i)
    return out or [0]


def _plant(
    tokenizer: Any, hay: list[int], facts: list[tuple[float, list[int]]], room: int
) -> list[int]:
    """``hay[:room]`` with each fact's tokens inserted at the sentence start nearest its depth."""
    hay = hay[:room]
    starts = _sentence_starts(tokenizer, hay)
    placed = []
    for depth, toks in facts:
        at = min(starts, key=lambda s: abs(s - depth * room))
        placed.append((at, toks))
    out, prev = [], 0
    for at, toks in sorted(placed, key=lambda x: x[0]):
        out += hay[prev:at] + toks
        prev = at
    return out + hay[prev:]


def _fact(b: _Builder, statement: str, value: str) -> list[int]:
    """Tokens of ``" <statement> <value>."`` with the value tokenised as the answer will be."""
    return b.encode(f" {statement}") + b.encode(f" {value}") + b.encode(".")


def make_sample(
    task: str, length: int, seed: int, tokenizer: Any, essay_ids: list[int], essay_text: str
) -> Sample:
    """Build sample ``seed`` of ``task`` at ``length`` tokens.

    Parameters
    ----------
    task : str
        One of :data:`TASKS`.
    length : int
        Tokens of the whole sequence, answer included.
    seed : int
        Everything random (depths, keys, values, filler) follows from it.
    tokenizer : transformers tokenizer
    essay_ids, essay_text : list of int, str
        The haystack text and its tokens.

    Raises
    ------
    ValueError
        On an unknown task, or a length too short for the task's facts and question.
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    rng = random.Random(f"{task}/{seed}")
    b = _Builder(tokenizer)
    values = rng.sample(_VALUES, 4)
    facts_pool = rng.sample(_FACTS, 4)
    hay = essay_ids
    facts: list[tuple[float, list[int]]] = []
    depths: list[float] = []

    tail = _Builder(tokenizer)  # question and answer, appended after the haystack
    if task == "single":
        depths = [rng.uniform(0.05, 0.95)]
        facts = [(depths[0], _fact(b, facts_pool[0][0], values[0]))]
        tail.add(f"\n\nQuestion: {facts_pool[0][1]}\nAnswer: {facts_pool[0][0]}")
        tail.add(f" {values[0]}", scored=True)
    elif task in ("multikey", "multiquery"):
        depths = sorted(rng.uniform(0.05, 0.95) for _ in range(4))
        facts = [(d, _fact(b, f[0], val)) for d, f, val in zip(depths, facts_pool, values)]
        asked = rng.sample(range(4), 1 if task == "multikey" else 2)
        for i in asked:
            tail.add(f"\n\nQuestion: {facts_pool[i][1]}\nAnswer: {facts_pool[i][0]}")
            tail.add(f" {values[i]}", scored=True)
            tail.add(".")
        values = [values[i] for i in asked]
    elif task == "multivalue":
        depths = sorted(rng.uniform(0.05, 0.95) for _ in range(3))
        facts = [(d, _fact(b, "One of the secret words of the lighthouse keeper is", v)) for d, v in zip(depths, values)]
        tail.add("\n\nQuestion: What are all the secret words of the lighthouse keeper?\n"
                 "Answer: The secret words of the lighthouse keeper are")
        for i, v in enumerate(values[:3]):
            tail.add(f" {v}", scored=True)
            tail.add("," if i < 2 else ".")
    elif task == "vartrack":
        boxes = [f"{rng.choice('BCDFGHKLMNPRSTVWZ')}{rng.randint(2, 9)}" for _ in range(6)]
        while len(set(boxes)) < 6:
            boxes = [f"{rng.choice('BCDFGHKLMNPRSTVWZ')}{rng.randint(2, 9)}" for _ in range(6)]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in range(6))
        chain, other = boxes[:3], boxes[3:]
        lines = []
        for names, val in ((chain, values[0]), (other, values[1])):
            lines.append(_fact(b, f"The word of box {names[0]} is", val))
            lines += [b.encode(f" The word of box {names[i + 1]} is the word of box {names[i]}.") for i in range(2)]
        order = [0, 3, 1, 4, 2, 5]  # the two chains interleaved, each in causal order
        facts = [(depths[j], lines[order[j]]) for j in range(6)]
        tail.add(f"\n\nQuestion: What is the word of box {chain[2]}?\nAnswer: The word of box {chain[2]} is")
        tail.add(f" {values[0]}", scored=True)
    elif task == "randkey":
        words = random_text_words(essay_text)
        key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        value = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6))
        sentences = []
        while sum(len(s) for s in sentences) < 8 * length:  # about 5 characters a token, with room
            n = rng.randint(6, 14)
            sentences.append(" " + " ".join(rng.choice(words) for _ in range(n)).capitalize() + ".")
        hay = b.encode("".join(sentences))
        depths = [rng.uniform(0.05, 0.95)]
        facts = [(depths[0], _fact(b, f"The special code for {key} is", value))]
        tail.add(f"\n\nQuestion: What is the special code for {key}?\nAnswer: The special code for {key} is")
        tail.add(f" {value}", scored=True)
        values = [value]
    else:  # freqwords
        common = rng.choice(_FILLER_WORDS)
        others = [w for w in _FILLER_WORDS if w != common] + [w.lower() for w in _VALUES]
        head = b.encode("Below is a list of words.\n")
        tail.add("\n\nQuestion: Which word appears most often in the list above?\n"
                 "Answer: The word that appears most often in the list above is")
        tail.add(f" {common}", scored=True)
        items: list[int] = []
        budget = length - len(head) - len(tail.ids)
        while True:  # about one word in seven is the common one; no other word comes close
            word = common if rng.random() < 0.15 else rng.choice(others)
            piece = b.encode(f" {word},")
            if len(items) + len(piece) > budget:
                break
            items += piece
        # the few tokens the last word did not fill: a neutral word before the list
        ids = head + b.encode(" end")[:1] * (budget - len(items)) + items
        return _finish(ids, tail, task, common, [])

    room = length - sum(len(t) for _, t in facts) - len(tail.ids)
    if room < 16 or room > len(hay):
        raise ValueError(f"length: expected room for the {task} facts and question, got {length} tokens")
    return _finish(_plant(tokenizer, hay, facts, room), tail, task, " ".join(values[:3]), depths)


def _finish(body: list[int], tail: _Builder, task: str, answer: str, depths: list[float]) -> Sample:
    off = len(body)
    return Sample(body + tail.ids, [(s + off, e + off) for s, e in tail.spans], task, answer, depths)
