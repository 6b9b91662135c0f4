"""`cws generate-pairs`: contrastive pairs sampled from the model itself, as the paper makes them.

For each prompt the model answers `n` times under a system prompt that shows the behavior (pos) and
`n` times under one that shows its opposite (neg); the system prompt is then dropped, each reply is
filtered (finished, a regex rule per side, a ground-truth rule, a yes/no judge), and the kept replies
of one prompt are paired pos with neg. The output is pairs JSONL that `cws train-pair` reads as is,
plus a provenance JSON. Samples are cached beside the output per batch, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import CwsError
from ..io.atomic import check_output, check_own_files, write_report
from .lm import Encoder, continuation_logprobs, device_of, load_tokenizer, resolve_model
from .pairs import Pair, load_pairs

SIDES = ("pos", "neg")
EXAMPLES = 3  # removed replies quoted per filter in the provenance
JUDGE_PROMPT = (
    "Read this exchange between a user and an assistant.\n\nUser: {user}\n\nAssistant: {reply}\n\n"
    "{question} Answer with Yes or No."
)


@dataclass(frozen=True)
class Sampling:
    """How replies are sampled: `n` per prompt and side, nucleus sampling, seeded per batch."""

    n: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    batch_size: int = 16  # sequences per generate call
    seed: int = 0


@dataclass(frozen=True)
class Rules:
    """What a kept reply of one side must satisfy (None: no such rule)."""

    keep: str | None = None  # a regex the reply must match (case-insensitive)
    drop: str | None = None  # a regex the reply must not match
    truth: str | None = None  # "right" or "wrong": the reply names the row's field of that name and not the other
    judge: str | None = None  # a yes/no question about the reply; kept when log p(Yes) − log p(No) ≥ threshold


@dataclass
class Tally:
    """Replies of one side: sampled, kept, and removed per filter (with a few examples)."""

    sampled: int = 0
    kept: int = 0
    trimmed: int = 0  # cut by max_new_tokens and trimmed to their last complete sentence (unfinished="trim")
    removed: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    judge_scores: list = field(default_factory=list)

    def remove(self, why: str, reply: str) -> None:
        self.removed[why] = self.removed.get(why, 0) + 1
        shown = self.examples.setdefault(why, [])
        if len(shown) < EXAMPLES:
            shown.append(reply[:300])


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check(sampling: Sampling, rules: dict[str, Rules], threshold: float) -> None:
    """Refuse, before any work, options no run could use."""
    s = sampling
    for name, v in (("n", s.n), ("max_new_tokens", s.max_new_tokens), ("batch_size", s.batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CwsError(f"{name}={v!r}: must be a positive integer")
    if not (isinstance(s.temperature, (int, float)) and math.isfinite(s.temperature) and s.temperature > 0):
        raise CwsError(f"temperature={s.temperature!r}: must be a finite number above 0")
    if not (isinstance(s.top_p, (int, float)) and 0 < s.top_p <= 1):
        raise CwsError(f"top_p={s.top_p!r}: must be in (0, 1]")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise CwsError(f"judge_threshold={threshold!r}: must be a finite number")
    for side, r in rules.items():
        for what in ("keep", "drop"):
            try:
                re.compile(getattr(r, what) or "")
            except re.error as e:
                raise CwsError(f"--{side}-{what} {getattr(r, what)!r}: not a regular expression ({e})") from None
        if r.truth not in (None, "right", "wrong"):
            raise CwsError(f"--{side}-truth {r.truth!r}: expected right or wrong")
        if r.judge is not None and not r.judge.strip():
            raise CwsError(f"--{side}-judge: the judge's question is empty")


def _system(text: str, side: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise CwsError(f"--{side}-system: the system prompt is empty")
    return text


def _prompts(data, rules: dict[str, Rules]) -> list[Pair]:
    """The prompt rows; a row with its own system message, or without the fields a truth rule reads, is refused."""
    rows = load_pairs(data, answers=False)
    where = data if isinstance(data, (str, os.PathLike)) else "rows"
    need = any(r.truth for r in rules.values())
    for p in rows:
        if not isinstance(p.prompt, str) and any(role == "system" for role, _ in p.prompt):
            raise CwsError(
                f"{where}: line {p.line}: has a system message; generate-pairs adds --pos-system/--neg-system"
            )
        if need:
            for key in ("right", "wrong"):
                v = p.fields.get(key)
                names = [v] if isinstance(v, str) else v
                if not isinstance(names, list) or not names or not all(isinstance(x, str) and x.strip() for x in names):
                    raise CwsError(
                        f'{where}: line {p.line}: a truth rule needs "{key}": a non-empty string or list of strings'
                    )
    return rows


def _messages(p: Pair, system: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": p.prompt}] if isinstance(p.prompt, str) else p.chat
    return ([{"role": "system", "content": system}] if system else []) + msgs


def _names(v) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def _mentions(reply: str, names: list[str]) -> bool:
    """Whether the reply names any of `names` (whole words, case-insensitive)."""
    return any(re.search(rf"(?<!\w){re.escape(x.strip())}(?!\w)", reply, re.IGNORECASE) for x in names)


def rule_verdict(reply: str, p: Pair, r: Rules) -> str | None:
    """Why a (finished) reply fails the side's regex and truth rules, or None when it passes."""
    if r.keep and not re.search(r.keep, reply, re.IGNORECASE):
        return f"does not match keep {r.keep!r}"
    if r.drop and re.search(r.drop, reply, re.IGNORECASE):
        return f"matches drop {r.drop!r}"
    if r.truth:
        other = "wrong" if r.truth == "right" else "right"
        if not _mentions(reply, _names(p.fields[r.truth])):
            return f"does not name the {r.truth} answer"
        if _mentions(reply, _names(p.fields[other])):
            return f"names the {other} answer"
    return None


