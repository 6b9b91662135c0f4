"""The disk's limits when read and written the way cws does it, with no compute: O_DIRECT, in 2 MB pages.

    python benchmarks/disk_floor.py [--read FILE ...] [--write PATH --bytes N] [--threads 16] [--depth 4]

Reads every --read file in --chunk-mb pieces, --threads at a time, file after file, each thread into
its own buffer; writes --bytes of zeros to --write in 8 MB blocks, --depth at a time, front to back,
then fsyncs; both at once when both are given. Every buffer is private memory on a 2 MB boundary,
madvised into transparent huge pages: in scattered 4 KB pages a direct request is cut at the block
queue's max_segments (254 x 4 KB = 1 MB on a virtio disk), which is why `dd iflag=direct` (4 KB pages)
is not the disk's limit. Standalone (stdlib only), so the floor does not depend on the code it measures.
Prints what it did and its seconds; exits 1 with the error when a read or write fails.
"""

import argparse
import contextlib
import ctypes
import mmap
import os
import sys
import threading
import time

HUGE = 2 * 2**20
ALIGN = 4096
BLOCK = 8 * 2**20


def buffer(nbytes):
    m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(m)) % HUGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            m.madvise(mmap.MADV_HUGEPAGE, start, len(m) - start)
    view = memoryview(m)[start : start + nbytes]
    view[::ALIGN] = bytes(len(view[::ALIGN]))  # faulted in before the clock starts
    return view


def workers(n, job, jobs, errors):
    """The loop of each of n threads: job(its buffer, item) for the items of the shared iterator `jobs`."""
    lock = threading.Lock()

    def loop(buf):
        try:
            while True:
                with lock:
                    item = next(jobs, None)
                if item is None:
                    return
                job(buf, item)
        except OSError as e:
            errors.append(e)

    return loop


def read_jobs(paths, chunk):
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        size = os.fstat(fd).st_size
        for offset in range(0, size, chunk):
            yield fd, offset
        # descriptors stay open until exit: a read of this file may still be in flight


def read_piece(buf, item):
    fd, offset = item
    os.preadv(fd, [buf], offset)  # short at the end of the file


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--read", nargs="*", default=[])
    ap.add_argument("--write")
    ap.add_argument("--bytes", type=int, default=0)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--chunk-mb", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4, help="8 MB direct writes in flight")
    args = ap.parse_args()
    chunk = args.chunk_mb * 2**20
    errors, threads = [], []
    if args.read:
        loop = workers(args.threads, read_piece, read_jobs(args.read, chunk), errors)
        threads += [threading.Thread(target=loop, args=(buffer(chunk),)) for _ in range(args.threads)]
    wfd = None
    if args.write:
        wfd = os.open(args.write, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        aligned = args.bytes // ALIGN * ALIGN

        def write_block(buf, offset):
            n = min(BLOCK, aligned - offset)
            done = 0
            while done < n:
                done += os.pwrite(wfd, buf[done:n], offset + done)

        loop = workers(args.depth, write_block, iter(range(0, aligned, BLOCK)), errors)
        threads += [threading.Thread(target=loop, args=(buffer(BLOCK),)) for _ in range(args.depth)]
    start = time.perf_counter()  # buffers made and faulted in
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if wfd is not None and not errors:
        if args.bytes > aligned:  # the unaligned tail, through the page cache
            with open(args.write, "r+b") as f:
                f.seek(aligned)
                f.write(bytes(args.bytes - aligned))
        os.fsync(wfd)
    wall = time.perf_counter() - start
    if errors:
        print(f"disk_floor: {errors[0]}", file=sys.stderr)
        return 1
    did = []
    if args.read:
        gb = sum(os.path.getsize(p) for p in args.read) / 1e9
        did.append(f"read {gb:.2f} GB ({args.threads} x {args.chunk_mb} MB)")
    if args.write:
        did.append(f"wrote {args.bytes / 1e9:.2f} GB ({args.depth} x 8 MB) + fsync")
    print(f"{', '.join(did) or 'nothing to do'}: {wall:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
