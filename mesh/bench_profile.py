"""py-spy on a running mesh process: `moemesh bench --profile` samples the coordinator while it
decodes, and the README's explanations of where the time goes quote what this writes.

    with Spy(pid, out / "profile-coordinator.txt") as spy: ...   # py-spy record --format raw
    spy.summary(out / "profile-coordinator.md")                 # top functions, inclusive and own

py-spy is a development tool, not a dependency of the mesh: `pip install py-spy` (the
`profile` extra). It needs ptrace rights on the process (root, or kernel.yama.ptrace_scope 0).
Samples are taken with --idle, so the shares are of wall time: a thread waiting in a poll shows
as waiting there, which is the point when the question is what a round waits for.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from mesh.errors import MeshError


class Spy:
    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        beside = Path(sys.executable).parent / "py-spy"  # installed into this venv
        exe = str(beside) if beside.exists() else shutil.which("py-spy")
        if exe is None:
            raise MeshError("py-spy is not installed", code="config_error",
                            hint="pip install py-spy (or pip install -e '.[profile]'), or run without --profile")
        self.out = out
        self.argv = [exe, "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out),
                     "--threads", "--idle", "--nonblocking"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Spy:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=60)

    def summary(self, table: Path, thread: str = "moemesh-engine", top: int = 30) -> dict:
        """Top functions of one thread's samples, by inclusive and by own share; writes `table`."""
        inclusive, own, total = top_functions(self.out, thread)
        rows = ["| inclusive | own | function |", "|---:|---:|---|"]
        for name, n in inclusive.most_common(top):
            rows.append(f"| {n / total:.1%} | {own.get(name, 0) / total:.1%} | `{name}` |")
        table.write_text(f"py-spy samples of thread {thread!r}: {total} (wall time, --idle)\n\n" + "\n".join(rows) + "\n")
        return {"file": str(self.out), "table": str(table), "samples": total,
                "top": [{"function": k, "inclusive": v / total, "own": own.get(k, 0) / total}
                        for k, v in inclusive.most_common(top)] if total else []}


def top_functions(path: Path, thread: str = "") -> tuple[collections.Counter, collections.Counter, int]:
    """(inclusive samples, own samples, total) per `function (file:line)` of py-spy raw output."""
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or (thread and thread not in stack.split(";", 1)[0]):
            continue
        n = int(count)
        total += n
        frames = stack.split(";")[1:]  # the first is the thread
        for name in {f for f in frames}:
            inclusive[name] += n
        if frames:
            own[frames[-1]] += n
    return inclusive, own, total
