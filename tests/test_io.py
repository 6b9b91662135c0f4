"""cws.io: safetensors header parsing, row-slice reads, checkpoints and the sharded writer."""

import errno
import json
import mmap
import os
import random
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cws.errors import CheckpointError, CwsError
from cws.io.checkpoint import Checkpoint
from cws.io.format import DTYPE_NAMES, DTYPES, TensorInfo, build_header, read_header
from cws.io.reader import MappedFiles, read_into, read_tensor
from cws.io.writer import ShardedWriter, copy_model_files
from test_bad_inputs import esc

SHAPES = [(), (0, 5), (7,), (5, 123), (3, 4, 5)]


def _random(shape, dtype, gen):
    """Random bytes reinterpreted as `dtype` (every bit pattern, NaNs included)."""
    n = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


@pytest.fixture
def all_dtypes_file(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {f"{name}/{i}": _random(s, dt, gen) for name, dt in DTYPES.items() for i, s in enumerate(SHAPES)}
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "hi"})
    return path, tensors


def _tiny_llama(tmp_path, max_shard_size="20KB"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = LlamaForCausalLM(cfg)
    src = tmp_path / "llama"
    model.save_pretrained(src, max_shard_size=max_shard_size)
    (src / "tokenizer_config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    return model, src


# ---------------------------------------------------------------- format


def test_dtype_tables_are_inverse():
    assert {
        "F64",
        "F32",
        "F16",
        "BF16",
        "I64",
        "I32",
        "I16",
        "I8",
        "U8",
        "BOOL",
        "F8_E4M3",
        "F8_E5M2",
        "U16",
        "U32",
        "U64",
    } <= set(DTYPES)
    assert DTYPES["BF16"] is torch.bfloat16 and DTYPES["F8_E4M3"] is torch.float8_e4m3fn
    assert all(DTYPES[DTYPE_NAMES[dt]] is dt for dt in DTYPE_NAMES)


def test_read_header_matches_safetensors(all_dtypes_file):
    path, tensors = all_dtypes_file
    infos, meta = read_header(path)
    assert meta == {"format": "pt", "note": "hi"}
    assert set(infos) == set(tensors)
    starts = [i.start for i in infos.values()]
    assert starts == sorted(starts)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert max(i.end for i in infos.values()) == path.stat().st_size
    for name, t in tensors.items():
        info = infos[name]
        assert (info.name, info.dtype, info.shape, info.path) == (name, t.dtype, tuple(t.shape), str(path))
        assert info.start >= 8 + n and info.nbytes == t.numel() * t.element_size()
        assert info.numel == t.numel() and info.rows == (t.shape[0] if t.dim() else 1)
        assert info.row_bytes * info.rows == info.nbytes or info.rows == 0
        assert info.is_float == t.dtype.is_floating_point


def test_tensor_info_properties():
    info = TensorInfo("w", torch.bfloat16, (5, 3, 2), "f", 100, 160)
    assert (info.nbytes, info.numel, info.rows, info.row_bytes, info.is_float) == (60, 30, 5, 12, True)
    scalar = TensorInfo("s", torch.int32, (), "f", 8, 12)
    assert (scalar.nbytes, scalar.numel, scalar.rows, scalar.row_bytes, scalar.is_float) == (4, 1, 1, 4, False)
    empty = TensorInfo("e", torch.float32, (0, 5), "f", 8, 8)
    assert (empty.nbytes, empty.numel, empty.rows, empty.row_bytes) == (0, 0, 0, 20)


def test_build_header_layout():
    header, offsets = build_header(
        [("a", torch.float16, (3, 2)), ("b", torch.int8, ()), ("c", torch.float32, (0, 4))], {"k": "v"}
    )
    (n,) = struct.unpack("<Q", header[:8])
    assert len(header) == 8 + n and n % 8 == 0
    doc = json.loads(header[8:])
    assert doc["__metadata__"] == {"k": "v"}
    assert doc["a"] == {"dtype": "F16", "shape": [3, 2], "data_offsets": [0, 12]}
    assert offsets == {"a": (0, 12), "b": (12, 13), "c": (13, 13)}
    with pytest.raises(ValueError, match="'a'"):
        build_header([("a", torch.float32, (1,)), ("a", torch.float32, (1,))])


def test_build_header_readable_by_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {
        f"t{i}": _random(s, dt, gen)
        for i, (s, dt) in enumerate(
            [((5, 123), torch.bfloat16), ((), torch.float64), ((0, 5), torch.int16), ((7,), torch.bool)]
        )
    }
    header, offsets = build_header([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], {"a": "b"})
    path = tmp_path / "built.safetensors"
    path.write_bytes(header + b"".join(bytes(_bytes(t).numpy()) for t in tensors.values()))
    loaded = load_file(str(path))
    assert all(_same(loaded[k], t) for k, t in tensors.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "b"}
    infos, _ = read_header(path)
    assert {k: (i.start - len(header), i.end - len(header)) for k, i in infos.items()} == offsets


# ---------------------------------------------------------------- reader


def test_read_tensor_every_dtype_and_shape(all_dtypes_file):
    path, tensors = all_dtypes_file
    infos, _ = read_header(path)
    reference = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        for name, info in infos.items():
            got = read_tensor(info)
            assert _same(got, tensors[name]) and _same(got, reference[name]) and _same(got, f.get_tensor(name))


def test_read_row_slices_into_reused_buffer(all_dtypes_file):
    path, tensors = all_dtypes_file
    infos, _ = read_header(path)
    buf = torch.empty(4096, dtype=torch.uint8)
    for name, info in infos.items():
        t = tensors[name]
        if t.dim() == 0:
            continue
        for lo, hi in [(0, 0), (0, 1), (1, t.shape[0]), (t.shape[0] // 2, t.shape[0])]:
            if not 0 <= lo <= hi <= t.shape[0]:
                continue
            numel = t[lo:hi].numel()
            out = buf[8 : 8 + numel * t.element_size()].view(t.dtype)
            got = read_into(info, out, lo, hi)
            assert got.data_ptr() == out.data_ptr()
            assert _same(got, t[lo:hi]) and _same(read_tensor(info, lo, hi), t[lo:hi])


def test_read_into_rejects_bad_buffers(all_dtypes_file):
    path, _ = all_dtypes_file
    info = read_header(path)[0]["F32/3"]  # shape (5, 123)
    with pytest.raises(ValueError, match="F32/3"):
        read_into(info, torch.empty(2, 123, dtype=torch.float16), 0, 2)
    with pytest.raises(ValueError, match="F32/3"):
        read_into(info, torch.empty(3, 123), 0, 2)
    with pytest.raises(ValueError, match="F32/3"):
        read_into(info, torch.empty(123, 2).t(), 0, 2)
    with pytest.raises(ValueError, match=r"rows \[4, 6\)"):
        read_tensor(info, 4, 6)


def test_reads_from_threads(all_dtypes_file):
    path, tensors = all_dtypes_file
    infos, _ = read_header(path)
    results = {}

    def work(name):
        results[name] = read_tensor(infos[name])

    threads = [threading.Thread(target=work, args=(n,)) for n in list(infos)[:8]]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 8 and all(_same(v, tensors[k]) for k, v in results.items())


def test_read_sees_replaced_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    assert torch.equal(read_tensor(read_header(path)[0]["w"]), torch.zeros(4))
    info = read_header(path)[0]["w"]
    path.unlink()
    save_file({"w": torch.ones(4)}, str(path))
    assert torch.equal(read_tensor(read_header(path)[0]["w"]), torch.ones(4))
    with pytest.raises(CheckpointError, match="the file was (replaced|modified)"):
        read_tensor(info)  # the old header's offsets are never used on the new file


def test_mapped_views_match_safetensors(all_dtypes_file):
    path, tensors = all_dtypes_file
    infos, _ = read_header(path)
    maps = MappedFiles()
    with safe_open(str(path), "pt") as f:
        for name, info in infos.items():
            t = f.get_tensor(name)
            ranges = [(0, info.rows)] + ([(1, t.shape[0]), (t.shape[0] // 2, t.shape[0])] if t.dim() else [])
            for lo, hi in [(lo, hi) for lo, hi in ranges if lo <= hi]:
                got = maps.view(info, lo, hi)
                want = t[lo:hi] if t.dim() else t
                if want.numel() == 0 or (info.start + lo * info.row_bytes) % info.dtype.itemsize:
                    assert got is None  # nothing to map, or misaligned for the dtype: the caller reads instead
                    continue
                view, pages = got
                assert _same(view, want) and _same(view, tensors[name][lo:hi] if t.dim() else tensors[name])
                MappedFiles.release(pages)
                assert _same(view, want)  # released pages fault back in from the file
    maps.close()


def test_mapped_views_never_write_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(path))
    before = path.read_bytes()
    view, _ = MappedFiles().view(read_header(path)[0]["w"])
    view.fill_(7.0)  # copy-on-write: only this process's pages change
    assert path.read_bytes() == before


def test_mapped_view_of_a_truncated_or_replaced_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1024), "b": torch.ones(1024)}, str(path))
    infos = read_header(path)[0]
    maps = MappedFiles()
    assert torch.equal(maps.view(infos["a"])[0], torch.zeros(1024))
    maps.close()
    path.unlink()
    save_file({"a": torch.full((1024,), 2.0), "b": torch.ones(1024)}, str(path))
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'a': the file was (replaced|modified)"):
        maps.view(infos["a"])  # never read with the old header's offsets
    infos = read_header(path)[0]
    os.truncate(path, infos["b"].end - 3)  # after the header check: refused, never a SIGBUS
    for m in (MappedFiles(), maps):
        with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'b': file truncated"):
            m.view(infos["b"])
    path.unlink()
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'a': cannot open"):
        maps.view(infos["a"])


def test_mapped_files_fall_back_and_forget_old_maps(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({"w": torch.full((64,), float(i))}, str(paths[-1]))
    infos = [read_header(p)[0]["w"] for p in paths]
    maps = MappedFiles(max_open=2)
    views = [maps.view(i)[0] for i in infos]
    assert len(maps._maps.items) == 2 and [v[0].item() for v in views] == [0.0, 1.0, 2.0]  # forgotten maps stay valid

    def refuse(*a, **k):
        raise OSError(19, "No such device")

    monkeypatch.setattr("mmap.mmap", refuse)  # a file system that cannot map: no view, the engine reads instead
    assert MappedFiles().view(infos[0]) is None


def _direct_slots(reads):
    from cws.io import direct
    from cws.ops.engine import _Arena

    return _Arena().views([(torch.uint8, (direct.DirectReads.span(*r)[1],)) for r in reads], direct.ALIGN)


def test_direct_reads_match_safetensors(all_dtypes_file):
    """O_DIRECT reads of every dtype and shape, whole and row ranges, at every offset the file has (the
    last tensor's aligned span runs past the end of the file), cut into 4 KiB pieces read by 3 threads."""
    from cws.io import direct

    path, tensors = all_dtypes_file
    infos, _ = read_header(path)
    reads, want = [], []
    with safe_open(str(path), "pt") as f:
        for name, info in infos.items():
            t = f.get_tensor(name)
            ranges = [(0, info.rows)] + ([(1, t.shape[0]), (t.shape[0] // 2, t.shape[0])] if t.dim() else [])
            for lo, hi in [(lo, hi) for lo, hi in ranges if lo <= hi]:
                reads.append((info, lo, hi))
                want.append(t[lo:hi] if t.dim() else t)
    reader_ = direct.DirectReads(threads=3, chunk=4096)
    if reader_._fd(reads[0][0]) is None:
        pytest.skip("this file system refuses O_DIRECT")
    got = reader_.read(reads, _direct_slots(reads))
    direct_ok = 0
    for (info, lo, _), g, w in zip(reads, got, want):
        if (info.start + lo * info.row_bytes) % info.dtype.itemsize:
            assert g is None  # misaligned for its dtype: the caller reads it another way
            continue
        assert _same(g, w), info.name
        direct_ok += 1
    assert direct_ok > len(reads) // 2
    assert infos[max(infos, key=lambda n: infos[n].end)].end == path.stat().st_size  # the last one was read
    reader_.close()


def test_direct_reads_refuse_what_they_cannot_do(tmp_path):
    from cws.io import direct

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(3000, dtype=torch.float32), "b": torch.ones(5000)}, str(path))
    infos = read_header(path)[0]
    r = direct.DirectReads()
    if r._fd(infos["a"]) is None:
        pytest.skip("this file system refuses O_DIRECT")
    slot = _direct_slots([(infos["a"], 0, 3000)])[0]
    buf = torch.empty(slot.numel() + 1, dtype=torch.uint8)  # a slot that is not page-aligned: not read
    assert r.read([(infos["a"], 0, 3000)], [buf[1:] if buf.data_ptr() % 4096 == 0 else buf[: slot.numel()]]) == [None]
    assert torch.equal(r.read([(infos["a"], 0, 3000)], [slot])[0], torch.arange(3000, dtype=torch.float32))
    fd = r._fd(infos["b"])
    aligned = torch.frombuffer(mmap.mmap(-1, 24576), dtype=torch.uint8)  # page-aligned, as O_DIRECT wants
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'b': file truncated \(wanted 20000 bytes"):
        direct.DirectReads._pread(
            infos["b"], fd, aligned, 0, 24576, path.stat().st_size, 20000
        )  # starts at the end of the file
    size = path.stat().st_size  # not a multiple of 4096: the read stops short there, never reads again unaligned
    pos = (size // 4096 - 1) * 4096
    assert size % 4096 and pos >= 0
    with pytest.raises(
        CheckpointError,
        match=rf"tensor 'b': file truncated \(wanted 24576 bytes at offset {pos}, "
        rf"got {size - pos}\)",
    ):
        direct.DirectReads._pread(infos["b"], fd, aligned, 0, 24576, pos, 24576)
    os.truncate(path, infos["b"].end - 3)
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'b': file truncated"):
        r.read([(infos["b"], 0, 5000)], _direct_slots([(infos["b"], 0, 5000)]))
    path.unlink()
    save_file({"a": torch.zeros(3000), "b": torch.ones(5000)}, str(path))
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'a': the file was (replaced|modified)"):
        r.read([(infos["a"], 0, 3000)], [slot])  # never with the old header's offsets
    r.close()


def refuse_o_direct(monkeypatch):
    """Make fcntl(F_SETFL, O_DIRECT) fail with EINVAL, as on a file system without O_DIRECT."""
    import fcntl

    from cws.io import direct

    real = fcntl.fcntl

    def fake(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(direct.fcntl, "fcntl", fake)


def test_direct_reads_on_a_file_system_without_o_direct(tmp_path, monkeypatch):
    """No O_DIRECT: no direct view (the engine reads those ranges another way), no descriptor left open."""
    from cws.io import direct

    path = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(path))
    info = read_header(path)[0]["w"]
    refuse_o_direct(monkeypatch)
    before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    r = direct.DirectReads()
    assert r.read([(info, 0, 4096)], _direct_slots([(info, 0, 4096)])) == [None]
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before
    r.close()


def test_cached_fraction_follows_the_page_cache(tmp_path, monkeypatch):
    """cachestat(2) where the kernel has it, mincore over a map where not: the same fractions, cold,
    half read and whole."""
    from cws.io import direct

    def both():
        fast = direct.cached_fraction([str(path)])
        with monkeypatch.context() as m:
            m.setattr(direct, "_syscall", None)
            slow = direct.cached_fraction([str(path)])
        assert fast == slow
        return fast

    path = tmp_path / "x.bin"
    path.write_bytes(os.urandom(64 * 4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped from the cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # and no readahead past what is read
        cold = both()
        os.pread(fd, 16 * 4096, 0)
        os.pread(fd, 16 * 4096, 32 * 4096)
        half = both()
        os.pread(fd, 64 * 4096, 0)
    finally:
        os.close(fd)
    assert both() == 1.0
    if cold == 1.0:
        pytest.skip("this file system keeps its pages (tmpfs): nothing to drop")
    assert cold < 0.5 and 0.5 <= half < 1.0
    assert direct.cached_fraction([]) == 1.0 and direct.cached_fraction([str(path), str(tmp_path / "gone")]) is None


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc")
def test_released_pages_leave_resident_memory(tmp_path):
    def rss_file():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile:"))
        return int(line.split()[1]) * 1024

    path = tmp_path / "big.safetensors"
    save_file({"w": torch.ones(16 * 2**20, dtype=torch.float32)}, str(path))  # 64 MiB
    info = read_header(path)[0]["w"]
    maps = MappedFiles()
    before = rss_file()
    view, pages = maps.view(info)  # prefaulted here
    assert rss_file() - before > 60 * 2**20
    MappedFiles.release(pages)
    assert rss_file() - before < 4 * 2**20
    assert view[-1].item() == 1.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc")
def test_many_small_views_released_leave_resident_memory(tmp_path):
    """A fault maps the pages around a small view too (fault-around, large folios): releasing views of
    thousands of small tensors, one by one, must not leave the file mapped piece by piece."""

    def rss_file():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile:"))
        return int(line.split()[1]) * 1024

    path = tmp_path / "small.safetensors"
    save_file({f"t{i:04d}": torch.full((3000,), float(i)) for i in range(4096)}, str(path))  # 48 MiB of 12 KB
    infos = read_header(path)[0]
    path.read_bytes()  # in the page cache: faults map what is around them
    maps = MappedFiles()
    before = rss_file()
    for name in sorted(infos, key=lambda n: infos[n].start):
        view, pages = maps.view(infos[name])
        assert view[0].item() == float(name[1:])
        MappedFiles.release(pages)
    assert rss_file() - before < 8 * 2**20
    maps.close()


def test_offsets_beyond_2gib(tmp_path):
    big = 2**31 + 24
    header, offsets = build_header([("big", torch.uint8, (big,)), ("tail", torch.float32, (2, 3))])
    path = tmp_path / "sparse.safetensors"
    tail = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with open(path, "wb") as f:  # a sparse file: only the header and the last bytes are real
        f.write(header)
        f.seek(len(header) + big - 4)
        f.write(b"\x01\x02\x03\x04" + bytes(_bytes(tail).numpy()))
    infos, _ = read_header(path)
    assert infos["tail"].start == len(header) + offsets["tail"][0] > 2**31
    assert torch.equal(read_tensor(infos["tail"]), tail)
    assert torch.equal(read_tensor(infos["tail"], 1, 2), tail[1:])
    assert read_tensor(infos["big"], big - 6, big).tolist() == [0, 0, 1, 2, 3, 4]


# ---------------------------------------------------------------- header validation


def _raw_file(path, header_obj, data=b"", raw_json=None):
    body = raw_json if raw_json is not None else json.dumps(header_obj).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize(
    "header, data, match",
    [
        ({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "'w': unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12, "'w': data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 12, "'w': file truncated"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "'a' and 'b' overlap",
        ),
    ],
)
def test_read_header_rejects_bad_entries(tmp_path, header, data, match):
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match) as e:
        read_header(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_read_header_rejects_bad_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="short.safetensors.*shorter than"):
        read_header(short)
    absurd = tmp_path / "absurd.safetensors"
    absurd.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="absurd.safetensors.*header length 1000000000000"):
        read_header(absurd)
    corrupt = _raw_file(tmp_path / "corrupt.safetensors", None, raw_json=b'{"w": {"dtype": ')
    with pytest.raises(CheckpointError, match="corrupt.safetensors: corrupt safetensors header JSON"):
        read_header(corrupt)


# ---------------------------------------------------------------- checkpoint


def test_checkpoint_bare_file_and_single_dir(all_dtypes_file, tmp_path):
    path, tensors = all_dtypes_file
    ck = Checkpoint.open(path)
    assert (ck.path, ck.root, ck.files) == (path, tmp_path, [str(path)])
    assert ck.metadata == {"format": "pt", "note": "hi"}
    assert ck.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(ck) == len(tensors) and "BF16/3" in ck
    assert _same(ck.read("BF16/3", 1, 3), tensors["BF16/3"][1:3])
    out = torch.zeros(30, dtype=torch.float16)
    assert _same(ck.read_into("F16/4", out[5:25], 2, 3), tensors["F16/4"][2:3])
    assert _same(out[5:25], tensors["F16/4"][2].reshape(-1)) and not out[:5].any() and not out[25:].any()
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        ck.read("nope")
    assert set(Checkpoint.open(tmp_path).tensors) == set(tensors)  # dir with exactly one .safetensors


def test_checkpoint_hf_dirs(tmp_path):
    model, src = _tiny_llama(tmp_path)
    sd = model.state_dict()
    ck = Checkpoint.open(src)
    assert len(ck.files) > 2 and all(Path(f).parent == src for f in ck.files)
    assert ck.root == src and ck.metadata.get("format") == "pt"
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(ck.tensors) == set(index)
    assert all(Path(ck.tensors[k].path).name == v for k, v in index.items())
    assert all(_same(ck.read(k), sd[k]) for k in ck.tensors)
    assert Checkpoint.open(src / "model.safetensors.index.json").tensors == ck.tensors

    single = tmp_path / "single"
    model.save_pretrained(single)
    ck1 = Checkpoint.open(single)
    assert ck1.files == [str(single / "model.safetensors")]
    assert ck1.nbytes == ck.nbytes and all(_same(ck1.read(k), sd[k]) for k in ck1.tensors)


def test_checkpoint_adapter_dir_opens_adapter_weights(tmp_path):
    save_file({"base.lora_A.weight": torch.ones(2, 3)}, str(tmp_path / "adapter_model.safetensors"))
    save_file({"other": torch.ones(1)}, str(tmp_path / "extra.safetensors"))
    (tmp_path / "adapter_config.json").write_text("{}")
    ck = Checkpoint.open(tmp_path)
    assert list(ck.tensors) == ["base.lora_A.weight"]
    assert torch.equal(ck.read("base.lora_A.weight"), torch.ones(2, 3))


def _sharded(tmp_path):
    d = tmp_path / "sh"
    d.mkdir()
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(d / "s1.safetensors"))
    save_file({"c": torch.full((2,), 7.0)}, str(d / "s2.safetensors"))
    weight_map = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}
    return d, weight_map


def _write_index(d, weight_map):
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_checkpoint_manual_index_ok(tmp_path):
    d, wm = _sharded(tmp_path)
    _write_index(d, wm)
    ck = Checkpoint.open(d)
    assert list(ck.tensors) == ["a", "b", "c"]
    assert ck.files == [str(d / "s1.safetensors"), str(d / "s2.safetensors")]
    assert ck.read("c").tolist() == [7.0, 7.0]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d, wm: wm.update(c="s3.safetensors"), r"shard 's3.safetensors' does not exist"),
        (lambda d, wm: wm.update(z="s2.safetensors"), r"'z' is listed under s2.safetensors but absent"),
        (lambda d, wm: wm.pop("b"), r"'b' in s1.safetensors is not listed in the index"),
        (
            lambda d, wm: save_file({"c": torch.ones(1), "a": torch.ones(1)}, str(d / "s2.safetensors")),
            r"'a' is in both s1.safetensors and s2.safetensors",
        ),
        (lambda d, wm: wm.update(c="../s2.safetensors"), r"must be a file name"),
    ],
)
def test_checkpoint_index_errors(tmp_path, change, match):
    d, wm = _sharded(tmp_path)
    change(d, wm)
    _write_index(d, wm)
    with pytest.raises(CheckpointError, match=match) as e:
        Checkpoint.open(d)
    assert str(d / "model.safetensors.index.json") in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_open_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing.*no such file"):
        Checkpoint.open(tmp_path / "missing")
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle checkpoints are not read for safety"):
        Checkpoint.open(pk)
    with pytest.raises(CheckpointError, match="pickle checkpoints"):
        Checkpoint.open(pk / "pytorch_model.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty: no \\*.safetensors"):
        Checkpoint.open(empty)
    two = tmp_path / "two"
    two.mkdir()
    for n in ("x", "y"):
        save_file({"w": torch.ones(1)}, str(two / f"{n}.safetensors"))
    with pytest.raises(CheckpointError, match="two: ambiguous.*x.safetensors, y.safetensors"):
        Checkpoint.open(two)
    d, _ = _sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: corrupt index JSON"):
        Checkpoint.open(d)


def test_checkpoint_truncated_and_corrupt_shards(tmp_path):
    _, src = _tiny_llama(tmp_path)
    ck = Checkpoint.open(src)
    last = ck.files[-1]
    victim = list(read_header(last)[0].values())[-1]
    os.truncate(last, victim.end - 3)
    with pytest.raises(CheckpointError, match=f"{Path(last).name}: tensor '{victim.name}': file truncated"):
        Checkpoint.open(src)
    with pytest.raises(CheckpointError, match=f"{Path(last).name}: tensor '{victim.name}': file truncated"):
        ck.read(victim.name)  # truncated after the header check: a short read
    first = Path(ck.files[0])
    data = bytearray(first.read_bytes())
    data[8] = ord("[")
    first.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{first.name}: corrupt safetensors header JSON"):
        Checkpoint.open(src)


# ---------------------------------------------------------------- writer


def _plan(tensors):
    return [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]


def test_writer_single_file_out_of_order_slices(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "w": _random((9, 5), torch.bfloat16, gen),
        "s": _random((), torch.float64, gen),
        "e": _random((0, 4), torch.float32, gen),
        "b": _random((6,), torch.bool, gen),
    }
    out = tmp_path / "out"
    with ShardedWriter(out, _plan(tensors), metadata={"cws": "1"}) as w:
        w.write("w", tensors["w"][6:9].contiguous(), 6)
        w.write("b", tensors["b"])
        w.write("w", tensors["w"][0:2].contiguous(), 0)
        w.write("e", tensors["e"])
        t = threading.Thread(target=w.write, args=("w", tensors["w"][2:6].contiguous(), 2))
        t.start()
        t.join()
        w.write("s", tensors["s"])
        w.add_json("extra.json", {"x": [1, 2]})
    assert sorted(os.listdir(out)) == ["extra.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    loaded = load_file(str(out / "model.safetensors"))
    assert loaded.keys() == tensors.keys() and all(_same(loaded[k], t) for k, t in tensors.items())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "cws": "1"}
    assert json.loads((out / "extra.json").read_text()) == {"x": [1, 2]}


def test_writer_rejects_bad_writes(tmp_path):
    plan = [("w", torch.float32, (4, 3)), ("s", torch.float16, ())]
    with pytest.raises(CheckpointError, match=r"not completely written: 'w' \(24/48 bytes\)$"):
        with ShardedWriter(tmp_path / "o", plan) as w:
            with pytest.raises(ValueError, match="'w'"):
                w.write("w", torch.zeros(4, 3, dtype=torch.float16))
            with pytest.raises(ValueError, match="'w'"):
                w.write("w", torch.zeros(3, 4).t())
            with pytest.raises(ValueError, match="'w'"):
                w.write("w", torch.zeros(2, 3), 3)
            with pytest.raises(ValueError, match="'w'"):
                w.write("w", torch.zeros(2, 4))
            with pytest.raises(ValueError, match="'zz'"):
                w.write("zz", torch.zeros(1))
            w.write("w", torch.zeros(2, 3), 1)
            with pytest.raises(ValueError, match=r"rows \[2, 3\) were already written"):
                w.write("w", torch.zeros(1, 3), 2)
            w.write("s", torch.zeros((), dtype=torch.float16))
    assert os.listdir(tmp_path) == []


def test_writer_multi_shard_with_index(tmp_path):
    gen = torch.Generator().manual_seed(4)
    tensors = {f"layer.{i}": _random((10, 10), torch.float32, gen) for i in range(5)}  # 400 bytes each
    out = tmp_path / "out"
    with ShardedWriter(out, _plan(tensors), max_shard_size=900, prefix="steered") as w:
        for k in reversed(tensors):
            w.write(k, tensors[k])
    names = [f"steered-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(os.listdir(out)) == names + ["steered.safetensors.index.json"]
    index = json.loads((out / "steered.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 2000},
        "weight_map": {
            "layer.0": names[0],
            "layer.1": names[0],
            "layer.2": names[1],
            "layer.3": names[1],
            "layer.4": names[2],
        },
    }
    assert w.weight_map == index["weight_map"]
    for name, shard in index["weight_map"].items():
        assert _same(load_file(str(out / shard))[name], tensors[name])
    ck = Checkpoint.open(out)
    assert list(ck.tensors) == list(tensors) and ck.metadata == {"format": "pt"}


def test_writer_tiny_llama_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    model, src = _tiny_llama(tmp_path)
    ck = Checkpoint.open(src)
    out = tmp_path / "copy"
    with ShardedWriter(
        out, [(k, i.dtype, i.shape) for k, i in ck.tensors.items()], max_shard_size=30_000, inputs=[str(src)]
    ) as w:
        copied = copy_model_files(src, w)
        for name, info in reversed(list(ck.tensors.items())):
            half = info.rows // 2
            w.write(name, ck.read(name, half), half)
            w.write(name, ck.read(name, 0, half), 0)
    assert copied == ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer_config.json"]
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ref = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == ref.keys() and all(_same(got[k], ref[k]) for k in ref)


def test_writer_exception_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with ShardedWriter(out, [("w", torch.float32, (2,))]) as w:
            w.write("w", torch.ones(2))
            assert len(os.listdir(tmp_path)) == 1 and os.listdir(tmp_path)[0].startswith(".out.tmp-")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_writer_incomplete_tensor_is_error(tmp_path):
    plan = [("a", torch.float32, (4,)), ("b", torch.int32, ()), ("c", torch.int8, (0,)), ("d", torch.int8, (3, 0))]
    with pytest.raises(CheckpointError, match=r"not completely written: 'a' \(8/16 bytes\), 'b' \(0/4 bytes\)$"):
        with ShardedWriter(tmp_path / "out", plan) as w:
            w.write("a", torch.ones(2), 2)
    assert os.listdir(tmp_path) == []


def test_writer_refuses_existing_and_overlapping_outputs(tmp_path):
    plan = [("w", torch.float32, (1,))]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match=f"{out} exists; pass --overwrite"):
        ShardedWriter(out, plan)
    src = tmp_path / "model"
    src.mkdir()
    for bad in (src, src / "steered"):
        with pytest.raises(CheckpointError, match=f"output {bad} overlaps input {src}"):
            ShardedWriter(bad, plan, overwrite=True, inputs=[str(src)])
    with pytest.raises(CheckpointError, match="overlaps input"):  # output contains an input file
        ShardedWriter(tmp_path, plan, overwrite=True, inputs=[str(src / "model.safetensors")])
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]

    with ShardedWriter(out, plan, overwrite=True, inputs=[str(src)]) as w:
        w.write("w", torch.ones(1))
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]


_FSIZE_SCRIPT = """
import resource, signal, sys, torch
from cws.errors import CheckpointError
from cws.io.writer import ShardedWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    with ShardedWriter(sys.argv[1], [("w", torch.float32, (256, 256))]) as w:
        w.write("w", torch.ones(256, 256))
except CheckpointError as e:
    print(e)
"""


def test_writer_file_size_limit_is_checkpoint_error(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT, str(out)], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    msg = res.stdout.strip()
    assert msg.startswith(f"cannot write {out / 'model.safetensors'}: File too large"), msg
    assert os.listdir(tmp_path) == []


def test_errors_are_cws_errors():
    assert issubclass(CheckpointError, CwsError)


def _stream_file(path, pieces, behind=None):
    """Write (offset, bytes) pieces through a DirectStream; returns whether it stayed direct to the end."""
    from cws.io.direct import DirectStream

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        s = DirectStream(path, fd, behind)
        for offset, data in pieces:
            s.write(memoryview(data), offset)
        direct = s.active
        s.finish()
        s.close()
    finally:
        os.close(fd)
    return direct


def test_huge_buffers_are_aligned_zeroed_and_outlive_their_maker():
    # Direct I/O buffers start on a 2 MB boundary (so transparent huge pages can back them and a direct
    # request is a few contiguous runs); the memory stays mapped while any view of it is alive.
    import gc

    from cws.io import direct
    from cws.ops.engine import _Arena

    for n in (1, 4096, direct.HUGE + 12345):
        t = torch.frombuffer(direct.huge_buffer(n), dtype=torch.uint8)
        assert t.numel() == n and t.data_ptr() % direct.HUGE == 0 and int(t.count_nonzero()) == 0
        gc.collect()
        t.fill_(7)
        assert int(t.sum()) == 7 * n
    arena = _Arena()
    (small,) = arena.views([(torch.uint8, (100,))])
    assert small.data_ptr() % 64 == 0
    big = arena.views([(torch.bfloat16, (3, direct.HUGE // 4)), (torch.uint8, (4096,))], direct.ALIGN)
    assert arena.buf.data_ptr() % direct.HUGE == 0 and all(v.data_ptr() % direct.ALIGN == 0 for v in big)
    big[0].fill_(1.5)
    gc.collect()
    assert float(big[0].double().sum()) == 1.5 * 3 * direct.HUGE // 4


def test_direct_reads_into_huge_arenas_match_safetensors(tmp_path):
    # A tensor bigger than a huge page, read whole and in row ranges through the engine's arenas.
    from cws.io import direct

    gen = torch.Generator().manual_seed(5)
    tensors = {
        "small": torch.randn(3, 5, generator=gen),
        "big": torch.randn(1200, 1111, generator=gen).to(torch.bfloat16),
    }  # 2.67 MB, odd row bytes
    save_file(tensors, str(tmp_path / "m.safetensors"))
    infos, _ = read_header(tmp_path / "m.safetensors")
    reads = [(infos["small"], 0, 3), (infos["big"], 0, 1200), (infos["big"], 7, 1001)]
    r = direct.DirectReads(threads=4, chunk=2**20)
    try:
        if r._fd(infos["big"]) is None:
            pytest.skip("this file system refuses O_DIRECT")
        slots = _direct_slots(reads)
        assert slots[0].data_ptr() % direct.HUGE == 0  # the arena was big enough for huge pages
        got = r.read(reads, slots)
    finally:
        r.close()
    assert torch.equal(got[0], tensors["small"])
    assert torch.equal(got[1], tensors["big"]) and torch.equal(got[2], tensors["big"][7:1001])


def test_direct_stream_writes_the_same_bytes(tmp_path, monkeypatch):
    from cws.io import direct

    monkeypatch.setattr(direct, "BLOCK", 64 * 1024)  # many direct blocks, a staged remainder, an unaligned tail
    rng = random.Random(3)
    blob = bytes(rng.getrandbits(8) for _ in range(300_001))
    cuts = sorted(rng.sample(range(1, len(blob)), 40))
    pieces = [(a, blob[a:b]) for a, b in zip([0, *cuts], [*cuts, len(blob)])]
    stayed = _stream_file(tmp_path / "seq.bin", pieces)
    assert (tmp_path / "seq.bin").read_bytes() == blob
    # full blocks written behind by other threads (two spares for 4 blocks: some wait for a spare)
    behind = direct.WriteBehind(2)
    swaps = []
    real_swap = behind.swap
    monkeypatch.setattr(behind, "swap", lambda *a: swaps.append(a[2]) or real_swap(*a))
    assert _stream_file(tmp_path / "behind.bin", pieces, behind) == stayed
    behind.close()
    assert (tmp_path / "behind.bin").read_bytes() == blob
    assert swaps == ([0, 65536, 131072, 196608] if stayed else [])
    # out of order: the stream turns plain at the first jump, and the file is still right
    shuffled = pieces[:5] + pieces[6:] + [pieces[5]]
    assert not _stream_file(tmp_path / "jump.bin", shuffled)
    assert (tmp_path / "jump.bin").read_bytes() == blob
    assert stayed == _o_direct_works(tmp_path)
    # a file system that refuses O_DIRECT (EINVAL, as older tmpfs does): plain from the start
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    assert not _stream_file(tmp_path / "refused.bin", pieces)
    assert (tmp_path / "refused.bin").read_bytes() == blob


def test_a_failed_write_behind_fails_the_output(tmp_path, monkeypatch):
    # A full block written behind that fails (disk full) fails the run with the writer's error,
    # and leaves nothing: no output, no temporary directory.
    from cws.io import direct

    if not _o_direct_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT: nothing is written behind")
    (tmp_path / "probe").unlink()
    monkeypatch.setattr(direct, "BLOCK", 16 * 1024)
    real = direct.pwrite_all

    def pwrite_all(fd, data, offset):
        if threading.current_thread().name.startswith("cws-direct-write"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(direct, "pwrite_all", pwrite_all)
    t = torch.arange(40_000, dtype=torch.float32)
    with pytest.raises(
        CheckpointError,
        match=f"cannot write {esc(tmp_path / 'o' / 'model.safetensors')}: "
        f"{os.strerror(errno.ENOSPC)}; nothing was written",
    ):
        with ShardedWriter(tmp_path / "o", [("t", torch.float32, (40_000,))]) as w:
            for start in range(0, 40_000, 1000):
                w.write("t", t[start : start + 1000], start)
    assert os.listdir(tmp_path) == []


def test_writers_opened_together_share_their_spare_blocks(tmp_path, monkeypatch):
    # A multi-alpha apply opens one writer per alpha: their full blocks are written behind by one
    # WriteBehind (its spare blocks counted once), closed when the outputs are committed.
    from cws.io import direct
    from cws.io.writer import open_together

    monkeypatch.setattr(direct, "BLOCK", 16 * 1024)
    plan = [("a", torch.bfloat16, (300, 77)), ("b", torch.float32, (5000,))]
    g = torch.Generator().manual_seed(2)
    outs = [{n: torch.randn(shape, generator=g).to(dt) for n, dt, shape in plan} for _ in range(3)]
    writers = [ShardedWriter(tmp_path / f"o{i}", plan, max_shard_size=30_000) for i in range(3)]
    with open_together(writers) as opened:
        behind = opened[0]._behind
        assert all(w._behind is behind for w in opened) and (behind is not None) == direct.ENABLED
        for w, tensors in zip(opened, outs):
            for n, t in tensors.items():
                w.write(n, t)
    assert behind is None or behind._closed
    for i, tensors in enumerate(outs):
        loaded = {}
        for f in (tmp_path / f"o{i}").glob("*.safetensors"):
            loaded.update(load_file(f))
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_closing_a_stream_waits_for_its_writes_behind(tmp_path, monkeypatch):
    # The O_DIRECT descriptor is closed only once no thread writes through it any more.
    from cws.io import direct

    if not _o_direct_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT: nothing is written behind")
    monkeypatch.setattr(direct, "BLOCK", 4096)
    go, real = threading.Event(), direct.pwrite_all
    monkeypatch.setattr(direct, "pwrite_all", lambda *a: go.wait() and real(*a))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    behind = direct.WriteBehind(1)
    stream = direct.DirectStream(tmp_path / "f", fd, behind)
    stream.write(memoryview(b"x" * 4096), 0)  # one full block: written behind, held back by `go`
    closing = threading.Thread(target=stream.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive() and stream.direct is not None
    go.set()
    closing.join()
    behind.close()
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"x" * 4096


def _o_direct_works(d) -> bool:
    try:
        fd = os.open(d / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


def test_fsynced_writer_output_is_direct_and_identical(tmp_path, monkeypatch):
    # The writer's fsynced shards go through O_DIRECT; with CWS_DIRECT_IO=0 the same bytes go through the page cache.
    from cws.io import direct

    plan = [("a", torch.bfloat16, (300, 77)), ("b", torch.float32, (1000,)), ("c", torch.float16, (3, 5))]
    g = torch.Generator().manual_seed(1)
    tensors = {n: torch.randn(s, generator=g).to(dt) for n, dt, s in plan}
    outs = {}
    monkeypatch.setattr(direct, "BLOCK", 16 * 1024)  # several full blocks, written behind
    for on in (True, False):
        monkeypatch.setattr(direct, "ENABLED", on)
        with ShardedWriter(tmp_path / f"o{int(on)}", plan, max_shard_size=40_000) as w:
            assert all((s is not None) == on for s in w._streams)
            for n, t in tensors.items():
                for start in range(0, t.shape[0], 64) if t.dim() > 1 else [0]:
                    w.write(n, t[start : start + 64] if t.dim() > 1 else t, start)
            if on:  # written in order, so the streams stay direct to the end
                assert all(s.active for s in w._streams) == _o_direct_works(tmp_path)
        outs[on] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"o{int(on)}").iterdir())}
    assert outs[True] == outs[False]
    loaded = {}
    for f in (tmp_path / "o1").glob("*.safetensors"):
        loaded.update(load_file(f))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_header_parse_and_streaming_leave_the_collector_as_they_found_it(tmp_path):
    """read_header pauses Python's cyclic collector and the engine freezes the objects alive at its
    start; both give the process back its collector state, also when the parse fails."""
    import gc

    from cws.ops import engine

    f = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(3, 2)}, str(f))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 3) + b"{x}")
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            assert read_header(f)[0]["a"].shape == (3, 2)
            with pytest.raises(CheckpointError, match="corrupt"):
                read_header(bad)
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
    infos, _ = read_header(f)
    item = engine.Item("a", 3, [infos["a"]], [])
    seen = []
    engine.run([item], lambda s: seen.append(gc.get_freeze_count() > 0) or [], quiet=True, writes=False)
    assert seen == [True] and gc.get_freeze_count() == 0
