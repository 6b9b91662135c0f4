"""End-to-end streaming: `cws apply` / `cws compare` on ~1 GB Llama-shaped bf16 checkpoints, against
mergekit task_arithmetic, a plain PyTorch script and `cat` (read bandwidth).

    python benchmarks/bench_streaming.py [--layers 8] [--workdir /tmp/cws-bench] [--reps 3] [--skip-mergekit]

Data (made once, cached under WORKDIR/L<layers>-kv<kv>/): synthetic base, pos = base + noise,
neg = base + other noise (seeded; bf16; hidden 2048, MLP 5632, 16 heads / 4 KV heads, vocab 32000,
untied lm_head; ~1 GB each at 8 layers), saved as HF directories with two shards + index + a
config.json LlamaForCausalLM loads; and dir = `cws extract --pos pos --neg neg` (fp32, w = pos − neg).

Every provider runs as a subprocess after the page cache was warmed with `cat inputs > /dev/null`;
wall time is the whole process (interpreter start and imports included) and peak RSS is its
ru_maxrss (with its descendants) as GNU time reports it (else a bare fork/wait4 launcher: a child
forked straight from this multi-GB process would report this process's RSS). Each measurement is repeated --reps
times, providers interleaved (reversed on odd reps; each output deleted once measured, except in
the last rep, which the check reads), and the median is reported (RSS: median and max). "flush s" is the
time to fsync the finished output afterwards (cws fsyncs before it returns unless --no-fsync, the
others do not), so "wall + flush" compares the time until the output is on disk. A `dd ... conv=fsync`
of the output's size shows what the disk itself needs for that.
All providers compute θ = base + 0.5·(pos − neg) in fp32 and store it in bf16; every output is
checked against an fp64 reference, tensor by tensor. Then `cws apply` peak RSS is measured again
on a set with --growth-layers layers (default 2×--layers; deleted afterwards unless --keep-data).
`cws compare` is timed twice: the whole process, and its own time from the call to the report
(meta.seconds of its --json: headers and the pass, without interpreter start-up and imports).
Prints a table and the targets, writes benchmarks/results/streaming.json.

mergekit runs from its own venv (default /tmp/mk-venv; --mergekit-venv), installed with the CPU
torch first so pip never pulls a CUDA build:

    python -m venv /tmp/mk-venv
    /tmp/mk-venv/bin/pip install torch==2.13.0      # the local CPU wheel
    /tmp/mk-venv/bin/pip install mergekit
"""

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

RESULTS = Path(__file__).resolve().parent / "results"
ALPHA = 0.5
SEED = 1234
FULL = dict(hidden=2048, intermediate=5632, vocab=32000, heads=16)
TINY = dict(hidden=256, intermediate=704, vocab=1000, heads=4)  # --tiny: a smoke test of the script
NOISE = 1e-3  # pos/neg deviation from base (weights are ~0.02): a few bf16 ulps


# --------------------------------------------------------------------------- synthetic checkpoints