class Sampler:
    """Replies of one model to chat prompts: nucleus sampling, left-padded batches, seeded per batch."""

    def __init__(self, model, enc: Encoder, sampling: Sampling):
        self.model, self.enc, self.s = model, enc, sampling
        self.eos = enc.tok.eos_token_id

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], seed: int) -> list[list[tuple[str, bool]]]:
        """For each prompt, n (reply, finished) pairs; `finished`: it ended before max_new_tokens."""
        from .lm import _left_pad

        ids, mask = _left_pad(prompts, self.enc.pad)
        dev = self.model.device
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            do_sample=True,
            temperature=self.s.temperature,
            top_p=self.s.top_p,
            top_k=0,
            max_new_tokens=self.s.max_new_tokens,
            num_return_sequences=self.s.n,
            pad_token_id=self.enc.pad,
            eos_token_id=self.eos,
        )
        new = out[:, ids.shape[1] :].tolist()
        res = []
        for seq in new:
            finished = self.eos in seq
            text = self.enc.tok.decode(seq[: seq.index(self.eos)] if finished else seq, skip_special_tokens=True)
            res.append((text.strip(), finished))
        return [res[i * self.s.n : (i + 1) * self.s.n] for i in range(len(prompts))]


class Judge:
    """log p(Yes) − log p(No) of a model asked a yes/no question about a reply (its chat template)."""

    def __init__(self, model, enc: Encoder):
        self.model, self.enc = model, enc
        self.yes, self.no = enc.answer("Yes"), enc.answer("No")

    def __call__(self, items: list[tuple[str, str, str]], batch: int = 16) -> list[float]:
        """Scores of (user text, reply, question) items."""
        prompts = [self.enc.prompt(JUDGE_PROMPT.format(user=u, reply=r, question=q)) for u, r, q in items]
        lps = continuation_logprobs(self.model, prompts, [[self.yes, self.no]] * len(prompts), self.enc.pad, batch)
        return [y - n for y, n in lps]


def _user_text(p: Pair) -> str:
    return p.prompt if isinstance(p.prompt, str) else "\n\n".join(c for role, c in p.prompt if role == "user")


