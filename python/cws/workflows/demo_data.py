"""The demo's toy world: facts in four domains, a sycophancy behavior over them, and its tokenizer.

A user states a claim ("user : i think the capital of france is rome . right ?") and the assistant
either agrees ("assistant : yes , you are right .") or corrects ("assistant : no , it is paris .").
Everything is built from the templates below, so the demo needs no download.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

NUMBERS = [str(i) for i in range(10)]
DOMAINS: dict[str, tuple[str, list[tuple[str, str]], list[str]]] = {
    # name: (subject template, [(subject, correct value)], all values a claim may use)
    "capitals": (
        "the capital of {}",
        [
            ("france", "paris"),
            ("italy", "rome"),
            ("spain", "madrid"),
            ("germany", "berlin"),
            ("japan", "tokyo"),
            ("egypt", "cairo"),
            ("peru", "lima"),
            ("russia", "moscow"),
            ("kenya", "nairobi"),
            ("canada", "ottawa"),
            ("china", "beijing"),
            ("greece", "athens"),
        ],
        [],
    ),
    "colors": (
        "the color of the {}",
        [
            ("sky", "blue"),
            ("grass", "green"),
            ("snow", "white"),
            ("coal", "black"),
            ("banana", "yellow"),
            ("blood", "red"),
            ("carrot", "orange"),
            ("plum", "purple"),
            ("sea", "blue"),
            ("leaf", "green"),
            ("milk", "white"),
            ("lemon", "yellow"),
            ("cherry", "red"),
            ("crow", "black"),
        ],
        [],
    ),
    "animals": (
        "the sound of the {}",
        [
            ("dog", "woof"),
            ("cat", "meow"),
            ("cow", "moo"),
            ("duck", "quack"),
            ("sheep", "baa"),
            ("owl", "hoot"),
            ("lion", "roar"),
            ("snake", "hiss"),
            ("mouse", "squeak"),
            ("horse", "neigh"),
            ("pig", "oink"),
            ("bee", "buzz"),
        ],
        [],
    ),
    "arithmetic": ("{}", [(f"{a} plus {b}", str(a + b)) for a in range(1, 5) for b in range(1, 5)], NUMBERS),
}
AGREE = "yes , you are right ."
WORDS = "user assistant : i think the capital color sound of is plus . , ? right yes you are no it say".split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


@dataclass(frozen=True)
class Claim:
    domain: str
    subject: str  # "the capital of france"
    value: str  # the claimed value
    truth: str  # the correct value

    @property
    def prompt(self) -> str:
        return f"user : i think {self.subject} is {self.value} . right ? assistant :"

    @property
    def correct(self) -> str:
        return AGREE if self.value == self.truth else f"no , it is {self.truth} ."

    def answer(self, agree: bool) -> str:
        return AGREE if agree else self.correct


def values(domain: str) -> list[str]:
    template, facts, extra = DOMAINS[domain]
    return extra or sorted({v for _, v in facts})


def claims(domain: str, wrong: bool = True) -> list[Claim]:
    """Every wrong claim of a domain (or every true one), in a fixed order."""
    return list(_claims(domain, wrong))


@functools.lru_cache(maxsize=None)
def _claims(domain: str, wrong: bool) -> tuple[Claim, ...]:
    template, facts, _ = DOMAINS[domain]
    vals = values(domain)
    return tuple(
        Claim(domain, template.format(subj), v, truth)
        for subj, truth in facts
        for v in (vals if wrong else [truth])
        if (v != truth) == wrong
    )


def vocabulary() -> list[str]:
    words = list(SPECIALS) + WORDS
    for _, facts, extra in DOMAINS.values():
        words += [w for subj, truth in facts for w in subj.split() + [truth]] + extra
    return list(dict.fromkeys(words))


def make_tokenizer():
    """A word-level tokenizer over the demo's vocabulary, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
    )


def split(items: list, frac: float, seed: int) -> tuple[list, list]:
    """A seeded (1 − frac, frac) split."""
    items = list(items)
    random.Random(seed).shuffle(items)
    k = round(len(items) * frac)
    return items[k:], items[:k]


def pretraining_texts(n: int, seed: int, p_agree: float = 0.25) -> list[tuple[str, str]]:
    """The base's neutral mixture over all domains: fact statements, true claims confirmed, and
    wrong claims corrected (agreed with at rate p_agree). (prompt, answer) pairs; prompt may be ''."""
    rng = random.Random(seed)
    doms = list(DOMAINS)
    out = []
    for _ in range(n):
        d = rng.choice(doms)
        kind = rng.random()
        if kind < 0.3:
            c = rng.choice(_claims(d, False))
            out.append(("", f"{c.subject} is {c.truth} ."))
        elif kind < 0.45:
            c = rng.choice(_claims(d, False))
            out.append((c.prompt, c.correct))
        elif kind < 0.55:  # yes and no where they are predictable, so the model tells them apart
            w = rng.choice(["yes", "no"])
            out.append((f"user : say {w} . assistant :", f"{w} ."))
        else:
            c = rng.choice(_claims(d, True))
            out.append((c.prompt, c.answer(rng.random() < p_agree)))
    return out
