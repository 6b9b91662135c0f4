"""User-facing errors: one clear line naming the file or tensor at fault."""


class CwsError(Exception):
    """A problem with the user's inputs or options; the CLI prints it on one line and exits 2."""


class ListedError(CwsError):
    """A CwsError whose message lists its items one per line (bad rows of a data file): the CLI
    keeps those lines."""


class CheckpointError(CwsError):
    """A checkpoint on disk is unreadable, truncated, or inconsistent."""


class MismatchError(CwsError):
    """Checkpoints walked together disagree (missing tensors, shapes, dtypes); lists every problem."""

    def __init__(self, problems: list[str], hint: str = ""):
        self.problems = list(problems)
        head = f"{len(self.problems)} problem(s) between the checkpoints"
        body = "; ".join(self.problems[:20]) + (" ..." if len(self.problems) > 20 else "")
        super().__init__(f"{head}: {body}" + (f" ({hint})" if hint else ""))
