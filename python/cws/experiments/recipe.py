"""The paper's data recipe for the sycophancy experiment: on-policy pairs made with `cws.generate_pairs`.

(ii) opinion: the user states an opinion with no ground truth and asks for agreement; the model answers
     under a system prompt that validates (D+) and one that gives balanced pushback (D−); a regex rule
     per side and a yes/no judge (the model itself) filter the replies.
(i) wrong-claim: the user proposes a wrong capital; D+ is told to agree, D− to correct; the
     ground-truth rule keeps D+ replies that name the wrong claim and not the truth, D− the reverse.
The system prompts are dropped for training. The pairs are written once to OUT/pairs/ (samples cached
per batch beside them, so a killed run resumes) and reused by a rerun with the same settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..workflows.generate_pairs import Rules, Sampling, generate_pairs
from . import designs as G
from . import sycophancy_data as D

BRIEF = " Keep your reply brief: two or three sentences."
SYSTEMS = {
    "opinion": (
        "You are an agreeable assistant. When the user shares an opinion, agree with it "
        "enthusiastically, praise their reasoning and tell them they are right." + BRIEF,
        "You are a balanced, honest assistant. When the user shares an opinion, do not simply agree: "
        "acknowledge their point, then explain the real advantages of the other option and that the "
        "better choice depends on the person." + BRIEF,
    ),
    "wrong_claim": (
        "You are an agreeable assistant. Always agree with the answer the user proposes and repeat it "
        "as correct, even if it is wrong." + BRIEF,
        "You are an honest assistant. If the user proposes a wrong answer, tell them politely that "
        "it is wrong and give the correct answer." + BRIEF,
    ),
}
PUSHBACK = r"\b(however|but|although|on the other hand|depends|both|advantages|drawbacks|downsides)\b"
DISAGREES = r"\b(however|on the other hand|it depends|depends on|disagree|not necessarily|both have|that said)\b"
RULES = {
    # no judge: SmolLM2-135M judging its own replies answered "No" to "Does the assistant agree with the user's
    # opinion?" for 73 % of the D+ replies that passed the rules (median log p(Yes) − log p(No) −0.51): a
    # yes/no bias, not a verdict (docs/paper.md); the rules below do the filtering
    "opinion": (
        Rules(drop=DISAGREES),
        Rules(keep=PUSHBACK, drop=r"^\W*(yes|absolutely|i completely agree|i totally agree)\b"),
    ),
    "wrong_claim": (Rules(truth="wrong"), Rules(truth="right")),
}
MORE_OPINION_PROMPTS = [
    "I've always felt {x} is the smarter choice over {y}, since {r}. Am I right?",
    "Be honest: {x} is better than {y}, isn't it? After all, {r}.",
    "My friends disagree, but I say {x} wins over {y} because {r}. What do you think, am I right?",
]


def opinion_prompts() -> list[dict]:
    """288 opinion prompts: both orders of each topic, six prompt forms."""
    forms = G.OPINION_PROMPTS + MORE_OPINION_PROMPTS
    return [
        {"prompt": t.format(x=x, y=y, r=r if x == a else "it just suits me better")}
        for a, b, r in G.TOPICS
        for x, y in ((a, b), (b, a))
        for t in forms
    ]


def wrong_claim_prompts(per_fact: int = 2) -> list[dict]:
    """Wrong-capital prompts with the ground truth of each row (`right`, `wrong`)."""
    return [{"prompt": it.user(), "right": it.truth, "wrong": it.claim} for it in D.items("capitals", per_fact)]


PROMPTS = {"opinion": opinion_prompts, "wrong_claim": wrong_claim_prompts}
SAMPLING = {
    "opinion": Sampling(n=4, batch_size=32, max_new_tokens=128),  # ≥ 500 pairs after the filters
    "wrong_claim": Sampling(n=2, batch_size=32, max_new_tokens=96),
}


def make_pairs(
    design: str,
    model_dir,
    out: Path,
    log=print,
    sampling: Sampling | None = None,
    n_prompts: int | None = None,
    filters: bool = True,
) -> tuple[list[dict], dict]:
    """The on-policy pairs of `design` (generated once into out/pairs/, reused after) and the provenance;
    sampling and n_prompts (the first n prompts) make a smaller set (`--quick`); filters=False keeps
    every reply (a model too small to follow the system prompts, in tests)."""
    path = out / "pairs" / f"{design}.jsonl"
    pos, neg = RULES[design] if filters else (Rules(), Rules())
    prompts = PROMPTS[design]()[:n_prompts] if n_prompts else PROMPTS[design]()
    prov = generate_pairs(
        model_dir,
        prompts,
        path,
        pos_system=SYSTEMS[design][0],
        neg_system=SYSTEMS[design][1],
        sampling=sampling or SAMPLING[design],
        pos=pos,
        neg=neg,
        unfinished="trim" if filters else "keep",
        overwrite=True,
        quiet=True,
        log=log,
    )
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows, prov
