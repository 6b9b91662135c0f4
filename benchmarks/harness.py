"""What every benchmark here shares: synthetic Llama checkpoints, timing subprocesses with their peak
RSS, the machine it ran on (CPU model, ISA, cores, memory, disk), medians, and the results file.

Benchmarks import this module; each is a short script for one question (bench_streaming: end-to-end
apply/compare vs mergekit and plain PyTorch; bench_scale: 7B-shaped cold runs vs the disk's floor;
bench_dist: torchrun ranks; bench_kernels, bench_lora, bench_monitor, bench_gpu_steer: the kernels,
LoRA-native work and the live tools). Each prints its figures and writes results/<name>.json.
"""

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
from safetensors.torch import save_file

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 1234
NOISE = 1e-3  # pos/neg deviation from base (weights are ~0.02): a few bf16 ulps
FULL = dict(hidden=2048, intermediate=5632, vocab=32000, heads=16)  # ~1 GB per bf16 checkpoint at 8 layers
TINY = dict(hidden=256, intermediate=704, vocab=1000, heads=4)  # --tiny: a smoke test of a script
WORK_TAG = "after-import-seconds"  # printed by Python providers: their time after `import torch`/`cws`


# --------------------------------------------------------------------------- the machine


def cpu() -> dict:
    """CPU model, the vector ISA the kernels can use, and the cores this process may run on."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            if key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    isa = [name for name in ("avx2", "avx512f", "avx512bf16", "asimd", "sve") if name in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "arch": platform.machine(), "isa": isa or ["baseline"], "cores": cores}


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        return None
    return None


def machine(disk_gbps: dict | None = None) -> dict:
    """What a figure was measured on: CPU, memory, torch, Python, the cws commit, and the disk's figures
    where the benchmark measured them. Printed in one line by `describe`."""
    return {
        "cpu": cpu(),
        "memory_GiB": memory_gb(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "disk": disk_gbps,
        "git": git_state(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe(m: dict) -> str:
    c = m["cpu"]
    disk = ", ".join(f"{k} {v:.2f} GB/s" for k, v in (m.get("disk") or {}).items() if isinstance(v, float))
    return (
        f"{c['model']} ({c['arch']}, {'+'.join(c['isa'])}), {c['cores']} cores, "
        f"{m['memory_GiB'] or 0:.0f} GiB; torch {m['torch']}" + (f"; disk {disk}" if disk else "")
    )


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


def measure_all(providers, reps, logdir):
    """Each rep runs every provider once, in reverse order on odd reps (so none always follows the
    same one); outputs are deleted once measured except in the last rep, which the correctness
    check reads, so finished outputs do not pile up in the page cache and crowd the next run."""
    for rep in range(reps):
        for p in providers if rep % 2 == 0 else providers[::-1]:
            p.measure(logdir, keep=rep == reps - 1)
            print(f"  rep {rep + 1}/{reps} {p.name:34s} {p.walls[-1]:7.2f} s {p.rss[-1] / 1e6:8.0f} MB", flush=True)


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


def median(xs):
    return statistics.median(xs)


def command_line() -> str:
    """How this benchmark was run (with PYTHONPATH where set: it chooses the cws under test)."""
    pp = [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
    return " ".join(pp + [Path(sys.executable).name, *sys.argv])


def write_json(path, data: dict) -> Path:
    """`data` as JSON at `path`, with the machine it was measured on first; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def write_results(name: str, data: dict) -> Path:
    """results/<name>.json (see write_json)."""
    return write_json(RESULTS / f"{name}.json", data)


def mergekit_setup(venv, paths, work, alpha):
    """mergekit task_arithmetic θ = base + α·pos − α·neg from its own venv: (command, output, versions),
    or Nones where it is not installed."""
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
        f"  - model: {paths['pos']}\n    parameters:\n      weight: {alpha}\n"
        f"  - model: {paths['neg']}\n    parameters:\n      weight: {-alpha}\n"
        "parameters:\n  normalize: false\n"
        "dtype: float32\nout_dtype: bfloat16\n"
    )
    out = work / "out-mergekit"
    cmd = [str(exe), str(cfg), str(out), "--lazy-unpickle", "--no-cuda", "--no-copy-tokenizer", "--quiet"]
    return cmd, out, {"mergekit": version[0] if version else "?", "torch": version[1] if len(version) > 1 else "?"}
