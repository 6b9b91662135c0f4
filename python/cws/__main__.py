"""`python -m cws ...`: the `cws` command, e.g. under `torchrun --nproc-per-node N -m cws apply ...`."""

from .cli import entry

if __name__ == "__main__":
    entry()
