"""A direction as a llama.cpp LoRA adapter GGUF (cws export-gguf).

llama.cpp (and Ollama, built on it) applies a LoRA adapter at run time on a quantized base, with a scale s
per adapter and per request: W' = W + s·(alpha/r)·B·A, or W + s·B·A where the adapter's alpha is 0.
cws writes α·w's low-rank entries with alpha 0, so s multiplies α·w exactly: θ + s·α·w.

Names come from gguf's own tables (`gguf.get_tensor_name_map`), for the architecture the base GGUF
declares (or, for an HF base, the one llama.cpp converts it to). llama.cpp's converter permutes the rows
of Llama-family q/k projections (its rotary layout); their B factors are permuted the same way. The
token embedding's pair is stored flipped, as llama.cpp reads it (lora_a (vocab, r), lora_b (hidden, r)).
Dense entries cannot be LoRA factors: `cws compress` makes them low-rank first, or --exclude leaves them
out; either way nothing is left out unasked.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from .checks import name_filter, nonfinite
from ..errors import CwsError
from .schedule import n_layers_of
from ..io.direction import Direction, Entry
from ..io.layout import module_of
from ..io.reader import read_tensor

# HF architectures → the llama.cpp architecture convert_hf_to_gguf.py gives them (where the base is an
# HF directory; a GGUF base names its own). Llama-family models have their q/k rows permuted.
HF_ARCHES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
}
PERMUTED_QK = {"llama"}
DTYPES = {"f32": torch.float32, "f16": torch.float16}
_LAYER = re.compile(r"\blayers\.(\d+)\.")


def export_gguf(
    direction: str | os.PathLike | Direction,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike,
    alpha: float = 1.0,
    dtype: str = "f32",
    include: str | None = None,
    exclude: str | None = None,
    overwrite: bool = False,
    schedule=None,
) -> dict:
    """Write α·w as a llama.cpp LoRA adapter GGUF at `out` for `base` (its GGUF file, or its HF directory);
    returns a summary: the architecture, each written tensor's GGUF name and rank, what was excluded.
    `schedule` (`cws.ops.schedule.Schedule`) multiplies α per tensor, by layer (the base's block count)
    and by module."""
    from ..io.hub import resolve

    gguf = _gguf()
    if not math.isfinite(alpha):
        raise CwsError(f"alpha must be a finite number, got {alpha}")
    if dtype not in DTYPES:
        raise CwsError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    d = direction if isinstance(direction, Direction) else Direction.open(resolve(direction, "direction"))
    model = _base(gguf, base)
    final = _check_out(gguf, Path(out), overwrite, [d.path, model["path"]])
    keep = name_filter(include, exclude)
    everything = {**d.entries, **({a: d.get(a) for a in d.ties} if not model["tied"] else {})}
    excluded = [n for n in everything if not keep(n)]
    entries = {n: e for n, e in everything.items() if keep(n)}
    names = _gguf_names(gguf, model, entries, d)
    if schedule is not None:
        schedule = schedule.bind(model["blocks"] or n_layers_of(entries), sorted(entries))
    tensors = {}
    for name, e in entries.items():
        scaled = alpha * (schedule.factor(name) if schedule is not None else 1.0)
        for key, t in _pair(e, names[name], model, scaled).items():
            t = t.to(DTYPES[dtype]).contiguous()
            if nonfinite(t):
                raise CwsError(f"tensor {name!r}: α·w holds NaN/Inf as {DTYPES[dtype]} factors")
            tensors[key] = t
    _write(gguf, final, model["arch"], tensors, alpha, d.path, schedule.record() if schedule else "")
    return {
        "adapter": str(final),
        "architecture": model["arch"],
        "alpha": alpha,
        **({"schedule": schedule.record()} if schedule else {}),
        "tensors": {names[n]: {"from": n, "rank": e.rank} for n, e in entries.items()},
        "excluded": excluded,
    }


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CwsError("export-gguf needs the gguf package: pip install gguf") from None
    return gguf


def _base(gguf, base) -> dict:
    """The base's llama.cpp architecture, block count, head counts and (for a GGUF) tensor shapes (ne order)."""
    from ..io.files import resolve
    from ..io.ties import read_config

    path = resolve(base)
    if not os.path.lexists(path):
        raise CwsError(f"base {path}: no such file or directory")
    if path.is_file():
        try:
            r = gguf.GGUFReader(path)
            field = lambda key: r.fields[key].contents() if key in r.fields else None  # noqa: E731
            arch = field("general.architecture")
        except Exception as e:  # any unreadable file is one line
            raise CwsError(f"base {path}: not a GGUF file gguf can read ({type(e).__name__}: {e})") from None
        if field("general.type") == "adapter":
            raise CwsError(f"base {path}: is a LoRA adapter GGUF, not a model")
        return {
            "path": path,
            "arch": arch,
            "blocks": field(f"{arch}.block_count"),
            "heads": (field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")),
            "shapes": {t.name: tuple(int(x) for x in t.shape) for t in r.tensors},
            "tied": not any(t.name == "output.weight" for t in r.tensors),
        }
    cfg = read_config(path)
    if cfg is None:
        raise CwsError(f"base {path}: neither a GGUF file nor a model directory with a config.json")
    names = cfg.get("architectures") or ["?"]
    if names[0] not in HF_ARCHES:
        raise CwsError(
            f"base {path}: architecture {names[0]!r} has no llama.cpp name mapping in cws "
            f"(known: {', '.join(HF_ARCHES)}); pass the base's GGUF file as --base instead"
        )
    heads = cfg.get("num_attention_heads")
    return {
        "path": path,
        "arch": HF_ARCHES[names[0]],
        "blocks": cfg.get("num_hidden_layers"),
        "heads": (heads, cfg.get("num_key_value_heads", heads)),
        "shapes": None,
        "tied": bool(cfg.get("tie_word_embeddings", False)),
    }


def _gguf_names(gguf, model: dict, entries: dict[str, Entry], d: Direction) -> dict[str, str]:
    """Every entry's GGUF tensor name; one line for the first problem of each kind (dense entries, names
    with no GGUF name, names or shapes the base GGUF lacks)."""
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(model["arch"])
    if arch is None:
        raise CwsError(f"base {model['path']}: llama.cpp architecture {model['arch']!r} is unknown to gguf")
    tied_embed = [n for n in entries if model["tied"] and module_of(n) in ("embed", "head")]
    if tied_embed:  # llama.cpp runs the tied head through the embedding's adapter as a linear one: it aborts
        raise CwsError(
            f"base {model['path']} ties its output head to the token embedding, and llama.cpp cannot apply a "
            f"LoRA on the embedding of such a model (it aborts); leave {tied_embed[0]} out with --exclude REGEX"
        )
    dense = [n for n, e in entries.items() if e.kind == "dense"]
    if dense:
        raise CwsError(
            f"{d.path}: {len(dense)} dense entries ({', '.join(dense[:3])}{', …' if len(dense) > 3 else ''}): "
            f"a llama.cpp adapter holds low-rank factors only; make them low-rank with `cws compress` "
            f"(--rank R or --energy E), or leave them out with --exclude REGEX"
        )
    table = gguf.get_tensor_name_map(arch, int(model["blocks"] or 0) + 1)
    names, unmapped = {}, []
    for n in entries:
        g = table.get_name(n, try_suffixes=(".weight", ".bias"))
        (unmapped.append(n) if g is None else names.__setitem__(n, g))
    if unmapped:
        raise CwsError(
            f"{len(unmapped)} entries have no llama.cpp tensor name for architecture {model['arch']!r} "
            f"({', '.join(unmapped[:3])}{', …' if len(unmapped) > 3 else ''}); leave them out with --exclude REGEX"
        )
    if model["shapes"] is not None:
        for n, g in names.items():
            have = model["shapes"].get(g)
            want = tuple(reversed(entries[n].shape))  # GGUF lists dimensions fastest first
            if have is None:
                raise CwsError(f"{n}: the base GGUF has no tensor {g!r}; is it the model the direction was made on?")
            if have != want:
                raise CwsError(f"{n}: {g} in the base GGUF is {list(have)} (ne), the direction's entry {list(want)}")
    return names


def _pair(e: Entry, gname: str, model: dict, alpha: float) -> dict[str, torch.Tensor]:
    """{gname.lora_a, gname.lora_b} for α·scale·B·A in llama.cpp's layout (fp32)."""
    B = read_tensor(e.B).float() * (float(alpha) * e.scale)  # (out, r)
    A = read_tensor(e.A).float()  # (r, in)
    if model["arch"] in PERMUTED_QK and re.search(r"\.attn_[qk]\.(weight|bias)$", gname):
        heads = model["heads"][0] if ".attn_q." in gname else model["heads"][1]
        B = B[rope_permutation(B.shape[0], heads)]
    if gname == "token_embd.weight":  # read by token: lora_a (vocab, r) rows, lora_b (hidden, r)
        return {f"{gname}.lora_a": B, f"{gname}.lora_b": A.T}
    return {f"{gname}.lora_a": A, f"{gname}.lora_b": B}


def rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives a Llama q/k projection: per head, the two rotary halves
    interleaved (row h·d + 2j + i ← h·d + i·d/2 + j)."""
    if not heads or rows % (2 * heads):
        raise CwsError(f"cannot permute {rows} rows for {heads} heads (the base's head counts are needed)")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _check_out(gguf, final: Path, overwrite: bool, inputs) -> Path:
    """The output path: an existing file is replaced only with `overwrite`, and only if cws wrote it."""
    from ..io.atomic import check_output

    final = check_output(final, [str(p) for p in inputs], overwrite=True, what="output")
    if os.path.lexists(final):
        if final.is_dir():
            raise CwsError(f"{final}: is a directory; give a file name for the adapter")
        try:
            ours = gguf.GGUFReader(final).fields["cws.op"].contents() == "export-gguf"
        except Exception:  # not a GGUF, or not one of ours
            ours = False
        if not ours:
            raise CwsError(f"{final}: a file cws did not write; choose another --out or remove it")
        if not overwrite:
            raise CwsError(f"{final} exists; pass --overwrite")
    if not final.parent.is_dir():
        raise CwsError(f"{final}: the folder {final.parent} does not exist")
    return final


def _write(gguf, final: Path, arch: str, tensors: dict[str, torch.Tensor], alpha: float, source, schedule="") -> None:
    """The adapter GGUF, written to a temporary beside `final`, fsynced and renamed into place."""
    from .. import __version__
    from ..io.atomic import remove_stale, temp_path
    from ..io.writer import _fsync_path

    remove_stale(final)
    tmp = temp_path(final)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # llama.cpp then scales by s alone: θ + s·α·w
        for key, value in (("op", "export-gguf"), ("version", __version__), ("direction", str(source))):
            w.add_string(f"cws.{key}", value)
        w.add_float32("cws.alpha", float(alpha))
        if schedule:
            w.add_string("cws.schedule", schedule)  # α per tensor: α × this schedule's factor
        for name, t in tensors.items():
            w.add_tensor(name, t.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _fsync_path(tmp)
        os.rename(tmp, final)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CwsError(f"cannot write {final}: {e.strerror or e}; nothing was left behind") from e
        raise
    try:  # the rename itself, as ShardedWriter makes its outputs durable
        _fsync_path(final.parent)
    except OSError as e:
        raise CwsError(f"wrote {final}, but could not sync its folder: {e.strerror or e}") from e
