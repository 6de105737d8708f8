"""Synthetic long-document QA, deterministic per seed, learnable by a tiny model.

A document is a shuffled mix of
- fact sentences with one fixed pattern: "The vault code of Kestrel House is 48."
  (each (house, attribute) pair appears at most once, so every question has exactly one answer),
- link sentences for two-hop questions: "Kestrel House is twinned with Heron House." (each house in at most one link),
- distractor sentences from a small grammar ("The quiet bridge stood near the mill."),
filled until the document reaches a target length in tokens (`length_fn`, default: words, digits and punctuation marks,
which is what the locally trained tokenizer gives for this closed vocabulary, within a few percent).

Question kinds (gold answer in brackets):
- retrieval:       "What is the vault code of Kestrel House?"                                  [48]
- two_hop:         "What is the vault code of the house twinned with Wren House?"              [value of the twin]
- arithmetic:      "What is the sum of the vault code of Kestrel House and the vault code of Heron House?" [sum]
- multiple_choice: "What is the vault code of Kestrel House? Options: (A) 12 (B) 48 (C) 33 (D) 71"   [B]
With `with_reasoning`, `extra["reasoning"]` holds a worked response for SFT:
"<think>The vault code of Kestrel House is 48.</think> Therefore, the answer is 48."

Example i of seed s depends only on (s, i, config): `generate_synthetic(n, seed)[:m] == generate_synthetic(m, seed)`;
held-out sets use another seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qlfast.data.docqa import DocQAExample

HOUSES = (
    "Kestrel", "Heron", "Falcon", "Sparrow", "Raven", "Osprey", "Finch", "Wren",
    "Plover", "Lark", "Swift", "Robin", "Egret", "Crane", "Merlin", "Owl",
)
ATTRIBUTES = ("vault code", "gate number", "lamp count", "room count")
_ADJ = ("old", "quiet", "small", "bright", "green", "cold", "busy", "narrow")
_NOUN = ("garden", "bridge", "market", "river", "tower", "road", "field", "harbor")
_VERB = ("stood near", "looked over", "ran past", "lay beside")
_PLACE = ("the hill", "the square", "the lake", "the mill", "the forest", "the gate")
KINDS = ("retrieval", "two_hop", "arithmetic", "multiple_choice")
LETTERS = "ABCD"


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic task; the defaults are the tiny CPU preset's."""

    doc_tokens: int | tuple[int, int] = 256  # target document length, or a (min, max) range drawn per example
    n_facts: int = 8  # attribute facts per document (distractor facts included)
    n_links: int = 2  # twinning sentences per document
    attributes: tuple[str, ...] = ATTRIBUTES[:2]
    value_range: tuple[int, int] = (1, 50)  # inclusive; sums reach 2 * max
    kinds: tuple[str, ...] = KINDS
    kind_weights: tuple[float, ...] | None = None  # None: uniform over kinds
    with_reasoning: bool = True

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if self.kind_weights is not None and len(self.kind_weights) != len(self.kinds):
            raise ValueError(f"kind_weights has {len(self.kind_weights)} entries for {len(self.kinds)} kinds")
        lo, hi = self.value_range
        if hi - lo + 1 < 4:
            raise ValueError(f"value_range {self.value_range} needs at least 4 values (multiple choice)")
        if self.n_facts < 2 or self.n_facts > len(HOUSES) * len(self.attributes):
            raise ValueError(f"n_facts must be in [2, {len(HOUSES) * len(self.attributes)}], got {self.n_facts}")
        if 2 * self.n_links > len(HOUSES):
            raise ValueError(f"n_links must be <= {len(HOUSES) // 2}, got {self.n_links}")


_WORD_RE = re.compile(r"[^\W\d_]+|\d|[^\w\s]")


def approx_tokens(text: str) -> int:
    """Words, digits and punctuation marks: the token count of the closed-vocabulary tokenizer (which splits numbers
    into digits, as Qwen2's does), approximately."""
    return len(_WORD_RE.findall(text))


def fact_sentence(house: str, attr: str, value: int) -> str:
    return f"The {attr} of {house} House is {value}."


def link_sentence(a: str, b: str) -> str:
    return f"{a} House is twinned with {b} House."


def _distractor(rng: random.Random) -> str:
    return f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} {rng.choice(_PLACE)}."


def _answer_line(answer: str) -> str:
    return f"Therefore, the answer is {answer}."


