"""PEFT LoRA adapters as cws inputs: read them as they are, never merged.

An adapter's tensors map to base-model tensor names: LoRA factors give low-rank deltas
scale·B·A (scale = lora_alpha/r, or /√r with rslora, per-module rank/alpha patterns honoured;
transposed for fan_in_fan_out and embedding LoRA); `modules_to_save` (and trained biases) give
full tensors, under every key spelling PEFT versions have used.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import Checkpoint
from .files import changed, load_json, open_regular, resolve
from .layout import module_of
from .format import TensorInfo

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_LORA_EMB = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?$")
_SAVED = re.compile(r"^(?P<module>.+?)\.modules_to_save(?:\.(?P<adapter>[^.]+))?\.(?P<param>[^.]+)$")
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)$")
# Settings whose adapters cws cannot represent exactly: refuse rather than answer wrongly.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases (lora_bias)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
}


def is_adapter(path) -> bool:
    """True for a PEFT adapter directory (it holds adapter_config.json)."""
    if path is None or not Path(path).is_dir():
        return False
    if os.path.lexists(Path(path) / CONFIG):  # a bad one is refused by read_config, not skipped
        return True
    if any(Path(path).glob("adapter_model*")):
        raise CheckpointError(
            f"{Path(path).resolve()}: adapter weights without {CONFIG}; cannot tell r, alpha or targets"
        )
    return False


@dataclass(frozen=True)
class LoraDelta:
    """delta = scale·B·A (shape (B.rows, A.cols)), or its transpose when `transposed`."""

    name: str
    B: TensorInfo  # (out, r) as stored
    A: TensorInfo  # (r, in) as stored
    scale: float
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        s = (self.B.shape[0], self.A.shape[1])
        return s[::-1] if self.transposed else s

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class Adapter:
    """A PEFT LoRA adapter: low-rank deltas and full tensors by base-model tensor name."""

    path: Path
    config: dict
    checkpoint: Checkpoint
    lora: dict[str, LoraDelta] = field(default_factory=dict)
    full: dict[str, TensorInfo] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)  # {lm_head: embed}: saved once-trained tied copies
    _keep: object = field(default=None, repr=False)  # the in-memory file of cut expert factors, while in use

    @classmethod
    def open(cls, path: str | os.PathLike) -> Adapter:
        path = resolve(path)
        cfg_file = path / CONFIG
        if not os.path.lexists(cfg_file):
            raise CheckpointError(f"{path}: not a PEFT adapter (no {CONFIG})")
        config = read_config(cfg_file)
        if not (path / WEIGHTS).is_file():
            pickled = [p.name for p in path.glob("adapter_model*.bin")]
            why = (
                f"{pickled[0]} is a pickle file, not read for safety; re-save with safe_serialization=True"
                if pickled
                else f"no {WEIGHTS}"
            )
            raise CheckpointError(f"{path}: {why}")
        ad = cls(path, config, Checkpoint.open(path / WEIGHTS))
        ad._map_keys()
        ad._find_ties()
        return ad

    def _find_ties(self) -> None:
        """With PEFT's ensure_weight_tying, a tied model's embed_tokens and lm_head are trained as one
        tensor and saved twice: record the tie where the two saved copies are the same bits."""
        if not self.config.get("ensure_weight_tying"):
            return
        heads = [n for n in self.full if module_of(n) == "head"]
        embeds = [n for n in self.full if module_of(n) == "embed"]
        if len(heads) == 1 and len(embeds) == 1 and same_bits(self.full[heads[0]], self.full[embeds[0]]):
            self.ties = {heads[0]: embeds[0]}

    def _map_keys(self) -> None:
        factors: dict[str, dict[str, TensorInfo]] = {}
        kinds: dict[str, bool] = {}
        base_layers: dict[str, str] = {}
        for key, info in self.checkpoint.tensors.items():
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            m = _LORA.match(name) or _LORA_EMB.match(name)
            if m:
                ab = factors.setdefault(m["module"], {})
                if m["which"] in ab:  # one module's factors under two adapter names
                    raise CheckpointError(
                        f"{self.path}: LoRA module {m['module']!r} has two lora_{m['which']} factors "
                        f"({ab[m['which']].name!r} and {key!r}); save one adapter per directory"
                    )
                ab[m["which"]] = info
                kinds[m["module"]] = m.re is _LORA_EMB
                continue
            if ".original_module." in name:
                self.ignored[key] = "PEFT's copy of the base module (not part of the fine-tune)"
                continue
            if ".base_layer." in name:  # save_embedding_layers: the frozen layer under the LoRA, saved whole
                base_layers[key] = name.split(".base_layer.")[0]
                continue
            if "lora_magnitude_vector" in name or ".lora_" in name:
                raise CheckpointError(f"{self.path}: tensor {key!r} belongs to an adapter type cws does not support")
            m = _SAVED.match(name)
            target = f"{m['module']}.{m['param']}" if m else name
            if target in self.full:
                raise CheckpointError(f"{self.path}: {target!r} is stored twice (keys {key!r} and another spelling)")
            self.full[target] = info
        for key, module in base_layers.items():
            if module not in factors:
                raise CheckpointError(f"{self.path}: {key!r} is a base layer's copy with no LoRA factors beside it")
            self.ignored[key] = "PEFT's copy of the frozen layer under a LoRA (save_embedding_layers)"
        if self.config.get("target_parameters"):
            self._param_lora(factors)
        for module, ab in factors.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{self.path}: LoRA module {module!r} has lora_{set('AB') - set(ab)} missing")
            A, B = ab["A"], ab["B"]
            if len(A.shape) != 2 or len(B.shape) != 2:
                raise CheckpointError(f"{self.path}: LoRA module {module!r} has factors that are not matrices")
            if A.shape[0] != B.shape[1]:
                raise CheckpointError(
                    f"{self.path}: LoRA module {module!r}: B {list(B.shape)} and A {list(A.shape)} do not chain"
                )
            r, alpha = self._rank_alpha(module)
            if r != A.shape[0]:
                raise CheckpointError(f"{self.path}: {module!r} has rank {A.shape[0]} but adapter_config gives r={r}")
            scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
            # Embedding LoRA (A (r, vocab), B (dim, r)) and fan_in_fan_out layers store delta = (B·A)ᵀ.
            # PEFT keeps fan_in_fan_out only for GPT-2-style Conv1D layers (it resets it for Linear).
            conv1d = bool(self.config.get("fan_in_fan_out")) and _CONV1D.search(module) is not None
            transposed = kinds[module] or conv1d
            self.lora[f"{module}.weight"] = LoraDelta(f"{module}.weight", B, A, scale, transposed)
        both = set(self.lora) & set(self.full)
        if both:
            raise CheckpointError(f"{self.path}: {sorted(both)[0]!r} has both LoRA factors and a full saved copy")

    def _param_lora(self, factors: dict) -> None:
        """LoRA on parameters (PEFT's `target_parameters`: a ParamWrapper per parameter, nested, keyed
        `<module>[.base_layer…].lora_A/B`): on a fused 3-D expert tensor (experts, out, in), A (r·E, in)
        and B (out, r·E) give expert e the delta scale·B[:, e::E]·A[e·r:(e+1)·r]. Which fused tensor a
        wrapper holds is told by the base's per-expert shapes (PEFT saves target_parameters as an
        unordered set). Each expert's row blocks (gate and up of gate_up_proj) become LoRA deltas under
        the checkpoint's names, from transformers' table for the base's model type; their factors are
        cut once into an in-memory safetensors file (`_cut`). Taken out of `factors`."""
        from .experts import expert_names

        targets = [str(t) for t in self.config["target_parameters"]]
        owners: dict[str, list[str]] = {}
        for module in list(factors):
            owner = module
            while owner.endswith(".base_layer"):
                owner = owner[: -len(".base_layer")]
            if any(("." + owner).endswith("." + t.rsplit(".", 1)[0]) for t in targets if "." in t):
                owners.setdefault(owner, []).append(module)
        base = self._base() if owners else None
        model_type = base.config_model_type if base is not None else None
        cut = {}
        for owner, wrappers in owners.items():
            params = [t.rsplit(".", 1)[1] for t in targets if ("." + owner).endswith("." + t.rsplit(".", 1)[0])]
            for module in wrappers:
                ab = factors.pop(module)
                A, B = ab["A"], ab["B"]
                fits = [p for p in params if self._block_rows(f"{owner}.{p}", A, B, base.checkpoint, model_type)]
                if len(fits) != 1:
                    raise CheckpointError(
                        f"{self.path}: LoRA factors {list(B.shape)}, {list(A.shape)} of {owner} fit "
                        f"{'none' if not fits else ' and '.join(fits)} of its target parameters on the base {base.path}"
                    )
                fused = f"{owner}.{fits[0]}"
                r, alpha = self._rank_alpha(fused)
                if A.shape[0] % r or B.shape[1] != A.shape[0]:
                    raise CheckpointError(
                        f"{self.path}: {fused}: LoRA factors {list(B.shape)}, {list(A.shape)} are not r={r} per expert"
                    )
                names = expert_names(fused, A.shape[0] // r, model_type)
                rows = self._block_rows(fused, A, B, base.checkpoint, model_type)
                cut[fused] = (A, B, names, rows, alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r)
        if cut:
            self._cut(cut)

    def _cut(self, cut: dict) -> None:
        """Per-expert factors into an in-memory safetensors file (a memfd, gone with the process; a
        temporary file where there is none), read as any other input."""
        import tempfile

        from safetensors.torch import save

        from .direct import pwrite_all
        from .format import read_header
        from .reader import read_tensor

        tensors, deltas = {}, {}
        for A_info, B_info, names, rows, scale in cut.values():
            A, B = read_tensor(A_info), read_tensor(B_info)
            experts = len(names)
            r = A.shape[0] // experts
            starts = [sum(rows[:k]) for k in range(len(rows) + 1)]
            for e, blocks in enumerate(names):
                a_key = f"{blocks[0]}.lora_A"  # one A per expert, shared by its row blocks
                tensors[a_key] = A[e * r : (e + 1) * r].clone()
                for k, name in enumerate(blocks):
                    tensors[f"{name}.lora_B"] = B[starts[k] : starts[k + 1], e::experts].clone()
                    deltas[name] = (scale, a_key)
        data = save(tensors)
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("cws-expert-lora")
            pwrite_all(fd, memoryview(data), 0)  # one os.write may take only part of a large buffer
            self._keep = fd
            path = Path(f"/proc/self/fd/{fd}")
        else:
            self._keep = tempfile.NamedTemporaryFile(suffix=".safetensors")
            self._keep.write(data)
            self._keep.flush()
            path = Path(self._keep.name)
        infos, _ = read_header(path)
        for name, (scale, a_key) in deltas.items():
            self.lora[name] = LoraDelta(name, infos[f"{name}.lora_B"], infos[a_key], scale)

    def _base(self):
        """The base the adapter names (base_model_name_or_path), where it is a local model directory: its
        model type names a fused tensor's experts in checkpoints, its headers tell which fused tensor a
        LoRA wrapper targets (PEFT records target_parameters as an unordered set)."""
        from types import SimpleNamespace

        spec = self.config.get("base_model_name_or_path")
        cfg = Path(str(spec)) / "config.json" if spec else None
        if cfg is None or not cfg.is_file():
            raise CheckpointError(
                f"{self.path}: LoRA on expert parameters (target_parameters) is named after the base's model "
                f"type, but base_model_name_or_path ({spec!r}) is not a local model directory; set it to the base"
            )
        model_type = load_json(cfg, "model config", dict).get("model_type")
        return SimpleNamespace(path=cfg.parent, checkpoint=Checkpoint.open(cfg.parent), config_model_type=model_type)

    @staticmethod
    def _block_rows(fused: str, A: TensorInfo, B: TensorInfo, base: Checkpoint, model_type) -> list[int] | None:
        """The rows of each block the fused tensor stacks (gate, up), as the base stores them per expert,
        where LoRA factors A (r·E, in), B (out, r·E) fit it; else None."""
        from .experts import expert_names

        names = expert_names(fused, 1, model_type)
        infos = [base.lookup(n) for n in names[0]] if names else [None]
        if None in infos or any(len(i.shape) != 2 or i.shape[1] != A.shape[1] for i in infos):
            return None
        rows = [i.shape[0] for i in infos]
        return rows if B.shape[0] == sum(rows) else None

    def _rank_alpha(self, module: str) -> tuple[int, float]:
        r = _pattern(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
        alpha = _pattern(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        return r, float(alpha)

    @property
    def names(self) -> list[str]:
        return list(self.lora) + list(self.full)


def same_bits(a: TensorInfo, b: TensorInfo, chunk: int = 64 * 2**20) -> bool:
    """Whether two stored tensors hold the same bytes (same dtype and shape), read in chunks."""
    if a.shape != b.shape or a.dtype_name != b.dtype_name:
        return False
    (fa, sa), (fb, sb) = open_regular(a.path), open_regular(b.path)
    try:
        for info, st in ((a, sa), (b, sb)):
            why = changed(info.stamp, st)
            if why:
                raise CheckpointError(f"{info.path}: {why}")
        for off in range(0, a.nbytes, chunk):
            n = min(chunk, a.nbytes - off)
            if os.pread(fa, n, a.start + off) != os.pread(fb, n, b.start + off):
                return False
        return True
    finally:
        os.close(fa)
        os.close(fb)


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: the first key matching the module name's tail."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


def read_config(cfg_file: Path) -> dict:
    """adapter_config.json, checked for what cws relies on: a JSON object, r a positive integer,
    lora_alpha a finite number, rank/alpha patterns mapping valid regular expressions to those."""
    config = load_json(cfg_file, "adapter config")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{cfg_file}: corrupt adapter config: expected a JSON object, got {type(config).__name__}"
        )

    def bad(key, value, want):
        return CheckpointError(f"{cfg_file}: {key} must be {want}, got {json.dumps(value, default=str)[:80]}")

    rank_ok = lambda v: type(v) is int and v > 0  # noqa: E731
    alpha_ok = lambda v: type(v) in (int, float) and math.isfinite(v)  # noqa: E731
    for key, ok, want, default in (
        ("r", rank_ok, "a positive integer", 8),
        ("lora_alpha", alpha_ok, "a finite number", 8),
    ):
        if not ok(config.get(key, default)):
            raise bad(key, config.get(key), want)
    for key, ok, want in (
        ("rank_pattern", rank_ok, "a positive integer"),
        ("alpha_pattern", alpha_ok, "a finite number"),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise bad(key, patterns, "an object mapping module patterns to values")
        for pattern, value in patterns.items():
            if not ok(value):
                raise bad(f"{key}[{pattern!r}]", value, want)
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as e:
                raise CheckpointError(
                    f"{cfg_file}: {key} key {pattern!r} is not a valid regular expression: {e}"
                ) from e
    _check_supported(cfg_file, config)
    return config


def _check_supported(cfg_file: Path, config: dict) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{cfg_file}: adapter type {peft_type} is not supported (cws reads LoRA adapters)")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            value = config[key]
            named = f": {', '.join(map(str, value[:3]))}" if isinstance(value, list) else ""
            raise CheckpointError(
                f"{cfg_file}: {what} ({key}{named}) is not supported; cws would get it wrong "
                f"(merge the adapter into the model with PEFT's merge_and_unload and use the merged model)"
            )