def layout(dims, layers, kv_heads):
    """(name, shape) of every tensor of the Llama layout, in HF order."""
    h, m, v = dims["hidden"], dims["intermediate"], dims["vocab"]
    kv = kv_heads * (h // dims["heads"])
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_tensor(kind, index, name, shape):
    """Tensor `index` of model `kind` (base/pos/neg), bf16, from seeded generators: pos and neg
    regenerate the same base tensor and add their own noise, so no model is ever held whole."""
    g = torch.Generator().manual_seed(SEED * 100_003 + index)
    x = torch.randn(shape, generator=g) * 0.02
    if name.endswith("norm.weight"):
        x += 1.0
    x = x.to(torch.bfloat16)
    if kind != "base":
        g.manual_seed(SEED * 100_003 + index + (1 if kind == "pos" else 2) * 10_000_019)
        x = (x.float() + NOISE * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return x


def llama_config(dims, layers, kv_heads):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "num_hidden_layers": layers,
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": kv_heads,
        "vocab_size": dims["vocab"],
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def make_checkpoint(path, kind, dims, layers, kv_heads):
    """An HF directory with 2 shards + index + config.json; one shard in RAM at a time."""
    tensors = layout(dims, layers, kv_heads)
    sizes = [math.prod(s) * 2 for _, s in tensors]
    total, cum, split = sum(sizes), 0, len(tensors)
    for i, n in enumerate(sizes):
        if cum + n > total / 2 and i > 0:
            split = i
            break
        cum += n
    shards = [list(enumerate(tensors))[:split], list(enumerate(tensors))[split:]]
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for k, entries in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(
            {name: make_tensor(kind, i, name, shape) for i, (name, shape) in entries},
            tmp / fname,
            metadata={"format": "pt"},
        )
        weight_map.update({name: fname for _, (name, _) in entries})
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (tmp / "config.json").write_text(json.dumps(llama_config(dims, layers, kv_heads), indent=2))
    tmp.rename(path)


def weight_files(d):
    return sorted(Path(d).glob("*.safetensors"))


def nbytes(dirs):
    return sum(f.stat().st_size for d in dirs for f in weight_files(d))


def ensure_data(root, dims, layers, kv_heads, cws_cmd):
    """base/pos/neg/dir under root, made if absent; returns their paths and the making times."""
    made = {}
    root.mkdir(parents=True, exist_ok=True)
    paths = {k: root / k for k in ("base", "pos", "neg", "dir")}
    for kind in ("base", "pos", "neg"):
        if not (paths[kind] / "model.safetensors.index.json").exists():
            t = time.perf_counter()
            make_checkpoint(paths[kind], kind, dims, layers, kv_heads)
            made[kind] = time.perf_counter() - t
            print(f"  made {paths[kind]} ({nbytes([paths[kind]]) / 1e9:.2f} GB) in {made[kind]:.0f} s", flush=True)
    if not (paths["dir"] / "direction.json").exists():
        shutil.rmtree(paths["dir"], ignore_errors=True)
        t = time.perf_counter()
        subprocess.run(
            [
                *cws_cmd,
                "extract",
                "--pos",
                str(paths["pos"]),
                "--neg",
                str(paths["neg"]),
                "--out",
                str(paths["dir"]),
                "-q",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        made["dir"] = time.perf_counter() - t
        print(
            f"  cws extract -> {paths['dir']} ({nbytes([paths['dir']]) / 1e9:.2f} GB) in {made['dir']:.0f} s",
            flush=True,
        )
    return paths, made


# --------------------------------------------------------------------------- the plain PyTorch provider


def plain_pytorch(base, pos, neg, out):
    """Load the three state dicts whole, θ = (base + 0.5·(pos − neg)) in fp32 per tensor, save sharded
    like the input (same weight_map) with safetensors."""
    t0 = time.perf_counter()  # torch and safetensors are imported by now

    def load(d):
        sd = {}
        for f in weight_files(d):
            sd.update(load_file(f))
        return sd

    b, p, n = load(base), load(pos), load(neg)
    index = json.loads((Path(base) / "model.safetensors.index.json").read_text())
    result = {name: (b[name].float() + ALPHA * (p[name].float() - n[name].float())).to(torch.bfloat16) for name in b}
    out = Path(out)
    out.mkdir(parents=True)
    for fname in sorted(set(index["weight_map"].values())):
        save_file(
            {k: result[k] for k, f in index["weight_map"].items() if f == fname}, out / fname, metadata={"format": "pt"}
        )
    shutil.copy(Path(base) / "model.safetensors.index.json", out)
    shutil.copy(Path(base) / "config.json", out)
    print(f"{WORK_TAG} {time.perf_counter() - t0:.6f}")


# --------------------------------------------------------------------------- measurement


def drop_output(path):
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def warm(files):
    if files:
        subprocess.run(["cat", *map(str, files)], check=True, stdout=subprocess.DEVNULL)


def fsync_tree(path):
    """Seconds to fsync every file under `path` (what the output still owes the disk)."""
    t = time.perf_counter()
    for f in Path(path).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - t


# A tiny launcher when /usr/bin/time is absent: a child's ru_maxrss counts the memory of the process
# it was forked from (until exec), so the benchmark itself (GBs after making the data) must not be it.
LAUNCHER = (
    "import os, sys\npid = os.fork()\nif pid == 0:\n    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "_, st, ru = os.wait4(pid, 0)\nopen(sys.argv[1], 'w').write(str(ru.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(st))\n"
)
GNU_TIME = "/usr/bin/time"


def rss_method():
    return "GNU time %M" if os.access(GNU_TIME, os.X_OK) else "python -S fork/wait4 launcher"


WORK_TAG = "after-import-seconds"  # printed by the Python providers: their time after `import torch`/`cws`
IN_PROCESS = (
    "import sys, time, cws\n"
    "t = time.perf_counter()\n"
    "op, args = sys.argv[1], sys.argv[2:]\n"
    "if op == 'apply':\n"
    "    cws.apply(args[0], args[1], float(args[2]), args[3], fsync=False, quiet=True)\n"
    "else:\n"
    "    cws.compare(args[0], args[1], args[2], quiet=True)\n"
    f"print('{WORK_TAG}', time.perf_counter() - t)\n"
)


def run_once(cmd, env, log, discard_stdout=False):
    """Wall seconds and peak RSS (bytes) of one subprocess; the RSS comes from a small intermediate
    process (GNU time, else a bare Python launcher) that forks the command and reads its rusage.
    discard_stdout: stdout to /dev/null (`cat` of the inputs must not write gigabytes to a log)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rssf, open(log, "w") as f:
        if os.access(GNU_TIME, os.X_OK):
            wrapped = [GNU_TIME, "-f", "%M", "-o", rssf.name, *cmd]
        else:
            wrapped = [sys.executable, "-S", "-c", LAUNCHER, rssf.name, *cmd]
        t = time.perf_counter()
        rc = subprocess.run(
            wrapped,
            stdout=subprocess.DEVNULL if discard_stdout else f,
            stderr=f if discard_stdout else subprocess.STDOUT,
            env=env,
            cwd=tempfile.gettempdir(),
        ).returncode
        wall = time.perf_counter() - t
        text = Path(rssf.name).read_text().split()
    if rc != 0:
        sys.exit(f"{cmd[0]} failed ({rc}):\n{Path(log).read_text()[-3000:]}\ncommand: {' '.join(cmd)}")
    return wall, int(text[-1]) * 1024  # KiB on Linux


class Provider:
    def __init__(self, name, cmd, inputs, out=None, env=None, report=None):
        """report: a `cws compare --json` file whose meta.seconds is the process's own time after
        start-up (else the time comes from a WORK_TAG line the process prints)."""
        self.name, self.cmd, self.inputs, self.out, self.env, self.report = name, cmd, inputs, out, env, report
        self.in_bytes = nbytes(inputs)
        self.walls, self.rss, self.flush, self.warm, self.load, self.work = [], [], [], [], [], []

    def measure(self, logdir, keep=True):
        drop_output(self.out)
        t = time.perf_counter()
        warm([f for d in self.inputs for f in weight_files(d)])
        self.warm.append(time.perf_counter() - t)
        self.load.append(os.getloadavg()[0])  # other work on the machine (the runs are not alone)
        log = logdir / (self.name.replace(" ", "_").replace("/", "_") + ".log")
        wall, rss = run_once(self.cmd, self.env, log, discard_stdout=self.cmd[0] == "cat")
        if self.report is not None:
            self.work.append(json.loads(Path(self.report).read_text())["meta"]["seconds"])
        elif self.cmd[0] != "cat":
            self.work += [float(line.split()[1]) for line in log.read_text().splitlines() if line.startswith(WORK_TAG)]
        self.walls.append(wall)
        self.rss.append(rss)
        if self.out is not None:
            self.flush.append(fsync_tree(self.out))
            if not keep:
                drop_output(self.out)

    def row(self):
        wall = statistics.median(self.walls)
        return {
            "provider": self.name,
            "wall_s": wall,
            "wall_s_all": self.walls,
            "peak_rss_MB": statistics.median(self.rss) / 1e6,
            "peak_rss_MB_max": max(self.rss) / 1e6,
            "peak_rss_MB_all": [r / 1e6 for r in self.rss],
            "flush_s": statistics.median(self.flush) if self.flush else 0.0,
            "after_import_s": statistics.median(self.work) if self.work else None,
            "warm_cat_s_all": self.warm,
            "loadavg_1m_before_all": self.load,
            "in_GB": self.in_bytes / 1e9,
            "GBps": self.in_bytes / wall / 1e9,
            "command": " ".join(map(str, self.cmd)),
        }


# --------------------------------------------------------------------------- correctness


class Reader:
    """Tensors of an HF directory (index or single file), read one at a time."""

    def __init__(self, d):
        self.files = {}
        for f in weight_files(d):
            h = safe_open(str(f), framework="pt")
            for k in h.keys():
                self.files[k] = h

    def get(self, name, start=None, stop=None):
        if start is None:
            return self.files[name].get_tensor(name)
        return self.files[name].get_slice(name)[start:stop]


def reference_grid(ref):
    """Per element of the exact fp64 `ref`: its ulp in bf16 (8 significant bits), the correctly rounded
    (nearest-even) bf16 value, and whether it lies within 1e-3 ulp of a rounding tie (or exactly on one)."""
    e = torch.frexp(ref)[1]
    e = torch.where(ref == 0, torch.full_like(e, -125), e)
    ulp = torch.ldexp(torch.ones_like(ref), (e - 8).clamp(min=-133))
    q = ref / ulp
    correct = torch.round(q) * ulp  # half to even
    dist = (q - torch.floor(q) - 0.5).abs()  # to the nearest tie, in ulps
    return ulp, correct, dist <= 1e-3, dist == 0


def bf16_check(out, ref, grid):
    """Counts of `out` (bf16) against `ref`: error in ulps, bit-identity with the nearest-even value."""
    ulp, correct, near_tie, exact_tie = grid
    o = out.double()
    err = (o - ref).abs() / ulp
    same = o == correct
    return {
        "elements": ref.numel(),
        "over_1ulp": int((err > 1).sum()),
        "max_err_ulp": float(err.max()),
        "near_tie": int(near_tie.sum()),
        "exact_tie": int(exact_tie.sum()),
        "identical": int(same.sum()),
        "differ_away_from_tie": int((~same & ~near_tie).sum()),
        "differ_near_tie": int((~same & near_tie).sum()),
    }


def check_outputs(paths, outputs, ref_name, rows_per_chunk=4096):
    """Every tensor of every output against base + α·(pos − neg) in fp64, chunk of rows by chunk,
    and element-wise against the `ref_name` output."""
    base, pos, neg = (Reader(paths[k]) for k in ("base", "pos", "neg"))
    readers = {name: Reader(d) for name, d in outputs.items()}
    zero = {
        "elements": 0,
        "over_1ulp": 0,
        "max_err_ulp": 0.0,
        "near_tie": 0,
        "exact_tie": 0,
        "identical": 0,
        "differ_away_from_tie": 0,
        "differ_near_tie": 0,
    }
    stats = {
        name: dict(zero, missing=[], bad_dtype_or_shape=[], vs_ref_differ=0, vs_ref_max_ulp=0.0) for name in outputs
    }
    for tname in sorted(base.files):
        shape = base.files[tname].get_slice(tname).get_shape()
        rows = shape[0] if shape else 1
        for start in range(0, rows, rows_per_chunk):
            stop = min(rows, start + rows_per_chunk)
            ref = base.get(tname, start, stop).double() + ALPHA * (
                pos.get(tname, start, stop).double() - neg.get(tname, start, stop).double()
            )
            grid = reference_grid(ref)
            chunk = {}
            for name, r in readers.items():
                st = stats[name]
                if tname not in r.files:
                    if start == 0:
                        st["missing"].append(tname)
                    continue
                sl = r.files[tname].get_slice(tname)
                if start == 0 and (sl.get_dtype() not in ("BF16", "bfloat16") or list(sl.get_shape()) != list(shape)):
                    st["bad_dtype_or_shape"].append(f"{tname}: {sl.get_dtype()} {sl.get_shape()}")
                    continue
                out = r.get(tname, start, stop)
                chunk[name] = out
                for k, v in bf16_check(out, ref, grid).items():
                    st[k] = max(st[k], v) if k == "max_err_ulp" else st[k] + v
            if ref_name in chunk:
                for name, out in chunk.items():
                    d = (out.double() - chunk[ref_name].double()).abs() / grid[0]
                    stats[name]["vs_ref_differ"] += int((d > 0).sum())
                    stats[name]["vs_ref_max_ulp"] = max(stats[name]["vs_ref_max_ulp"], float(d.max()))
    for st in stats.values():
        st["all_within_1ulp"] = st["over_1ulp"] == 0 and not st["missing"] and not st["bad_dtype_or_shape"]
    return stats


# --------------------------------------------------------------------------- main


def mergekit_setup(venv, paths, work):
    exe = Path(venv) / "bin" / "mergekit-yaml"
    if not exe.exists():
        return None, None, None
    version = subprocess.run(
        [
            str(Path(venv) / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    cfg = work / "task_arithmetic.yml"
    cfg.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {paths['base']}\n"
        "models:\n"
        f"  - model: {paths['pos']}\n    parameters:\n      weight: {ALPHA}\n"
        f"  - model: {paths['neg']}\n    parameters:\n      weight: {-ALPHA}\n"
        "parameters:\n  normalize: false\n"
        "dtype: float32\nout_dtype: bfloat16\n"
    )
    out = work / "out-mergekit"
    cmd = [str(exe), str(cfg), str(out), "--lazy-unpickle", "--no-cuda", "--no-copy-tokenizer", "--quiet"]
    return cmd, out, {"mergekit": version[0] if version else "?", "torch": version[1] if len(version) > 1 else "?"}


def git_state():
    """The commit of the repository under test and its uncommitted files (cws is installed editable)."""
    root = Path(__file__).resolve().parent.parent
    run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.rstrip()  # noqa: E731
    return {
        "commit": run("rev-parse", "HEAD"),
        "dirty": run("status", "--porcelain", "--", "python", "cws_kernels").splitlines(),
    }


def cws_command():
    exe = Path(sys.executable).parent / "cws"  # the entry point itself, not a pyenv shim
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cws.cli"]


def measure_all(providers, reps, logdir):
    """Each rep runs every provider once, in reverse order on odd reps (so none always follows the
    same one); outputs are deleted once measured except in the last rep, which the correctness
    check reads, so finished outputs do not pile up in the page cache and crowd the next run."""
    for rep in range(reps):
        for p in providers if rep % 2 == 0 else providers[::-1]:
            p.measure(logdir, keep=rep == reps - 1)
            print(f"  rep {rep + 1}/{reps} {p.name:34s} {p.walls[-1]:7.2f} s {p.rss[-1] / 1e6:8.0f} MB", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/cws-bench")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-venv", default="/tmp/mk-venv")
    ap.add_argument(
        "--growth-layers",
        type=int,
        default=None,
        help="layers of the second set for the RSS growth of cws apply (default 2×--layers; 0: skip)",
    )
    ap.add_argument("--keep-data", action="store_true", help="keep the growth set (it is deleted by default)")
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="also time cws apply --direction with OMP_WAIT_POLICY=PASSIVE and with OMP_NUM_THREADS=1",
    )
    ap.add_argument("--tiny", action="store_true", help="small tensors: a quick smoke test of this script")
    ap.add_argument("--run-plain", nargs=4, metavar=("BASE", "POS", "NEG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_plain:
        plain_pytorch(*args.run_plain)
        return
    command = " ".join(
        ([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else [])
        + [Path(sys.executable).name, *sys.argv]
    )
    git_before = git_state()
    dims = TINY if args.tiny else FULL
    growth = 2 * args.layers if args.growth_layers is None else args.growth_layers
    work = Path(args.workdir).resolve()
    cws = cws_command()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    tag = "-tiny" if args.tiny else ""
    print(f"data under {work} (layers {args.layers}, growth set {growth or 'skipped'})", flush=True)
    paths, made = ensure_data(work / f"L{args.layers}-kv{args.kv_heads}{tag}", dims, args.layers, args.kv_heads, cws)
    outdir = work / "out"
    outdir.mkdir(exist_ok=True)
    logdir = work / "logs"
    logdir.mkdir(exist_ok=True)
    base, pos, neg, dr = (str(paths[k]) for k in ("base", "pos", "neg", "dir"))
    py = sys.executable

    def cws_providers(p, out, suffix="", tag="", no_fsync=False):
        flag, name = (["--no-fsync"], " --no-fsync") if no_fsync else ([], "")
        a, f = out / f"out-cws-apply{tag}{'-nofsync' * no_fsync}", out / f"out-cws-fused{tag}{'-nofsync' * no_fsync}"
        return [
            Provider(
                f"cws apply --direction{name}{suffix}",
                [
                    *cws,
                    "apply",
                    "--model",
                    str(p["base"]),
                    "--direction",
                    str(p["dir"]),
                    "--alpha",
                    str(ALPHA),
                    "--out",
                    str(a),
                    "-q",
                    *flag,
                ],
                [p["base"], p["dir"]],
                a,
                env,
            ),
            Provider(
                f"cws apply --pos --neg{name}{suffix}",
                [
                    *cws,
                    "apply",
                    "--model",
                    str(p["base"]),
                    "--pos",
                    str(p["pos"]),
                    "--neg",
                    str(p["neg"]),
                    "--alpha",
                    str(ALPHA),
                    "--out",
                    str(f),
                    "-q",
                    *flag,
                ],
                [p["base"], p["pos"], p["neg"]],
                f,
                env,
            ),
        ]

    providers = [
        Provider(
            "cat base+pos+neg",
            ["cat", *map(str, (f for k in ("base", "pos", "neg") for f in weight_files(paths[k])))],
            [paths["base"], paths["pos"], paths["neg"]],
            None,
            env,
        ),
        Provider("python import torch (startup)", [py, "-c", "import torch"], [], None, env),
        Provider("python import cws (startup)", [py, "-c", "import cws"], [], None, env),
        *cws_providers(paths, outdir),
        *cws_providers(paths, outdir, no_fsync=True),
        Provider(
            "dd of the output's size, conv=fsync (the disk)",
            [
                "sh",
                "-c",
                f"dd if=/dev/zero of={outdir / 'dd.bin'} "
                f"bs=4M count={-(-nbytes([paths['base']]) // 2**22)} conv=fsync status=none && rm {outdir / 'dd.bin'}",
            ],
            [],
            None,
            env,
        ),
        Provider(
            "cat base+pos+dir",
            ["cat", *map(str, (f for k in ("base", "pos", "dir") for f in weight_files(paths[k])))],
            [paths["base"], paths["pos"], paths["dir"]],
            None,
            env,
        ),
        Provider(
            "cws compare",
            [
                *cws,
                "compare",
                "--base",
                base,
                "--model",
                pos,
                "--direction",
                dr,
                "-q",
                "--json",
                str(outdir / "compare.json"),
            ],
            [paths["base"], paths["pos"], paths["dir"]],
            None,
            env,
            report=outdir / "compare.json",
        ),
        Provider(
            "cws.apply(fsync=False) in-process",
            [py, "-c", IN_PROCESS, "apply", base, dr, str(ALPHA), str(outdir / "out-cws-inproc")],
            [paths["base"], paths["dir"]],
            outdir / "out-cws-inproc",
            env,
        ),
        Provider(
            "cws.compare() in-process",
            [py, "-c", IN_PROCESS, "compare", base, pos, dr],
            [paths["base"], paths["pos"], paths["dir"]],
            None,
            env,
        ),
        Provider(
            "plain PyTorch (load_file)",
            [py, str(Path(__file__).resolve()), "--run-plain", base, pos, neg, str(outdir / "out-plain")],
            [paths["base"], paths["pos"], paths["neg"]],
            outdir / "out-plain",
            env,
        ),
    ]
    by_name = {p.name: p for p in providers}
    if args.diagnose:  # the same cws runs with OpenMP threads that sleep instead of spinning, or only one
        for var, val in (("OMP_WAIT_POLICY", "PASSIVE"), ("OMP_NUM_THREADS", "1")):
            for p in [
                *cws_providers(paths, outdir, f" [{var}={val}]", f"-{var}"),
                Provider(f"cws compare [{var}={val}]", by_name["cws compare"].cmd, by_name["cws compare"].inputs),
            ]:
                p.env = dict(env, **{var: val})
                providers.append(p)
    mk_info = None
    if not args.skip_mergekit:
        mk_cmd, mk_out, mk_info = mergekit_setup(args.mergekit_venv, paths, work)
        if mk_cmd is None:
            print(f"mergekit: {args.mergekit_venv}/bin/mergekit-yaml not found, skipped (install: see the docstring)")
        else:
            providers.append(
                Provider("mergekit task_arithmetic", mk_cmd, [paths["base"], paths["pos"], paths["neg"]], mk_out, env)
            )
    else:
        print("mergekit: skipped (--skip-mergekit)")

    print(f"measuring, {args.reps} reps, providers interleaved:", flush=True)
    measure_all(providers, args.reps, logdir)
    rows = [p.row() for p in providers]
    by = {r["provider"]: r for r in rows}

    print("checking outputs against the fp64 reference (tensor by tensor) ...", flush=True)
    outputs = {p.name: p.out for p in providers if p.out is not None and "[" not in p.name}
    t = time.perf_counter()
    correctness = check_outputs(paths, outputs, "cws apply --direction")
    print(f"  checked in {time.perf_counter() - t:.0f} s", flush=True)
    for p in providers:
        drop_output(p.out)

    growth_rows = {}
    if growth:
        print(f"RSS growth: cws apply on a {growth}-layer set", flush=True)
        groot = work / f"L{growth}-kv{args.kv_heads}{tag}"
        gpaths, gmade = ensure_data(groot, dims, growth, args.kv_heads, cws)
        made.update({f"{k}@{growth}": v for k, v in gmade.items()})
        gp = cws_providers(gpaths, outdir, f" @{growth}L", "-growth")
        measure_all(gp, args.reps, logdir)
        growth_rows = {p.name: p.row() for p in gp}
        for p in gp:
            drop_output(p.out)
        if not args.keep_data:
            shutil.rmtree(groot)
            print(f"  deleted {groot}")

    # ------------------------------------------------------------------ report
    mk = by.get("mergekit task_arithmetic")
    plain = by["plain PyTorch (load_file)"]

    def targets_for(suffix=""):
        t = {}
        disk = lambda r: r["wall_s"] + r["flush_s"]  # noqa: E731 - until the output is on disk
        for variant in (
            "cws apply --direction",
            "cws apply --pos --neg",
            "cws apply --direction --no-fsync",
            "cws apply --pos --neg --no-fsync",
        ):
            r = by.get(variant + suffix)
            if r is None:
                continue
            for other, limit in ((mk, 0.25), (plain, 1 / 3)):
                if other is None:
                    continue
                who = "mergekit" if other is mk else "plain PyTorch"
                t[f"{variant}{suffix}: time / {who} <= {limit:.3g}"] = (
                    r["wall_s"] / other["wall_s"],
                    r["wall_s"] / other["wall_s"] <= limit,
                )
                t[f"{variant}{suffix}: (wall + flush) / {who}'s, both on disk <= {limit:.3g}"] = (
                    disk(r) / disk(other),
                    disk(r) / disk(other) <= limit,
                )
            if "--no-fsync" in variant:
                continue
            t[f"{variant}{suffix}: peak RSS MB <= 600 (max over reps)"] = (
                r["peak_rss_MB_max"],
                r["peak_rss_MB_max"] <= 600,
            )
            g = growth_rows.get(f"{variant} @{growth}L") if not suffix else None
            if g:
                ratio = g["peak_rss_MB"] / r["peak_rss_MB"] - 1
                t[f"{variant}: peak RSS growth {args.layers}->{growth} layers <= 10%"] = (ratio, ratio <= 0.10)
        if "cws compare" + suffix in by:
            bw = by["cws compare" + suffix]["GBps"] / by["cat base+pos+dir"]["GBps"]
            t[f"cws compare{suffix}: whole-process bandwidth / cat's (same files) >= 0.5"] = (bw, bw >= 0.5)
            r = by["cws compare" + suffix]
            if r["after_import_s"]:
                # the same process's own time from the call to the report (headers and the pass), without
                # the interpreter start-up and `import torch` that a 70B run does not notice
                bw = r["in_GB"] / r["after_import_s"] / by["cat base+pos+dir"]["GBps"]
                t[f"cws compare{suffix}: bandwidth after start-up (its own timing) / cat's >= 0.5"] = (bw, bw >= 0.5)
        return t

    targets = targets_for()
    # The same comparisons without interpreter start-up (import torch alone takes 2-4 s here, which a
    # 70B run does not notice): each Python provider's own time after its imports.
    after_import = {}
    ap_, cp_ = by.get("cws.apply(fsync=False) in-process"), by.get("cws.compare() in-process")
    if ap_ and ap_["after_import_s"] and plain["after_import_s"]:
        after_import["cws.apply(fsync=False) / plain PyTorch, both after imports"] = (
            ap_["after_import_s"] / plain["after_import_s"]
        )
        after_import["cws.apply(fsync=False) input GB/s after import"] = ap_["in_GB"] / ap_["after_import_s"]
    if cp_ and cp_["after_import_s"]:
        cat = by["cat base+pos+dir"]
        after_import["cws.compare() input GB/s after import"] = cp_["in_GB"] / cp_["after_import_s"]
        after_import["cws.compare() after import / cat bandwidth"] = cp_["in_GB"] / cp_["after_import_s"] / cat["GBps"]
    diagnostic_targets = {}
    if args.diagnose:
        for suffix in (" [OMP_WAIT_POLICY=PASSIVE]", " [OMP_NUM_THREADS=1]"):
            diagnostic_targets.update(targets_for(suffix))

    n_params = sum(math.prod(s) for _, s in layout(dims, args.layers, args.kv_heads))
    print(
        f"\n{args.layers} layers, {n_params / 1e6:.0f}M params, {nbytes([paths['base']]) / 1e9:.2f} GB per bf16 "
        f"checkpoint, direction {nbytes([paths['dir']]) / 1e9:.2f} GB fp32; torch {torch.__version__}, "
        f"{os.cpu_count()} cores; median of {args.reps} runs (RSS: median / max)"
    )
    print(f"{'provider':48s} {'wall s':>8s} {'flush s':>8s} {'peak RSS MB':>16s} {'in GB':>7s} {'GB/s':>6s}")
    for r in rows + list(growth_rows.values()):
        print(
            f"{r['provider']:48s} {r['wall_s']:8.2f} {r['flush_s']:8.2f} "
            f"{r['peak_rss_MB']:8.0f} /{r['peak_rss_MB_max']:6.0f} {r['in_GB']:7.2f} {r['GBps']:6.2f}"
        )
    print("(GB/s = input weight bytes / wall s; flush s = fsync of the output afterwards, not in wall s)")
    print("\ntargets:")
    for k, (v, ok) in targets.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {k}: {v:.3f}")
    if diagnostic_targets:
        print("the same targets for the diagnostic runs (not the default configuration):")
        for k, (v, ok) in diagnostic_targets.items():
            print(f"  {'pass' if ok else 'fail'}  {k}: {v:.3f}")
    if after_import:
        print("\nwithout interpreter start-up (time after imports, measured by each process itself):")
        for k, v in after_import.items():
            print(f"  {k}: {v:.3f}")
    print("\ncorrectness vs fp64 base + 0.5*(pos - neg), every element:")
    for name, st in correctness.items():
        print(
            f"  {name:34s} {st['elements']:,} elements, >1 ulp: {st['over_1ulp']}, max {st['max_err_ulp']:.3f} ulp; "
            f"bit-identical to nearest-even: {st['identical']:,}; differ away from ties: {st['differ_away_from_tie']}, "
            f"near ties: {st['differ_near_tie']} (of {st['near_tie']:,} within 1e-3 ulp of a tie, "
            f"{st['exact_tie']:,} exactly on one); "
            f"differ from cws apply --direction: {st['vs_ref_differ']} (max {st['vs_ref_max_ulp']:.2f} ulp)"
            + (f"; MISSING {st['missing'][:3]}" if st["missing"] else "")
            + (f"; BAD {st['bad_dtype_or_shape'][:3]}" if st["bad_dtype_or_shape"] else "")
        )

    RESULTS.mkdir(exist_ok=True)
    import cws as cws_pkg  # after the measurements: only for its version

    env_info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cws": cws_pkg.__version__,
        "mergekit": mk_info,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "cws_executable": cws[0],
        "rss_method": rss_method(),
        "git_at_start": git_before,
        "git_at_end": git_state(),
        "cws_module": subprocess.run(
            [py, "-c", "import cws; print(cws.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
        ).stdout.strip(),
    }
    if git_before != env_info["git_at_end"] and env_info["cws_module"].startswith(
        str(Path(__file__).resolve().parents[1])
    ):
        print("WARNING: the cws sources changed while the benchmark ran; see env.git_at_start/git_at_end")
    data = {
        "layers": args.layers,
        "kv_heads": args.kv_heads,
        "dims": dims,
        "params": n_params,
        "checkpoint_GB": nbytes([paths["base"]]) / 1e9,
        "direction_GB": nbytes([paths["dir"]]) / 1e9,
        "alpha": ALPHA,
        "noise": NOISE,
        "reps": args.reps,
        "growth_layers": growth,
    }
    out = {
        "env": env_info,
        "data": data,
        "make_seconds": made,
        "rows": rows,
        "growth_rows": list(growth_rows.values()),
        "targets": {k: {"value": v, "pass": ok} for k, (v, ok) in targets.items()},
        "after_import": after_import,
        "diagnostic_targets": {k: {"value": v, "pass": ok} for k, (v, ok) in diagnostic_targets.items()},
        "correctness": correctness,
    }
    dest = RESULTS / ("streaming-tiny.json" if args.tiny else "streaming.json")
    dest.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {dest}\ncommand: {command}")


if __name__ == "__main__":
    main()
