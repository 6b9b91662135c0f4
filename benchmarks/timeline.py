"""Where a cold run's time goes: the disk's read and write rates and the command's CPU, interval by interval.

    python benchmarks/timeline.py [--name NAME] [--interval 0.25] [--warm] [--out FILE] -- cws apply ...

Drops the page cache (root; otherwise it says the run is not cold), imports torch and cws once untimed
(as bench_scale does: the libraries, not the checkpoints, come from the cache), then runs the command
and samples /sys/dev/block/<dev>/stat of the disk holding the current directory and /proc/<pid>/stat
of the command. Prints one line per interval and a summary: seconds before the disk streams the inputs
(Python and torch starting; `streaming_start`), GB read and written, the disk's rate from then to the
command's end, the command's user and system CPU (from its rusage). --out adds the run, under --name,
to a JSON file. The disk's figures count every process using it: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_scale import CWS_WARM, drop_caches
from harness import describe, machine, write_json

SECTOR = 512
WARM = CWS_WARM


def disk_stat(dev: int) -> tuple[int, int]:
    """(bytes read, bytes written) so far by the block device `dev` (a disk or a partition)."""
    f = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()
    return int(f[2]) * SECTOR, int(f[6]) * SECTOR


def cpu_s(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a live process, all its threads; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(cmd: list[str], interval: float, cold: bool, dev: int) -> dict:
    note = drop_caches() if cold else "page cache not dropped (--warm)"
    subprocess.run(WARM, check=True, stdout=subprocess.DEVNULL)
    samples, t0, start = [], time.perf_counter(), disk_stat(dev)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    ended: list = []
    threading.Thread(target=lambda: ended.append((os.wait4(p.pid, 0), time.perf_counter())), daemon=True).start()
    last, last_cpu = (t0, start), (0.0, 0.0)
    while not ended:
        time.sleep(interval)
        now, io, cpu = time.perf_counter(), disk_stat(dev), cpu_s(p.pid)
        if ended or cpu is None:
            break
        dt = now - last[0]
        samples.append(
            [
                round(now - t0, 3),
                (io[0] - last[1][0]) / dt / 1e6,
                (io[1] - last[1][1]) / dt / 1e6,
                (cpu[0] - last_cpu[0]) / dt,
                (cpu[1] - last_cpu[1]) / dt,
            ]
        )
        last, last_cpu = (now, io), cpu
    while not ended:
        time.sleep(0.01)
    (_, status, usage), t_end = ended[0]
    end = disk_stat(dev)
    wall = t_end - t0
    read, written = end[0] - start[0], end[1] - start[1]
    first = streaming_start(samples, read, wall)
    busy = wall - first if first is not None else None
    return {
        "command": " ".join(cmd),
        "cold": note is None,
        "notes": [note] if note else [],
        "exit_status": os.waitstatus_to_exitcode(status),
        "wall_s": wall,
        "streaming_from_s": first,
        "read_GB": read / 1e9,
        "written_GB": written / 1e9,
        "disk_GBps_streaming": (read + written) / busy / 1e9 if busy else None,
        "cpu_user_s": usage.ru_utime,
        "cpu_sys_s": usage.ru_stime,
        "interval_s": interval,
        "samples": [[round(v, 3) for v in s] for s in samples],
        "sample_columns": ["t_s", "read_MBps", "write_MBps", "user_cores", "sys_cores"],
    }


def streaming_start(samples, read_bytes: float, wall: float) -> float | None:
    """When the disk started streaming the inputs: the start of the first interval that read at half the
    run's mean read rate or more (a torch import's page faults read far slower); None if nothing was read."""
    if not read_bytes or not samples:
        return None
    half = 0.5 * read_bytes / wall / 1e6
    previous = 0.0
    for t, rate, *_ in samples:
        if rate >= half:
            return previous
        previous = t
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", help="the run's name in --out (default: the command)")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between samples (default 0.25)")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache")
    ap.add_argument("--out", type=Path, help="JSON file to add the run to")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command to time after --")
    print(describe(machine()), flush=True)
    run = measure(cmd, args.interval, not args.warm, os.stat(".").st_dev)
    for t, r, w, u, s in run["samples"]:
        print(f"{t:7.2f} s  read {r:6.0f} MB/s  write {w:6.0f} MB/s  cpu user {u:4.2f} sys {s:4.2f}")
    rate = run["disk_GBps_streaming"]
    first = run["streaming_from_s"]
    print(
        f"wall {run['wall_s']:.1f} s, streaming from {first if first is None else round(first, 2)} s, "
        f"read {run['read_GB']:.2f} GB, written {run['written_GB']:.2f} GB, "
        f"disk {'-' if rate is None else f'{rate:.2f}'} GB/s (read + written) from then on, "
        f"cpu user {run['cpu_user_s']:.1f} s sys {run['cpu_sys_s']:.1f} s, exit {run['exit_status']}"
        + "".join(f"\nnote: {n}" for n in run["notes"])
    )
    if args.out:
        data = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
        data.pop("env", None)
        data.pop("machine", None)  # write_json records this machine
        data["runs"][args.name or run["command"]] = run
        write_json(args.out, data)
    return 0 if run["exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
