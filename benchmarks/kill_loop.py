"""kill -9 at seeded random moments of real `cws` processes, then check what a user would find.

    python benchmarks/kill_loop.py --runs 30 --workdir /tmp/cws-kill

Each run starts one command (apply with two α, fused apply, extract, compare --json, export-peft,
densify) as a fresh `python -m cws.cli` process and kills it with SIGKILL at a random moment of its
work: for commands that write an output, a delay drawn from [0, 1.1 × the time a clean run spends
after its hidden temporary appears], counted from that appearance; for compare, from
[0.8 × the interpreter's start-up, 1.1 × its clean duration]. Then it checks: the inputs are byte-identical; whatever is
visible at the output is complete (loads); then the same command is run again to completion, and
must remove the killed run's hidden temporaries. Prints a table of outcomes per command.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def digest(*paths) -> str:
    h = hashlib.sha256()
    for d in map(Path, paths):
        for p in [d] if d.is_file() else sorted(d.rglob("*")):
            h.update(str(p).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def hidden(*dirs: Path) -> list[Path]:
    return [
        p
        for d in dirs
        if d.is_dir()
        for p in d.iterdir()
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    ]


def complete(kind: str, out: Path) -> bool:
    """Whether a visible output is whole: every weight file parses, the index and the aux files are there."""
    from cws.errors import CwsError
    from cws.io.checkpoint import Checkpoint
    from cws.io.direction import Direction

    try:
        if kind == "report":
            json.loads(out.read_text())
        elif kind == "models":
            return all(complete("model", d) for d in out.iterdir() if not d.name.startswith("."))
        elif kind == "model":
            Checkpoint.open(out)
            return (out / "config.json").is_file()
        elif kind == "direction":
            Direction.open(out)
        elif kind == "adapter":
            Checkpoint.open(out)
            return (out / "adapter_config.json").is_file()
        return True
    except (CwsError, ValueError, OSError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/cws-kill")
    args = ap.parse_args()
    from safetensors.torch import load_file

    from tiny import random_checkpoint, save_state

    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shape = dict(hidden_size=256, intermediate_size=512, vocab_size=32000)
    base = random_checkpoint(root / "base", seed=0, **shape)
    pos = random_checkpoint(root / "pos", seed=1, **shape)
    sd = load_file(str(base / "model.safetensors"))
    neg = save_state({k: (v.float() * 0.5).to(v.dtype) for k, v in sd.items()}, root / "neg", like=base)
    cws = [sys.executable, "-m", "cws.cli"]
    subprocess.run([*cws, "extract", "--pos", pos, "--neg", neg, "--out", root / "dir", "-q"], check=True)
    inputs = [base, pos, neg, root / "dir"]
    before = digest(*inputs)
    commands = {
        "apply 2α": (["apply", "--model", base, "--direction", root / "dir", "--alpha", 1, "--alpha", -1], "models"),
        "apply --pos --neg": (["apply", "--model", base, "--pos", pos, "--neg", neg, "--alpha", 0.5], "model"),
        "extract": (["extract", "--pos", pos, "--neg", neg, "--base", base, "--scale-pos", 2], "direction"),
        "compare --json": (["compare", "--base", base, "--model", pos, "--direction", root / "dir"], "report"),
        "export-peft": (["export-peft", root / "dir", "--base", base], "adapter"),
        "densify": (["densify", root / "dir"], "direction"),
    }

    outs = {name: root / f"out{i}" for i, name in enumerate(commands)}  # one output path per command

    def argv(name):
        cmd, kind = commands[name]
        out = outs[name]
        where = ["--json", out] if kind == "report" else ["--out", out, "--overwrite"]
        return [*cws, *map(str, cmd), *map(str, where), "--max-memory", "1M", "-q"], kind

    t = time.monotonic()
    subprocess.run([sys.executable, "-c", "import cws.cli, cws.ops.apply, cws.ops.compare, cws.ops.export"], check=True)
    startup = time.monotonic() - t

    def started(kind, out) -> bool:
        return kind == "report" or bool(hidden(root, out))

    def wait_started(proc, kind, out) -> float:
        """Seconds until the run's hidden temporary appears (0 for compare), or until the process ends."""
        t = time.monotonic()
        while not started(kind, out) and proc.poll() is None:
            time.sleep(0.001)
        return time.monotonic() - t

    windows = {}
    for name in commands:  # clean runs: how long each works (only to spread the kill points)
        cmd, kind = argv(name)
        out = outs[name]
        t = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        to_temp = wait_started(proc, kind, out)
        assert proc.wait() == 0, name
        total = time.monotonic() - t
        windows[name] = (0.8 * startup, 1.1 * total) if kind == "report" else (0.0, 1.1 * (total - to_temp))
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    rng = random.Random(args.seed)
    counts = collections.defaultdict(collections.Counter)
    for i in range(args.runs):
        name = rng.choice(list(commands))
        cmd, kind = argv(name)
        out = outs[name]
        delay = rng.uniform(*windows[name])
        if i % 2 and out.is_dir():  # every other run starts without an output, the others replace one
            shutil.rmtree(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_started(proc, kind, out)
        try:
            proc.wait(delay)
            counts[name]["finished before the kill"] += 1
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            counts[name]["killed"] += 1
        c = counts[name]
        c["runs"] += 1
        c["inputs changed (must be 0)"] += digest(*inputs) != before
        visible = out.exists() and (kind != "models" or any(not p.name.startswith(".") for p in out.iterdir()))
        if visible:
            ok = complete(kind, out)
            c["complete output visible (old or new)"] += ok
            c["incomplete output visible (must be 0)"] += not ok
        else:
            c["nothing visible"] += 1
        stale = hidden(root, out)
        c["hidden temporaries left by the kill"] += bool(stale)
        rerun = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        c["rerun failed (must be 0)"] += rerun.returncode != 0
        c["temporaries left after the next run (must be 0)"] += bool(hidden(root, out))
        c["rerun output incomplete (must be 0)"] += not complete(kind, out)
        print(
            f"run {i + 1:3d}: {name:18s} kill {delay:5.2f} s into a {windows[name][1] / 1.1:5.2f} s window: "
            f"visible={visible} stale={len(stale)} rerun={rerun.returncode}",
            flush=True,
        )
    keys = sorted({k for c in counts.values() for k in c}, key=lambda k: ("must" in k, k))
    print("\n| command | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, c in counts.items():
        print(f"| {name} | " + " | ".join(str(c[k]) for k in keys) + " |")
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    print("| all | " + " | ".join(str(total[k]) for k in keys) + " |")
    bad = sum(v for k, v in total.items() if "must be 0" in k)
    print(f"\n{total['runs']} runs, {total['killed']} killed mid-run, {bad} violations")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
