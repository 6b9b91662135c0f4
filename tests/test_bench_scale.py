"""benchmarks/bench_scale.py: checkpoints written tensor by tensor that cws and transformers read back,
pos/neg a few ulps off base, and each op's floor and wall/floor ratio."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """bench_scale with a pico Llama (hidden 64) cut into 1000-element chunks from a 16K pool."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_scale

    monkeypatch.setattr(bench_scale, "DIMS", dict(hidden=64, intermediate=176, vocab=100, heads=4))
    monkeypatch.setattr(bench_scale, "KV_HEADS", 4)
    monkeypatch.setattr(bench_scale, "CHUNK", 1000)
    monkeypatch.setattr(bench_scale, "POOL", 1 << 14)
    return bench_scale


def test_checkpoints_are_sharded_complete_and_close(bench, tmp_path):
    from transformers import LlamaForCausalLM

    from cws.io.checkpoint import Checkpoint

    pool = torch.randn(bench.POOL, generator=torch.Generator().manual_seed(0))
    for kind in ("base", "pos", "neg"):
        bench.make_checkpoint(tmp_path / kind, kind, 2, 30_000, pool)
    tensors = bench.layout(bench.DIMS, 2, bench.KV_HEADS)
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(n for n, _ in tensors)
    shards = sorted((tmp_path / "base").glob("*.safetensors"))
    assert len(shards) == len(set(index["weight_map"].values())) > 1
    ck = {k: Checkpoint.open(tmp_path / k) for k in ("base", "pos", "neg")}
    for i, (name, shape) in enumerate(tensors):
        base = ck["base"].read(name)
        assert base.dtype == torch.bfloat16 and tuple(base.shape) == shape
        # what was written is the chunks, in order (the header's offsets and the data agree)
        assert torch.equal(base.reshape(-1), torch.cat(list(bench.chunks("base", i, name, math.prod(shape), pool))))
        if name.endswith("norm.weight"):  # ~1 + 0.02·x: 1e-3 of noise is below half a bf16 ulp (2^-8) there
            assert (base.double() - 1).abs().max() < 0.2
            continue
        for kind in ("pos", "neg"):  # bf16(base + 1e-3·noise): at most the noise plus one rounding away
            d = ck[kind].read(name).double() - base.double()
            assert 0 < d.abs().max() <= bench.NOISE * pool.abs().max() + base.double().abs().max() * 2**-8
        assert not torch.equal(ck["pos"].read(name), ck["neg"].read(name))
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    assert torch.equal(model.lm_head.weight, ck["base"].read("lm_head.weight"))


def test_floor_is_the_best_cold_read_or_the_durable_write(bench):
    rows = [  # (provider, kind, in GB, out GB, wall s)
        ("cat one after another", "read floor", 3.0, 0.0, 6.0),  # 0.5 GB/s
        ("cat at once", "read floor", 3.0, 0.0, 3.0),  # 1.0 GB/s
        ("dd direct", "read floor", 3.0, 0.0, 2.5),  # 1.2 GB/s: the best
        ("dd write", "write floor", 0.0, 1.0, 4.0),
        ("cws apply", "cws", 3.0, 1.0, 5.0),  # read 2.5 s, write 4 s: floor 4 s
        ("cws compare", "cws", 3.0, 0.0, 3.0),  # no output: floor 2.5 s
        ("cws extract", "cws", 0.6, 1.0, 6.0),  # read 0.5 s, write 4 s
    ]
    by = {
        p: {"provider": p, "kind": k, "in_GB": i, "out_GB": o, "wall_s": w, "in_GBps": i / w, "flush_s": 0.5}
        for p, k, i, o, w in rows
    }
    fl = bench.floors(by, 1e9)
    assert fl["best_read"] == "dd direct" and fl["best_read_GBps"] == pytest.approx(1.2, rel=1e-15)
    assert fl["write_s"] == 4.0
    r = bench.ratios(by, fl)
    assert set(r) == {"cws apply", "cws compare", "cws extract"}
    assert r["cws apply"]["floor_s"] == pytest.approx(4.0) and r["cws apply"]["wall_over_floor"] == pytest.approx(1.25)
    assert r["cws apply"]["wall_plus_flush_over_floor"] == pytest.approx(5.5 / 4)
    assert r["cws compare"]["floor_s"] == pytest.approx(2.5) and r["cws compare"]["wall_over_floor"] == pytest.approx(
        1.2
    )
    assert r["cws extract"]["read_floor_s"] == pytest.approx(0.5) and r["cws extract"][
        "wall_over_floor"
    ] == pytest.approx(1.5)


