"""The zygote: a process with torch, numpy, safetensors and the model code already imported,
which forks one expert worker per request, so that a cold start costs what a real platform's
does (process, limits, weight load) and not an interpreter's import of torch.

    daemon ──stdin──►  ZygoteSpawn(instance_id, worker spec)
           ◄─stdout──  ZygoteReady(pid, import_s)            once, when warm
                       ZygoteForked(instance_id, pid | 0 + error)
                       ZygoteExited(pid, exit_code | signal)  for every reaped worker

(messages framed as in `nodes.procs`). Started by its daemon as

    python -m nodes.zygote --parent-pid PID

Fork safety (DESIGN "Transport rules"): OpenMP is not fork-safe, and a zygote that has run a
torch op with 2 threads gives children that hang on their first matmul. So the zygote warms
torch with ONE thread and one small matmul, holds no ZeroMQ context (a context owns I/O
threads), and each child sets its own thread count after the fork (in `run_worker`).

The child closes the zygote's pipes and signal plumbing, sends its stdout and stderr to
`<run_dir>/<instance_id>.log`, runs `run_worker` and leaves with `os._exit` (no atexit
handlers, no flushing of buffers inherited from the zygote).

Lifetime: the zygote dies with its daemon (PR_SET_PDEATHSIG), and its workers die with it.
At the end of its stdin (the daemon closed the pipe or is gone) it kills its workers, reaps
them and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import time

_t_import = time.perf_counter()

import numpy  # noqa: E402, F401 - imported here so that forked workers need not
import safetensors.torch  # noqa: E402, F401
import torch  # noqa: E402

import nodes.model  # noqa: E402, F401
from mesh.errors import ProtocolError  # noqa: E402
from mesh.protocol import ZygoteExited, ZygoteForked, ZygoteReady, ZygoteSpawn  # noqa: E402
from nodes.procs import die_with_parent, read_message, write_message  # noqa: E402
from nodes.worker import WorkerSpec, run_worker, setup_logging  # noqa: E402

log = logging.getLogger("nodes.zygote")


def warm() -> None:
    """Run torch once with one thread, so the first fork does not pay for lazy set-up: a matmul,
    and an expert built the way Checkpoint.load_experts builds one (on the meta device, then
    allocated in place), whose first use costs ~0.5 s that every forked worker would pay again."""
    from nodes.model.layers import MLP

    torch.set_num_threads(1)
    a = torch.randn(64, 64)
    (a @ a).sum().item()
    with torch.device("meta"):
        mlp = MLP(8, 8)
    mlp.to(torch.bfloat16).to_empty(device="cpu")


class Zygote:
    def __init__(self, stdin, stdout) -> None:
        self.stdin = stdin  # binary, blocking
        self.stdout = stdout
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes select via wake_w

    def run(self, import_s: float) -> int:
        write_message(self.stdout, ZygoteReady(os.getpid(), import_s))
        log.info("zygote %d warm after %.2fs", os.getpid(), import_s)
        while True:
            try:
                readable, _, _ = select.select([self.stdin, self.wake_r], [], [])
            except InterruptedError:
                continue
            if self.wake_r in readable:
                os.read(self.wake_r, 4096)
                self.reap()
            if self.stdin in readable:
                try:
                    msg = read_message(self.stdin)
                except ProtocolError as exc:
                    log.error("unreadable message from the daemon (%s); exiting", exc)
                    msg = None
                if msg is None:
                    self.stop_children()
                    return 0
                if isinstance(msg, ZygoteSpawn):
                    self.fork(msg)
                else:
                    log.warning("ignored %s from the daemon", type(msg).__name__)

    def fork(self, msg: ZygoteSpawn) -> None:
        try:
            spec = WorkerSpec.from_dict({**msg.worker, "parent_pid": os.getpid()})
        except (KeyError, TypeError, ValueError) as exc:
            write_message(self.stdout, ZygoteForked(msg.instance_id, 0, f"bad worker spec: {exc}"))
            return
        try:
            pid = os.fork()
        except OSError as exc:
            write_message(self.stdout, ZygoteForked(
                msg.instance_id, 0, f"fork failed: {exc}; the host is out of memory or processes"
            ))
            return
        if pid == 0:
            self.child(spec)  # never returns
        self.children.add(pid)
        write_message(self.stdout, ZygoteForked(msg.instance_id, pid))

    def child(self, spec: WorkerSpec) -> None:
        code = 2
        try:
            die_with_parent(spec.parent_pid)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            log_fd = os.open(os.path.join(spec.run_dir, f"{spec.instance_id}.log"),
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null_fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null_fd, 0)  # the daemon's pipes are the zygote's, not the worker's
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            os.close(null_fd)
            setup_logging(f"worker {spec.instance_id}")
            code = run_worker(spec)
        except BaseException:  # noqa: BLE001 - whatever happens, never return into the zygote
            logging.getLogger("nodes.worker").exception("worker %s crashed", spec.instance_id)
        finally:
            logging.shutdown()
            os._exit(code)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            if os.WIFSIGNALED(status):
                exited = ZygoteExited(pid, None, os.WTERMSIG(status))
            else:
                exited = ZygoteExited(pid, os.waitstatus_to_exitcode(status), None)
            write_message(self.stdout, exited)

    def stop_children(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.children.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.zygote", description=__doc__.split("\n")[0])
    parser.add_argument("--parent-pid", type=int, default=None, help="die with this parent (the daemon)")
    args = parser.parse_args(argv)
    setup_logging("zygote")
    die_with_parent(args.parent_pid)
    warm()
    import_s = time.perf_counter() - _t_import
    # Unbuffered stdin: select() must see every byte that has not been read yet.
    stdin, stdout = os.fdopen(sys.stdin.fileno(), "rb", buffering=0), sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the pipe to the daemon
    return Zygote(stdin, stdout).run(import_s)


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    os._exit(code)  # no interpreter teardown of torch: the daemon is waiting for this exit