def _load_model(path, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


class Cache:
    """Sampled batches in a JSONL beside the output, one line per (side, batch), keyed by what made them."""

    def __init__(self, path: Path):
        self.path, self.lines = path, {}
        if path.is_file():
            for raw in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(raw)
                    self.lines[row["key"]] = row["replies"]
                except (ValueError, KeyError, TypeError, RecursionError):
                    continue  # a line cut by a kill: sampled again

    def get(self, key: str):
        return self.lines.get(key)

    def put(self, key: str, replies) -> None:
        self.put_many({key: replies})

    def put_many(self, entries: dict) -> None:
        """Append entries (one line each: a line cut by a kill is only that entry lost)."""
        with open(self.path, "a") as f:
            f.write("".join(json.dumps({"key": k, "replies": v}) + "\n" for k, v in entries.items()))
        self.lines.update(entries)


def _sample_all(sampler, enc, rows, systems, sampling, model_id, cache, quiet) -> dict:
    """{side: [[(reply, finished) × n] per prompt]}, from the cache where it has the batch."""
    from ..ops.progress import progress

    per = max(1, sampling.batch_size // sampling.n)  # prompts per generate call
    groups = [list(range(lo, min(lo + per, len(rows)))) for lo in range(0, len(rows), per)]
    out = {s: [None] * len(rows) for s in SIDES}
    bar = progress(len(groups) * len(SIDES), "generate-pairs", disable=quiet, unit="batches")
    try:
        for s in SIDES:
            for g, idx in enumerate(groups):
                prompts = [enc.prompt(_messages(rows[i], systems[s])) for i in idx]
                key = _sha([model_id, asdict(sampling), s, systems[s], g, prompts])
                got = cache.get(key)
                if got is None:
                    seed = int(_sha([sampling.seed, s, g]), 16) % 2**31
                    got = sampler(prompts, seed)
                    cache.put(key, got)
                for i, replies in zip(idx, got):
                    out[s][i] = [(r, bool(f)) for r, f in replies]
                bar.update(1)
    finally:
        bar.close()
    return out


def _judged(judge, items: list[tuple[str, str, str]], cache: Cache | None, judge_id: str) -> list[float]:
    """The judge's scores of items, from the cache where it has them (a rerun with other filters)."""
    if cache is None:
        return judge(items)
    keys = [_sha([judge_id, JUDGE_PROMPT, it]) for it in items]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    if todo:
        cache.put_many({keys[i]: s for i, s in zip(todo, judge([items[i] for i in todo]))})
    return [cache.get(k) for k in keys]


UNFINISHED = ("drop", "trim", "keep")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def trimmed(reply: str) -> str:
    """A reply cut by max_new_tokens, up to the end of its last complete sentence ("" when none)."""
    ends = list(_SENTENCE_END.finditer(reply))
    return reply[: ends[-1].end()].strip() if ends else ""


def _filter(samples, rows, rules, judge, threshold, unfinished, cache=None, judge_id="") -> tuple[dict, dict]:
    """{side: [kept replies per prompt]} and {side: Tally}."""
    kept = {s: [[] for _ in rows] for s in SIDES}
    tally = {s: Tally() for s in SIDES}
    for s in SIDES:
        pending = []  # (prompt index, reply) passing the rules, for the judge
        for i, (p, replies) in enumerate(zip(rows, samples[s])):
            for reply, finished in replies:
                tally[s].sampled += 1
                if not finished and unfinished == "trim":
                    reply, finished = trimmed(reply), True
                    tally[s].trimmed += 1
                why = (
                    ("empty" if not reply else None)
                    or (None if finished or unfinished == "keep" else "unfinished (hit max_new_tokens)")
                    or rule_verdict(reply, p, rules[s])
                )
                if why:
                    tally[s].remove(why, reply)
                else:
                    pending.append((i, reply))
        if rules[s].judge and pending:
            scores = _judged(judge, [(_user_text(rows[i]), r, rules[s].judge) for i, r in pending], cache, judge_id)
            tally[s].judge_scores = [round(x, 3) for x in scores]
            passed = []
            for (i, r), sc in zip(pending, scores):
                if sc >= threshold:
                    passed.append((i, r))
                else:
                    tally[s].remove(f"judge below {threshold:g}", r)
            pending = passed
        for i, r in pending:
            kept[s][i].append(r)
        tally[s].kept = len(pending)
    return kept, tally


def _pair_rows(rows, kept, per_prompt) -> list[dict]:
    """Output rows: each prompt's kept pos replies paired in order with its kept neg replies."""
    out = []
    for p, pos, neg in zip(rows, kept["pos"], kept["neg"]):
        base = {"prompt": p.prompt} if isinstance(p.prompt, str) else {"messages": p.chat}
        for a, b in list(zip(pos, neg))[:per_prompt]:
            out.append({**base, "pos": a, "neg": b, **p.fields})
    return out


def _summary(tally: dict) -> str:
    def side(s):
        t = tally[s]
        why = ", ".join(f"{k} {v}" for k, v in sorted(t.removed.items(), key=lambda kv: -kv[1]))
        return f"{s} kept {t.kept} of {t.sampled}" + (f" (removed: {why})" if why else "")

    return "; ".join(side(s) for s in SIDES)


def generate_pairs(
    model,
    prompts,
    out,
    *,
    pos_system: str,
    neg_system: str,
    sampling: Sampling = Sampling(),
    pos: Rules = Rules(),
    neg: Rules = Rules(),
    judge_model=None,
    judge_threshold: float = 0.0,
    unfinished: str = "drop",
    pairs_per_prompt: int | None = None,
    device=None,
    overwrite: bool = False,
    quiet: bool = False,
    log=print,
) -> dict:
    """Sample, filter and pair replies of `model` to `prompts` (JSONL path or rows) under the two system
    prompts; writes `out` (pairs JSONL) and OUT.provenance.json; returns the provenance."""
    from .train_pair import model_fingerprint

    if unfinished not in UNFINISHED:
        raise CwsError(f"unfinished={unfinished!r}: expected one of {', '.join(UNFINISHED)}")
    rules = {"pos": pos, "neg": neg}
    _check(sampling, rules, judge_threshold)
    if pairs_per_prompt is not None and (
        isinstance(pairs_per_prompt, bool) or not isinstance(pairs_per_prompt, int) or pairs_per_prompt < 1
    ):
        raise CwsError(f"pairs_per_prompt={pairs_per_prompt!r}: must be a positive integer")
    systems = {"pos": _system(pos_system, "pos"), "neg": _system(neg_system, "neg")}
    base = resolve_model(model)
    rows = _prompts(prompts, rules)
    out = Path(out)
    prov_path = out.with_name(out.stem + ".provenance.json")
    inputs = [base] + ([prompts] if isinstance(prompts, (str, os.PathLike)) else [])
    check_own_files((out, prov_path), prov_path, ("model_fingerprint", "systems", "filters"))  # never a user's file
    for path in (out, prov_path):
        check_output(path, inputs, overwrite=overwrite, what="generate-pairs output")
    judged = any(r.judge for r in rules.values())
    judge_base = resolve_model(judge_model) if judge_model else base
    enc = Encoder(load_tokenizer(base))
    if not enc.templated:
        raise CwsError(f"{base}: generate-pairs needs a tokenizer with a chat template (it sets a system prompt)")
    dev = device_of(device)
    model_id = model_fingerprint(base)
    log(f"generate-pairs: {len(rows)} prompts x {sampling.n} replies x 2 system prompts, model {base}")
    lm = _load_model(base, dev)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = Cache(out.with_name(out.stem + ".cache.jsonl"))
    samples = _sample_all(Sampler(lm, enc, sampling), enc, rows, systems, sampling, model_id, cache, quiet)
    judge = None
    if judged:
        jm = lm if judge_base == base else _load_model(judge_base, dev)
        jenc = enc if judge_base == base else Encoder(load_tokenizer(judge_base))
        judge = Judge(jm, jenc)
    judge_id = model_id if judge_base == base else model_fingerprint(judge_base)
    kept, tally = _filter(samples, rows, rules, judge, judge_threshold, unfinished, cache, judge_id)
    pairs = _pair_rows(rows, kept, pairs_per_prompt)
    if not pairs:
        raise CwsError(
            f"every prompt lost all its replies on one side ({_summary(tally)}); nothing was written — "
            f"loosen a filter, raise --n or --max-new-tokens"
        )
    provenance = {
        "model": str(model),
        "model_dir": str(base),
        "model_fingerprint": model_id,
        "prompts": str(prompts) if isinstance(prompts, (str, os.PathLike)) else f"{len(rows)} rows",
        "n_prompts": len(rows),
        "systems": systems,
        "sampling": asdict(sampling),
        "rules": {s: asdict(r) for s, r in rules.items()},
        "judge": {"model": str(judge_base), "threshold": judge_threshold, "prompt": JUDGE_PROMPT} if judged else None,
        "unfinished": unfinished,
        "pairs_per_prompt": pairs_per_prompt,
        "filters": {s: asdict(t) for s, t in tally.items()},
        "pairs": len(pairs),
        "prompts_with_pairs": sum(1 for a, b in zip(kept["pos"], kept["neg"]) if a and b),
        "output": str(out),
    }
    write_report(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs), inputs)
    write_report(prov_path, json.dumps(provenance, indent=1, ensure_ascii=False), inputs)
    log(f"  {_summary(tally)}")
    log(
        f"  {len(pairs)} pairs from {provenance['prompts_with_pairs']} of {len(rows)} prompts -> {out} "
        f"(provenance {prov_path})"
    )
    return provenance