def test_shared_floor_is_reading_and_writing_at_once_scaled_to_the_op(bench):
    """A disk that shares its bandwidth: reading 3 GB while writing 1 GB took 5 s (0.8 GB/s in all), so
    an op that reads 3 and writes 1 cannot beat 5 s, one that reads 0.6 and writes 1 not 2 s; an op that
    writes nothing keeps the read floor; the shared floor is never below the other."""
    rows = [
        ("dd direct", "read floor", 3.0, 0.0, 2.5),
        ("dd write", "write floor", 0.0, 1.0, 4.0),
        ("cat + dd at once", "read+write floor", 3.0, 1.0, 5.0),
        ("cws apply", "cws", 3.0, 1.0, 6.0),
        ("cws extract", "cws", 0.6, 1.0, 6.0),
        ("cws compare", "cws", 3.0, 0.0, 3.0),
        ("tiny", "cws", 0.3, 0.1, 1.0),
    ]
    by = {
        p: {
            "provider": p,
            "kind": k,
            "in_GB": i,
            "out_GB": o,
            "wall_s": w,
            "in_GBps": i / w if i else 0.0,
            "flush_s": 0.0,
        }
        for p, k, i, o, w in rows
    }
    fl = bench.floors(by, 1e9)
    assert fl["read_write_s"] == 5.0 and fl["read_write_GB"] == 4.0
    r = bench.ratios(by, fl)
    assert r["cws apply"]["floor_s"] == pytest.approx(4.0) and r["cws apply"]["shared_floor_s"] == pytest.approx(5.0)
    assert r["cws apply"]["wall_over_shared_floor"] == pytest.approx(1.2)
    assert r["cws extract"]["shared_floor_s"] == pytest.approx(4.0)  # the write floor (4 s) beats 1.6 GB at 0.8 GB/s
    assert r["cws compare"]["shared_floor_s"] == r["cws compare"]["floor_s"] == pytest.approx(2.5)
    assert r["tiny"]["shared_floor_s"] == pytest.approx(0.5)  # 0.4 GB at 0.8 GB/s, above its write floor 0.4 s


def test_per_rep_ratios_use_each_reps_own_floors(bench):
    def run(name, kind, in_b, out_b, walls):
        r = bench.Run(name, kind, ["true"], [])
        r.in_bytes, r.out_bytes, r.walls = in_b, out_b, walls
        return r

    runs = [
        run("dd direct", "read floor", 3e9, 0, [2.5, 5.0]),
        run("dd write", "write floor", 0, 1e9, [4.0, 8.0]),
        run("both", "read+write floor", 3e9, 1e9, [5.0, 10.0]),
        run("cws apply", "cws", 3e9, 1e9, [6.0, 6.0]),
    ]
    r = bench.per_rep_ratios(runs)["cws apply"]
    assert r["wall_over_floor_each_rep"] == pytest.approx([1.5, 0.75])  # floors 4 s, then 8 s
    assert r["wall_over_shared_floor_each_rep"] == pytest.approx([1.2, 0.6])  # 5 s, then 10 s
    assert r["median_shared"] == pytest.approx(0.9)


def test_the_best_of_several_write_and_read_write_floors_is_the_floor(bench):
    """dd and disk_floor.py both measure the durable write and reading while writing: the faster write
    and the higher read+write rate are the floors (in the medians and in each rep)."""
    rows = [
        ("dd direct", "read floor", 3.0, 0.0, 2.5),
        ("dd write", "write floor", 0.0, 1.0, 4.0),
        ("direct write", "write floor", 0.0, 1.0, 3.0),
        ("cat + dd at once", "read+write floor", 3.0, 1.0, 5.0),
        ("direct reads + writes", "read+write floor", 3.0, 1.0, 4.5),
        ("cws apply", "cws", 3.0, 1.0, 6.0),
    ]
    by = {
        p: {
            "provider": p,
            "kind": k,
            "in_GB": i,
            "out_GB": o,
            "wall_s": w,
            "in_GBps": i / w if i else 0.0,
            "flush_s": 0.0,
        }
        for p, k, i, o, w in rows
    }
    fl = bench.floors(by, 1e9)
    assert fl["write_s"] == 3.0 and fl["best_write"] == "direct write"
    assert fl["read_write_s"] == 4.5 and fl["best_read_write"] == "direct reads + writes"
    r = bench.ratios(by, fl)["cws apply"]
    assert r["floor_s"] == pytest.approx(3.0) and r["shared_floor_s"] == pytest.approx(4.5)

    def run(name, kind, in_b, out_b, walls):
        x = bench.Run(name, kind, ["true"], [])
        x.in_bytes, x.out_bytes, x.walls = in_b, out_b, walls
        return x

    runs = [
        run("dd direct", "read floor", 3e9, 0, [2.5, 2.5]),
        run("dd write", "write floor", 0, 1e9, [4.0, 2.0]),
        run("direct write", "write floor", 0, 1e9, [3.0, 3.5]),
        run("both", "read+write floor", 3e9, 1e9, [5.0, 4.0]),
        run("direct both", "read+write floor", 3e9, 1e9, [4.5, 6.0]),
        run("cws apply", "cws", 3e9, 1e9, [6.0, 6.0]),
    ]
    r = bench.per_rep_ratios(runs)["cws apply"]
    assert r["wall_over_floor_each_rep"] == pytest.approx([2.0, 6.0 / 2.5])  # floors 3 s (direct), then 2.5 s (read)
    assert r["wall_over_shared_floor_each_rep"] == pytest.approx([6.0 / 4.5, 1.5])  # 4.5 s, then 4 s