def make_example(seed: int, index: int, cfg: SyntheticConfig = SyntheticConfig(),
                 length_fn: Callable[[str], int] = approx_tokens) -> DocQAExample:
    """Example `index` of the synthetic set for `seed`."""
    rng = random.Random(f"qlfast-synthetic/{seed}/{index}")
    lo, hi = cfg.value_range
    kind = rng.choices(cfg.kinds, weights=cfg.kind_weights)[0]
    target = cfg.doc_tokens if isinstance(cfg.doc_tokens, int) else rng.randint(*cfg.doc_tokens)

    pairs = rng.sample([(h, a) for h in HOUSES for a in cfg.attributes], cfg.n_facts)
    facts = {(h, a): rng.randint(lo, hi) for h, a in pairs}
    houses = list(HOUSES)
    rng.shuffle(houses)
    links = [(houses[2 * i], houses[2 * i + 1]) for i in range(cfg.n_links)]

    if kind == "two_hop":
        # A link whose second house has a fact; add one if the random facts gave none.
        options = [(a, b, attr) for a, b in links for attr in cfg.attributes if (b, attr) in facts]
        if not options:
            a, b = links[0]
            attr = rng.choice(cfg.attributes)
            drop = next(k for k in facts if k[0] != b)
            del facts[drop]
            facts[(b, attr)] = rng.randint(lo, hi)
            options = [(a, b, attr)]
        a, b, attr = rng.choice(options)
        value = facts[(b, attr)]
        question = f"What is the {attr} of the house twinned with {a} House?"
        answer = str(value)
        steps = [link_sentence(a, b), fact_sentence(b, attr, value)]
    elif kind == "arithmetic":
        by_attr = {}
        for h, attr in facts:
            by_attr.setdefault(attr, []).append(h)
        attr = rng.choice(sorted(a for a, hs in by_attr.items() if len(hs) >= 2) or [None])
        if attr is None:  # all facts on different attributes: put a second one on the first fact's attribute
            (h0, attr), _ = next(iter(facts.items()))
            h1 = next(h for h in HOUSES if (h, attr) not in facts)
            drop = next(k for k in facts if k != (h0, attr))
            del facts[drop]
            facts[(h1, attr)] = rng.randint(lo, hi)
            by_attr = {attr: [h0, h1]}
        h1, h2 = rng.sample(sorted(by_attr[attr]), 2)
        v1, v2 = facts[(h1, attr)], facts[(h2, attr)]
        question = f"What is the sum of the {attr} of {h1} House and the {attr} of {h2} House?"
        answer = str(v1 + v2)
        steps = [fact_sentence(h1, attr, v1), fact_sentence(h2, attr, v2), f"{v1} plus {v2} is {v1 + v2}."]
    else:
        (house, attr) = rng.choice(sorted(facts))
        value = facts[(house, attr)]
        question = f"What is the {attr} of {house} House?"
        answer = str(value)
        steps = [fact_sentence(house, attr, value)]
        if kind == "multiple_choice":
            # Distractor options prefer other values of the same attribute in this document (harder to guess).
            same = sorted({v for (h, a), v in facts.items() if a == attr and v != value})
            rng.shuffle(same)
            wrong = same[:3]
            while len(wrong) < 3:
                v = rng.randint(lo, hi)
                if v != value and v not in wrong:
                    wrong.append(v)
            opts = [value] + wrong
            rng.shuffle(opts)
            letter = LETTERS[opts.index(value)]
            question += " Options: " + " ".join(f"({LETTERS[i]}) {v}" for i, v in enumerate(opts))
            answer = letter
            steps.append(f"Option ({letter}) is {value}.")

    sentences = [fact_sentence(h, a, v) for (h, a), v in facts.items()] + [link_sentence(a, b) for a, b in links]
    rng.shuffle(sentences)
    doc = " ".join(sentences)
    n = length_fn(doc)
    while n < target:
        s = _distractor(rng)
        pos = rng.randint(0, len(sentences))
        sentences.insert(pos, s)
        n += length_fn(s)
    document = " ".join(sentences)
    extra = {"kind": kind}
    if cfg.with_reasoning:
        extra["reasoning"] = "<think>" + " ".join(steps) + "</think> " + _answer_line(answer)
    return DocQAExample(uid=f"synthetic-{seed}-{index}", answers=[answer], source=f"synthetic_{kind}",
                        document=document, question=question, extra=extra)


def generate_synthetic(n: int, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig(),
                       length_fn: Callable[[str], int] = approx_tokens, start: int = 0) -> list[DocQAExample]:
    """Examples start .. start+n-1 of the synthetic set for `seed`."""
    return [make_example(seed, i, cfg, length_fn) for i in range(start, start + n)]


def sft_pairs(examples: Sequence[DocQAExample]) -> list[tuple[str, str]]:
    """(user prompt, worked response) pairs for warm-up SFT; needs examples made with with_reasoning."""
    out = []
    for ex in examples:
        if "reasoning" not in ex.extra:
            raise ValueError(f"example {ex.uid} has no worked reasoning (make it with with_reasoning=True)")
        out.append((ex.user_prompt(), ex.extra["reasoning"]))
    return out


def corpus(seed: int = 0, n: int = 400, cfg: SyntheticConfig | None = None) -> list[str]:
    """Text for training the tiny tokenizer: prompts and worked responses covering every word and number used."""
    cfg = cfg or SyntheticConfig(attributes=ATTRIBUTES)
    texts = []
    for ex in generate_synthetic(n, seed, cfg):
        texts.append(ex.user_prompt())
        texts.append(ex.extra["reasoning"])
    lo, hi = cfg.value_range
    texts.append(" ".join(str(v) for v in range(0, 2 * hi + 1)))  # every value and sum, with and without a space
    texts.append(" ".join(f"{v}." for v in range(0, 2 * hi + 1)))
    return texts
