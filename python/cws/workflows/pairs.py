"""Contrastive examples: rows {"prompt": …, "pos": …, "neg": …} or {"messages": [...], "pos": …, "neg": …},
read from JSONL (or given as dicts) and checked, every malformed row reported with its line number."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CwsError, ListedError
from ..io.files import read_bytes

SHOWN = 20  # malformed rows listed in the error (all are counted)


@dataclass(frozen=True)
class Pair:
    prompt: str | tuple  # a user message, or messages as ((role, content), ...)
    pos: str | None  # the answer showing the behavior
    neg: str | None  # the answer showing the opposite
    line: int  # 1-based line in the file (the row's index + 1 for rows given in memory)
    fields: dict = field(default_factory=dict, compare=False, hash=False)  # the row's other keys (e.g. right, wrong)

    @property
    def chat(self) -> str | list[dict]:
        """The prompt as the encoder takes it."""
        return self.prompt if isinstance(self.prompt, str) else [{"role": r, "content": c} for r, c in self.prompt]


KEYS = ("prompt", "messages", "pos", "neg", "right", "wrong")  # right/wrong: facts that generate-pairs checks


def _misspelled(row: dict) -> str | None:
    """A key of `row` that reads as a misspelling of a known one ("promt"); other extra keys are kept."""
    for key in row:
        near = difflib.get_close_matches(str(key).lower(), KEYS, 1, 0.66) if key not in KEYS else None
        if near:
            return f"unknown key {key!r} (did you mean {near[0]!r}? a row takes prompt or messages, pos, neg)"
    return None


def _check(row, answers: bool) -> str | None:
    """What is wrong with a row, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if why := _misspelled(row):
        return why
    if ("prompt" in row) == ("messages" in row):
        return 'needs exactly one of "prompt" and "messages"'
    if "prompt" in row and (not isinstance(row["prompt"], str) or not row["prompt"].strip()):
        return '"prompt" must be a non-empty string'
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return '"messages" must be a non-empty list'
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f'messages[{i}] must be {{"role": str, "content": str}}'
        if msgs[-1]["role"] == "assistant":
            return 'the last message is the assistant\'s; the answers go in "pos"/"neg"'
    for key in ("pos", "neg"):
        if key not in row:
            if answers:
                return f'"{key}" is missing'
        elif not isinstance(row[key], str) or not row[key].strip():
            return f'"{key}" must be a non-empty string'
    if ("pos" in row) != ("neg" in row):
        return 'has one of "pos"/"neg" without the other'
    texts = [row.get("prompt"), row.get("pos"), row.get("neg")] + [m["content"] for m in row.get("messages", [])]
    for t in texts:
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                return "holds text that is not valid Unicode (a lone surrogate escape such as \\ud800)"
    return None


def load_pairs(data, answers: bool = True) -> list[Pair]:
    """Rows from a JSONL file (or a list of dicts). answers=True: every row needs "pos" and "neg";
    else they are optional (a row without them is a prompt only). Raises CwsError naming every bad line."""
    where = "rows"
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not os.path.lexists(path):
            raise CwsError(f"{path}: no such file")
        where, lines, rows = str(path), read_bytes(path).removeprefix(b"\xef\xbb\xbf").splitlines(), []
        bad = []
        for n, raw in enumerate(lines, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append((n, f"not UTF-8 text (byte {e.start + 1})"))
                continue
            if not text.strip():
                continue
            try:
                rows.append((n, json.loads(text)))
            except json.JSONDecodeError as e:
                bad.append((n, _json_error(text, e)))
            except RecursionError:
                bad.append((n, "JSON nested too deeply"))
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                bad.append((n, f"not readable JSON ({str(e)[:80]})"))
    else:
        rows, bad = list(enumerate(data, 1)), []
    pairs = []
    for n, row in rows:
        why = _check(row, answers)
        if why:
            bad.append((n, why))
        else:
            prompt = row["prompt"] if "prompt" in row else tuple((m["role"], m["content"]) for m in row["messages"])
            rest = {k: v for k, v in row.items() if k not in ("prompt", "messages", "pos", "neg")}
            pairs.append(Pair(prompt, row.get("pos"), row.get("neg"), n, rest))
    if len(bad) == 1:
        raise CwsError(f"{where}: line {bad[0][0]}: {bad[0][1]}; nothing was done")
    if bad:
        more = f"\n  … and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        shown = "\n  ".join(f"line {n}: {why}" for n, why in sorted(bad)[:SHOWN])
        raise ListedError(f"{where}: {len(bad)} malformed row(s); nothing was done:\n  {shown}{more}")
    if not pairs:
        raise CwsError(f"{where}: no rows")
    return pairs


def _json_error(text: str, e: json.JSONDecodeError) -> str:
    """A JSON parse error of a row in words: "Extra data" is text after the object (a trailing comma?)."""
    if e.msg != "Extra data":
        return f"not valid JSON ({e.msg} at column {e.colno})"
    comma = " (a trailing comma?)" if text[e.pos :].lstrip().startswith(",") else ""
    return f"not valid JSON: extra text after the object at column {e.colno}{comma}"