def test_disk_floor_reads_and_writes_what_it_says(tmp_path):
    """benchmarks/disk_floor.py writes --bytes zeros (an unaligned tail too), reads files whole, and
    fails with the error, exit 1, when a file cannot be read."""
    import subprocess

    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except (OSError, AttributeError):
        pytest.skip("this file system refuses O_DIRECT")
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3 * 2**20 + 5))
    out = tmp_path / "out.bin"
    cmd = [sys.executable, str(BENCH / "disk_floor.py")]
    r = subprocess.run(
        [
            *cmd,
            "--read",
            str(src),
            str(src),
            "--write",
            str(out),
            "--bytes",
            str(9 * 2**20 + 3),
            "--threads",
            "3",
            "--chunk-mb",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "read 6.29 GB" not in r.stdout and "read 0.01 GB (3 x 1 MB), wrote 0.01 GB (4 x 8 MB) + fsync" in r.stdout
    assert out.read_bytes() == bytes(9 * 2**20 + 3)
    r = subprocess.run([*cmd, "--read", str(tmp_path / "missing.bin")], capture_output=True, text=True)
    assert r.returncode == 1 and "missing.bin" in r.stderr


def test_timeline_samples_a_run_and_records_it(tmp_path, monkeypatch, capsys):
    """timeline.py: the command's exit status, its rusage CPU, samples of the disk under the current
    directory, and the run added to --out."""
    monkeypatch.syspath_prepend(str(BENCH))
    import timeline

    try:
        timeline.disk_stat(os.stat(".").st_dev)
    except OSError:
        pytest.skip("no block device statistics for this directory's file system")
    monkeypatch.setattr(timeline, "WARM", ["true"])
    out = tmp_path / "tl.json"
    spin = "import time; t = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    assert (
        timeline.main(
            ["--warm", "--interval", "0.1", "--name", "spin", "--out", str(out), "--", sys.executable, "-c", spin]
        )
        == 0
    )
    assert (
        timeline.main(
            ["--warm", "--interval", "0.1", "--out", str(out), "--", sys.executable, "-c", "raise SystemExit(3)"]
        )
        == 1
    )
    runs = json.loads(out.read_text())["runs"]
    spun, failed = runs["spin"], runs[f"{sys.executable} -c raise SystemExit(3)"]
    assert spun["exit_status"] == 0 and failed["exit_status"] == 3
    assert spun["cpu_user_s"] + spun["cpu_sys_s"] >= 0.6 and spun["wall_s"] >= 0.6
    assert spun["samples"] and all(len(s) == len(spun["sample_columns"]) for s in spun["samples"])
    assert spun["notes"] == ["page cache not dropped (--warm)"] and not spun["cold"]
    if spun["read_GB"] == 0:  # nothing read: no streaming, no rate
        assert spun["streaming_from_s"] is None and spun["disk_GBps_streaming"] is None
    assert "exit 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        timeline.main(["--warm"])  # no command


def test_streaming_starts_at_the_first_interval_at_half_the_mean_read_rate(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from timeline import streaming_start

    # 4 s, 2 GB read: mean 500 MB/s, so the 30 MB/s of an import's page faults is not streaming yet
    samples = [[1.0, 30.0], [2.0, 0.0], [3.0, 900.0], [4.0, 1070.0]]
    assert streaming_start(samples, 2e9, 4.0) == 2.0
    assert streaming_start(samples, 0, 4.0) is None and streaming_start([], 1e9, 4.0) is None
    assert streaming_start([[0.25, 2000.0]], 0.5e9, 0.25) == 0.0


def test_readme_timeline_table_renders_each_run(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import readme_table

    run = dict(
        wall_s=29.7,
        streaming_from_s=3.3,
        read_GB=20.5,
        written_GB=10.24,
        disk_GBps_streaming=1.16,
        cpu_user_s=17.3,
        cpu_sys_s=1.8,
        interval_s=0.25,
    )
    lines = readme_table.timeline(
        {
            "env": {"date": "2026-12-03 12:00:00"},
            "runs": {"cws extract": run, "idle": {**run, "streaming_from_s": None, "disk_GBps_streaming": None}},
        }
    )
    assert "| `cws extract` | 29.7 | 3.30 | 20.5 + 10.2 | 1.16 | 17.3 + 1.8 |" in lines
    assert "| `idle` | 29.7 | — | 20.5 + 10.2 | — | 17.3 + 1.8 |" in lines
