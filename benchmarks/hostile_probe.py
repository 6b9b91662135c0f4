"""Hostile inputs and output locations through the CLI, counted by kind and outcome.

    python benchmarks/hostile_probe.py --workdir /tmp/cws-probe

Runs `cws` (in-process, `cws.cli.main`) on tiny models with hand-made hostile adapter configs,
direction.json files, sharded indexes, output paths, report paths and options. Each case must end
in exit 0 (a valid input, or a legitimate place) or exit 2 with one `cws <cmd>: error: …` line,
with the command's inputs byte-identical and no hidden temporary left. Prints a table by kind.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def digest(paths) -> str:
    h = hashlib.sha256()
    for d in map(Path, paths):
        for p in [d] if d.is_file() else sorted(d.rglob("*")):
            h.update(str(p).encode())
            h.update(p.read_bytes() if p.is_file() else b"")
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/cws-probe")
    args = ap.parse_args()
    import torch

    import cws
    from cws.cli import main as cli
    from tiny import perturbed, save, tiny_model, train_lora

    R = Path(args.workdir).resolve()
    shutil.rmtree(R, ignore_errors=True)
    R.mkdir(parents=True)
    os.chdir(R)
    base = tiny_model(0)
    (
        save(base, R / "base", "20KB"),
        save(perturbed(base, 1), R / "pos", "50KB"),
        save(perturbed(base, 2), R / "neg", "1GB"),
    )
    b32 = tiny_model(0, dtype=torch.float32)
    b32.save_pretrained(R / "b32")
    train_lora(b32, R / "ap", 1), train_lora(b32, R / "an", 2)
    cws.extract(R / "pos", R / "neg", R / "dir", quiet=True)
    cws.extract(R / "ap", R / "an", R / "ldir", quiet=True)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad = []

    def run(kind, argv, setup=None, inputs=()):
        for p in R.glob("o*"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if setup:
            setup()
        before = digest(inputs)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli([*map(str, argv)])
            lines = err.getvalue().strip().splitlines()
            if code == 0:
                outcome = "accepted (exit 0)"
            elif code == 2 and len(lines) == 1 and lines[0].startswith(f"cws {argv[0]}: error: "):
                outcome = "one-line error"
            else:
                outcome = f"BAD: exit {code}: {err.getvalue()[-300:]}"
        except SystemExit as e:
            outcome = "argparse usage error" if e.code == 2 else f"BAD: SystemExit {e.code}"
        except BaseException as e:
            outcome = f"BAD: traceback {type(e).__name__}: {str(e)[:200]}"
        if digest(inputs) != before:
            outcome = "BAD: an input changed"
        left = [p.name for p in R.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
        if left:
            outcome = f"BAD: temporaries left {left}"
        counts[kind][outcome if not outcome.startswith("BAD") else "BAD"] += 1
        if outcome.startswith("BAD"):
            bad.append((kind, [str(a) for a in argv], outcome))

    # ---------------------------------------------------------------- adapter_config.json
    good = json.loads((R / "ap" / "adapter_config.json").read_text())

    def cfg(**kw):
        return json.dumps({**good, **kw}, allow_nan=True).encode()

    def adapter_with(doc):
        def setup():
            (R / "oa").mkdir()
            shutil.copy(R / "ap" / "adapter_model.safetensors", R / "oa")
            (R / "oa" / "adapter_config.json").write_bytes(doc)

        return setup

    deep = b"[" * 100000 + b"]" * 100000
    for doc in [
        cfg(r=0),
        cfg(r="four"),
        cfg(r=None),
        cfg(r=1.5),
        cfg(r=-4),
        cfg(r=True),
        cfg(r=2**70),
        cfg(lora_alpha="16"),
        cfg(lora_alpha="abc"),
        cfg(lora_alpha=1e308),
        cfg(lora_alpha=float("nan")),
        cfg(lora_alpha=None),
        cfg(rank_pattern={"(": 4}),
        cfg(alpha_pattern={"q_proj": [1]}),
        cfg(rank_pattern=[1]),
        cfg(alpha_pattern="x"),
        cfg(rank_pattern={"q_proj": 0}),
        b"[1,2]",
        b'"lora"',
        b"\xff\xfe",
        deep,
        b"",
        b"{",
        cfg(peft_type=5),
        cfg(use_dora=True),
        cfg(target_modules=None),
        cfg(r=8),
        cfg(use_rslora=True),
    ]:
        for argv in (
            ["extract", "--pos", "oa", "--neg", R / "an", "--out", "o1", "-q"],
            ["compare", "--base", R / "b32", "--model", "oa", "--direction", R / "ldir", "-q"],
            ["info", "oa"],
        ):
            run("adapter_config.json", argv, adapter_with(doc), [R / "an", R / "b32", R / "ldir"])

    # ---------------------------------------------------------------- direction.json
    meta = json.loads((R / "ldir" / "direction.json").read_text())
    first = next(iter(meta["tensors"]))

    def dmeta(edit):
        m = json.loads(json.dumps(meta))
        edit(m)
        return json.dumps(m, allow_nan=True).encode()

    def dir_with(doc):
        def setup():
            shutil.copytree(R / "ldir", R / "od")
            (R / "od" / "direction.json").write_bytes(doc)

        return setup

    for doc in [
        b"[]",
        b"\xff",
        deep,
        b"{}",
        dmeta(lambda m: m.update(version="1")),
        dmeta(lambda m: m.update(version=99)),
        dmeta(lambda m: m["tensors"][first].update(scale=float("inf"))),
        dmeta(lambda m: m["tensors"][first].update(scale="1")),
        dmeta(lambda m: m["tensors"][first].update(shape=[-1, 2])),
        dmeta(lambda m: m["tensors"][first].update(kind="sparse")),
        dmeta(lambda m: m.update(tensors=[])),
        dmeta(lambda m: m["tensors"].pop(first)),
        dmeta(lambda m: m["tensors"][first].update(scale=1e308)),
    ]:
        for argv in (
            ["apply", "--model", R / "b32", "--direction", "od", "--alpha", 1, "--out", "o1", "-q"],
            ["compare", "--base", R / "b32", "--model", R / "ap", "--direction", "od", "-q"],
            ["info", "od"],
            ["export-peft", "od", "--out", "o1", "-q"],
            ["densify", "od", "--out", "o1", "-q"],
        ):
            run("direction.json", argv, dir_with(doc), [R / "b32", R / "ap"])

    # ---------------------------------------------------------------- sharded index
    index = json.loads((R / "base" / "model.safetensors.index.json").read_text())
    k0 = next(iter(index["weight_map"]))

    def im(edit):
        m = json.loads(json.dumps(index))
        edit(m)
        return json.dumps(m).encode()

    def index_with(doc):
        def setup():
            shutil.copytree(R / "base", R / "om")
            (R / "om" / "model.safetensors.index.json").write_bytes(doc)

        return setup

    for doc in [
        b"[]",
        b"\xff",
        deep,
        im(lambda m: m.update(weight_map=[])),
        im(lambda m: m["weight_map"].update({k0: "../x.safetensors"})),
        im(lambda m: m["weight_map"].update({k0: 5})),
        im(lambda m: m["weight_map"].update({k0: "nope.safetensors"})),
        im(lambda m: m["weight_map"].pop(k0)),
        im(lambda m: m["weight_map"].update({"extra": next(iter(m["weight_map"].values()))})),
    ]:
        for argv in (
            ["apply", "--model", "om", "--direction", R / "dir", "--alpha", 1, "--out", "o1", "-q"],
            ["info", "om"],
            ["compare", "--base", "om", "--model", R / "pos", "--direction", R / "dir", "-q"],
        ):
            run("index.json", argv, index_with(doc), [R / "dir", R / "pos"])

    # ---------------------------------------------------------------- output paths
    def made(p, what):
        def setup():
            if what == "link to an input":
                (R / p).symlink_to(R / "base")
            elif what == "loop":
                (R / p).symlink_to(R / p)

        return setup

    for out, setup in [
        ("", None),
        (".", None),
        ("./", None),
        ("..", None),
        ("/", None),
        (R / "base", None),
        (R / "base" / "x", None),
        (R, None),
        ("o_link", made("o_link", "link to an input")),
        ("o_link/x", made("o_link", "link to an input")),
        ("o_loop", made("o_loop", "loop")),
        ("o_{alpha}_{x}", None),
        ("o_{0}", None),
        ("o_{alpha:d}", None),
        ("o_{", None),
    ]:
        for overwrite in ([], ["--overwrite"]):
            run(
                "--out",
                [
                    "apply",
                    "--model",
                    R / "base",
                    "--direction",
                    R / "dir",
                    "--alpha",
                    1,
                    "--alpha",
                    2,
                    "--out",
                    out,
                    "-q",
                    *overwrite,
                ],
                setup,
                [R / "base", R / "dir"],
            )
            run(
                "--out",
                ["extract", "--pos", R / "base", "--neg", R / "neg", "--out", out, "-q", *overwrite],
                setup,
                [R / "base", R / "neg"],
            )

    # ---------------------------------------------------------------- report paths
    for target in [
        R / "base" / "config.json",
        R / "dir" / "direction.json",
        R / "missing" / "r.json",
        R,
        R / "base",
        "",
        "o_loop",
        sorted((R / "pos").glob("*.safetensors"))[0],
    ]:
        for flag in ("--json", "--csv"):
            run(
                "--json/--csv",
                ["compare", "--base", R / "base", "--model", R / "pos", "--direction", R / "dir", "-q", flag, target],
                made("o_loop", "loop") if target == "o_loop" else None,
                [R / "base", R / "pos", R / "dir"],
            )

    # ---------------------------------------------------------------- options
    for opts in [
        ["--max-memory", "1e400"],
        ["--max-memory", "1" + "0" * 400],
        ["--max-memory", "0"],
        ["--max-shard-size", "0"],
        ["--max-shard-size", "1e400"],
        ["--max-shard-size", "1" + "0" * 400],
        ["--seed", str(2**100)],
        ["--include", "("],
        ["--exclude", "[a-"],
        ["--alpha", "nan"],
        ["--alpha", "inf"],
        ["--alpha", "1e308"],
        ["--rounding", "stochastic", "--seed", str(2**70)],
    ]:
        run(
            "options",
            ["apply", "--model", R / "base", "--direction", R / "dir", "--alpha", 1, "--out", "o1", "-q", *opts],
            inputs=[R / "base", R / "dir"],
        )
    for opts in [
        ["--scale-pos", "inf"],
        ["--scale-pos", "nan"],
        ["--scale-pos", "1e308", "--base", R / "base"],
        ["--dtype", "int8"],
    ]:
        run(
            "options",
            ["extract", "--pos", R / "pos", "--neg", R / "neg", "--out", "o1", "-q", *opts],
            inputs=[R / "pos", R / "neg"],
        )
    for opts in [["--alpha", "inf"], ["--alpha", "1e38"], ["--alpha", "-1e300"]]:
        run(
            "options",
            ["export-peft", R / "ldir", "--out", "o1", "-q", "--base", R / "b32", *opts],
            inputs=[R / "ldir", R / "b32"],
        )

    keys = sorted({k for c in counts.values() for k in c})
    print("| kind | cases | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for kind, c in counts.items():
        print(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in keys) + " |")
    for kind, argv, outcome in bad:
        print(f"BAD {kind}: cws {' '.join(argv)}\n    {outcome}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
