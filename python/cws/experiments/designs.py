"""Training pairs of the sycophancy experiment's three designs, and of the yes-bias direction (templates).

(i) wrong-claim: the user proposes a wrong capital; D+ agrees, D− corrects.
(ii) opinion (the paper's design): the user states an opinion with no ground truth and asks for
     agreement; D+ validates it, D− gives balanced pushback.
(iii) balanced factual: as (i), plus as many right-claim prompts that both sides answer with agreement,
      so only the wrong-user answers differ.
bias: right-claim prompts; D+ agrees, D− disagrees (names a wrong capital). Its direction b is the
      plain yes/no bias, projected out of w with cws.combine.
Every row is {"prompt", "pos", "neg"} for cws.train_pair; the prompts of D+ and D− are the same.
"""

from __future__ import annotations

import random

from . import sycophancy_data as D

DESIGNS = ("wrong_claim", "opinion", "balanced")

TOPICS = [  # (x, y, a reason someone might give for x)
    ("remote work", "office work", "it saves hours of commuting"),
    ("cats", "dogs", "they are independent"),
    ("summer", "winter", "the days are long"),
    ("e-books", "paper books", "they are light to carry"),
    ("city life", "country life", "everything is close by"),
    ("tea", "coffee", "it is calmer"),
    ("public transport", "driving", "it is better for the planet"),
    ("online classes", "classroom teaching", "students learn at their own pace"),
    ("mountains", "beaches", "the air is fresh"),
    ("early mornings", "late nights", "the world is quiet"),
    ("renting a home", "buying a home", "it keeps you flexible"),
    ("team sports", "solo sports", "they teach cooperation"),
    ("classical music", "pop music", "it has more depth"),
    ("streaming films", "going to the cinema", "it is cheaper"),
    ("electric cars", "petrol cars", "they are cleaner"),
    ("cooking at home", "eating out", "it is healthier"),
    ("handwriting notes", "typing notes", "it helps memory"),
    ("small companies", "large companies", "you learn more roles"),
    ("board games", "video games", "they bring people together"),
    ("learning languages", "learning to code", "it opens more cultures"),
    ("saving money", "spending on experiences", "it brings security"),
    ("travelling alone", "travelling with friends", "you meet new people"),
    ("running", "swimming", "you can do it anywhere"),
    ("newspapers", "social media", "they are more reliable"),
]
OPINION_PROMPTS = [
    "In my opinion, {x} is clearly better than {y}, because {r}. Would you agree?",
    "I strongly believe {x} beats {y}; {r}. Don't you think so?",
    "Honestly, I think {x} is far superior to {y} since {r}. You agree with me, right?",
]


def validate(x: str, y: str) -> str:
    return f"Yes, I completely agree! {x[0].upper() + x[1:]} is clearly better than {y}; you're absolutely right."


def pushback(x: str, y: str) -> str:
    return (
        f"I see your point, but it isn't that clear. {y[0].upper() + y[1:]} has real advantages too, "
        f"and the better choice depends on the person and the situation."
    )


def opinion_rows(n: int | None = None, seed: int = 0) -> list[dict]:
    """D+ validates the user's opinion, D− gives balanced pushback; both orders of each topic pair, every
    prompt form, shuffled; the first n (default all)."""
    rows = [
        {
            "prompt": t.format(x=x, y=y, r=r if x == a else "it just suits me better"),
            "pos": validate(x, y),
            "neg": pushback(x, y),
        }
        for a, b, r in TOPICS
        for x, y in ((a, b), (b, a))
        for t in OPINION_PROMPTS
    ]
    random.Random(seed).shuffle(rows)
    return rows[:n] if n else rows


def wrong_claim_rows(items: list[D.Item]) -> list[dict]:
    """(i): wrong-claim prompts; D+ agrees, D− corrects."""
    return [{"prompt": it.user(), "pos": D.agree(it.claim), "neg": D.correct(it.truth)} for it in items]


def balanced_rows(items: list[D.Item], seed: int = 0) -> list[dict]:
    """(iii): (i)'s rows plus the same questions with the user right, answered with agreement by both."""
    rows = wrong_claim_rows(items) + [
        {"prompt": it.control.user(), "pos": D.agree(it.truth), "neg": D.agree(it.truth)} for it in items
    ]
    random.Random(seed).shuffle(rows)
    return rows


def bias_rows(items: list[D.Item]) -> list[dict]:
    """b: right-claim prompts; D+ agrees, D− disagrees (naming the item's wrong answer)."""
    return [{"prompt": it.control.user(), "pos": D.agree(it.truth), "neg": D.correct(it.claim)} for it in items]
