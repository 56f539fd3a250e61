"""Per-instance resource limits with cgroups: a function of M GB gets a memory limit of M GB and
a CPU share of `cpu_share` vCPUs (a CFS quota of `cfs_period_us x cpu_share` per period).

    cgroups = Cgroups(node="n0", mode="auto", cfs_period_us=10_000)
    applied = cgroups.apply("fn3-0", memory_gb=1.0, cpu_share=1.0)   # daemon, before the spawn
    join(applied.procs_files)                                        # the worker, on itself
    applied.values        # read back from the files: {"version": 1, "memory_limit_bytes": ...}
    applied.skipped       # "" if applied, else why not (names the `[functions] cgroups` knob)
    cgroups.remove(applied)                                          # daemon, after the exit

Where the groups go: under the daemon's *own* cgroup in each hierarchy (read from
/proc/self/cgroup), as `<own>/moemesh/<node>/<instance_id>`, so a daemon never escapes the
cgroup it was started in (a container's or a login session's limits still hold).

    cgroup v1 (this machine)     <root>/memory/<own>/moemesh/<node>/<id>/memory.limit_in_bytes
                                 <root>/cpu/<own>/moemesh/<node>/<id>/cpu.cfs_{period,quota}_us
    cgroup v2 (unified at root)  <root>/<own>/moemesh/<node>/<id>/{memory.max,cpu.max}
                                 (+memory +cpu enabled in each parent's cgroup.subtree_control)

Modes (`[functions] cgroups`): "auto" applies what the host allows and reports the rest as
skipped; "off" applies nothing; "require" raises `CgroupUnavailable` instead of skipping.

What the memory limit counts: pages the worker allocates after it joins its group (cgroup v1
and v2 charge a page to the group of the process that first touched it, and do not move old
charges when a process changes groups). A worker forked from the zygote shares torch's pages
with the zygote (charged to the zygote's group); a fresh worker imports torch before it joins.
Either way the group holds what the function itself needs: its experts' weights, the
activations of a call, and a few MB of per-process state. Measured on this machine (tiny model,
16 experts of 32x48):

                     RSS      USS (private)   PSS      charged to its group after a call
    zygote           231 MB   149 MB
    forked worker    173 MB     7 MB           80 MB    4 MB
    fresh worker     234 MB   148 MB          152 MB    0.5 MB
    bundled model, all 48 experts (14 MB of float32 weights), after a 64-token call:
    forked worker    188 MB    22 MB           97 MB   19 MB
    fresh worker     249 MB   163 MB          178 MB   15 MB

So a sane minimum is its experts' weight bytes + its largest call's activations (about
rows x (2 hidden + 3 intermediate) x 4 bytes) + ~16 MB; the allocator's min_memory_gb (0.125)
is ample for small experts. Below it the kernel's OOM killer ends the worker (SIGKILL: the
daemon reports InstanceStopped "died" and logs the OOM kill, or SpawnFailed while loading).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

CgroupMode = Literal["auto", "off", "require"]
MODES: tuple[str, ...] = ("auto", "off", "require")
KNOB = "[functions] cgroups"
GIB = 1024**3
MIN_CFS_QUOTA_US = 1000  # the kernel refuses quotas under 1 ms


class CgroupUnavailable(RuntimeError):
    """Mode "require" and the limits cannot be applied; the message says why and what to do."""


@dataclass(frozen=True)
class Applied:
    """The cgroups of one instance.

    dirs:        the group directories created (removed by `Cgroups.remove`)
    procs_files: the `cgroup.procs` files a process writes its pid to, to join
    values:      the limits read back from the files (None when nothing was applied)
    skipped:     why (some) limits were not applied; "" when all were
    """

    instance_id: str
    dirs: tuple[Path, ...] = ()
    procs_files: tuple[str, ...] = ()
    values: dict | None = None
    skipped: str = ""


def own_cgroups(proc_cgroup: str | Path = "/proc/self/cgroup") -> dict[str, str]:
    """{controller: path} of this process; the v2 unified group is under the key "" ."""
    paths: dict[str, str] = {}
    try:
        text = Path(proc_cgroup).read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        for name in controllers.split(","):
            if name:
                paths[name] = path
    return paths


def cfs_quota_us(cfs_period_us: int, cpu_share: float) -> int:
    """The CFS quota for `cpu_share` vCPUs per `cfs_period_us` period, at least 1 ms."""
    return max(MIN_CFS_QUOTA_US, round(cfs_period_us * cpu_share))


def join(procs_files: Iterable[str], pid: int = 0) -> None:
    """Move process `pid` (0: the caller) into each group. Raises OSError naming the file."""
    for procs in procs_files:
        try:
            with open(procs, "w") as f:
                f.write(f"{pid or os.getpid()}\n")
        except OSError as exc:
            raise OSError(exc.errno, f"cannot join cgroup {procs}: {exc.strerror}") from None


class Cgroups:
    """Creates, reads back and removes the cgroups of one node's instances."""

    def __init__(
        self,
        node: str,
        mode: str = "auto",
        cfs_period_us: int = 10_000,
        root: str | Path = "/sys/fs/cgroup",
        proc_cgroup: str | Path = "/proc/self/cgroup",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"{KNOB} = {mode!r}: expected one of {', '.join(MODES)}")
        if not 1000 <= cfs_period_us <= 1_000_000:
            raise ValueError(
                f"[functions] cfs_period_us = {cfs_period_us}: the kernel accepts 1000..1000000"
            )
        self.node = node
        self.mode = mode
        self.cfs_period_us = cfs_period_us
        self.root = Path(root)
        self.own = own_cgroups(proc_cgroup)
        self.version, self.unavailable = self._detect()

    # -- what the host allows ---------------------------------------------------------------

    def _detect(self) -> tuple[int | None, str]:
        """(cgroup version, "" or why no limits can be applied)."""
        if self.mode == "off":
            return None, f"{KNOB} = \"off\""
        if (self.root / "cgroup.controllers").exists():
            return 2, self._why_not_writable([self._v2_parent()])
        if (self.root / "memory" / "cgroup.procs").exists() or (
            self.root / "cpu" / "cgroup.procs"
        ).exists():
            return 1, ""  # per controller: see _v1_controllers
        return None, (
            f"no cgroup v1 memory/cpu or v2 hierarchy under {self.root}; set {KNOB} = \"off\" "
            "to silence this, or run the node where cgroups are mounted"
        )

    def _why_not_writable(self, dirs: list[Path]) -> str:
        for d in dirs:
            probe = d
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            if not os.access(probe, os.W_OK):
                return (
                    f"{probe} is not writable (uid {os.geteuid()}); run the node daemon as root "
                    f"or with a delegated cgroup, or set {KNOB} = \"off\""
                )
        return ""

    def _v1_base(self, controller: str) -> Path:
        own = self.own.get(controller, "/").lstrip("/")
        return self.root / controller / own / "moemesh" / self.node

    def _v2_parent(self) -> Path:
        return self.root / self.own.get("", "/").lstrip("/") / "moemesh" / self.node

    def _v1_controllers(self) -> tuple[list[str], list[str]]:
        """(usable controllers, reasons for the others)."""
        usable, reasons = [], []
        for controller in ("memory", "cpu"):
            if not (self.root / controller / "cgroup.procs").exists():
                reasons.append(f"cgroup v1 controller {controller!r} is not mounted at {self.root / controller}")
                continue
            why = self._why_not_writable([self._v1_base(controller)])
            if why:
                reasons.append(f"{controller}: {why}")
            else:
                usable.append(controller)
        return usable, reasons

    def probe(self) -> str:
        """"" if limits can be applied, else why not (for the daemon's start-up log)."""
        if self.unavailable or self.version != 1:
            return self.unavailable
        return "; ".join(self._v1_controllers()[1])

    # -- per instance -------------------------------------------------------------------------

    def apply(self, instance_id: str, memory_gb: float, cpu_share: float) -> Applied:
        """Create the instance's groups, write its limits and read them back.

        Raises CgroupUnavailable in mode "require" when any limit cannot be applied; otherwise
        returns an `Applied` whose `skipped` says what was left out and why.
        """
        if not instance_id or "/" in instance_id or instance_id in (".", ".."):
            raise ValueError(f"instance id {instance_id!r} cannot name a cgroup directory")
        memory_bytes = int(memory_gb * GIB)
        quota_us = cfs_quota_us(self.cfs_period_us, cpu_share)
        if self.unavailable:
            applied = Applied(instance_id, skipped=self.unavailable)
        elif self.version == 2:
            applied = self._apply_v2(instance_id, memory_bytes, quota_us)
        else:
            applied = self._apply_v1(instance_id, memory_bytes, quota_us)
        if applied.skipped:
            if self.mode == "require":
                self.remove(applied)
                raise CgroupUnavailable(
                    f"{KNOB} = \"require\" but limits cannot be applied to {instance_id}: "
                    f"{applied.skipped}"
                )
            if self.mode != "off":
                log.warning("instance %s runs without (some) cgroup limits: %s", instance_id, applied.skipped)
        return applied

    def _apply_v1(self, instance_id: str, memory_bytes: int, quota_us: int) -> Applied:
        usable, reasons = self._v1_controllers()
        dirs: list[Path] = []
        values: dict = {"version": 1}
        for controller in usable:
            group = self._v1_base(controller) / instance_id
            try:
                group.mkdir(parents=True, exist_ok=True)
                dirs.append(group)
                if controller == "memory":
                    _write(group / "memory.limit_in_bytes", memory_bytes)
                    values["memory_limit_bytes"] = _read_int(group / "memory.limit_in_bytes")
                    values["memory_path"] = str(group)
                else:
                    # Lower the quota before the period: the kernel checks quota against the
                    # current period on every write, so the order matters when both change.
                    _write(group / "cpu.cfs_quota_us", -1)
                    _write(group / "cpu.cfs_period_us", self.cfs_period_us)
                    _write(group / "cpu.cfs_quota_us", quota_us)
                    values["cpu_period_us"] = _read_int(group / "cpu.cfs_period_us")
                    values["cpu_quota_us"] = _read_int(group / "cpu.cfs_quota_us")
                    values["cpu_path"] = str(group)
            except OSError as exc:
                reasons.append(
                    f"{controller}: cannot set up {group} ({exc.strerror or exc}); set {KNOB} = \"off\" "
                    "or run the node daemon as root"
                )
        if "cpu_quota_us" in values:
            values["cpu_share"] = values["cpu_quota_us"] / values["cpu_period_us"]
        applied_any = len(values) > 1
        return Applied(
            instance_id,
            dirs=tuple(dirs),
            procs_files=tuple(str(d / "cgroup.procs") for d in dirs),
            values=values if applied_any else None,
            skipped="; ".join(reasons),
        )

    def _apply_v2(self, instance_id: str, memory_bytes: int, quota_us: int) -> Applied:
        parent = self._v2_parent()
        group = parent / instance_id
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # Enable memory and cpu for the groups below ours, top-down from our own group.
            own = self.root / self.own.get("", "/").lstrip("/")
            for d in (own, own / "moemesh", parent):
                enabled = (d / "cgroup.subtree_control").read_text().split()
                missing = [f"+{c}" for c in ("memory", "cpu") if c not in enabled]
                if missing:
                    _write(d / "cgroup.subtree_control", " ".join(missing))
            group.mkdir(exist_ok=True)
            _write(group / "memory.max", memory_bytes)
            _write(group / "cpu.max", f"{quota_us} {self.cfs_period_us}")
            quota, period = (group / "cpu.max").read_text().split()
            values = {
                "version": 2,
                "memory_limit_bytes": _read_int(group / "memory.max"),
                "memory_path": str(group),
                "cpu_period_us": int(period),
                "cpu_quota_us": -1 if quota == "max" else int(quota),
                "cpu_path": str(group),
            }
            values["cpu_share"] = values["cpu_quota_us"] / values["cpu_period_us"]
        except OSError as exc:
            applied = Applied(instance_id, dirs=(group,) if group.exists() else ())
            self.remove(applied)
            hint = (
                " (cgroup v2 lets only leaf groups hold processes: start the daemon in a group "
                "of its own, e.g. with systemd-run --scope -p Delegate=yes)"
                if exc.errno == errno.EBUSY
                else ""
            )
            return Applied(
                instance_id,
                skipped=f"cannot set up {group}: {exc.strerror or exc}{hint}; or set {KNOB} = \"off\"",
            )
        return Applied(instance_id, (group,), (str(group / "cgroup.procs"),), values, "")

    def oom_kills(self, applied: Applied) -> int:
        """How many processes the kernel's OOM killer ended in the instance's memory group."""
        if not applied.values or "memory_path" not in applied.values:
            return 0
        group = Path(applied.values["memory_path"])
        events = group / ("memory.events" if self.version == 2 else "memory.oom_control")
        try:
            for line in events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self, applied: Applied) -> None:
        """Remove the instance's groups (after its process has exited); logs what stays."""
        for group in applied.dirs:
            try:
                group.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cgroup %s of %s not removed: %s", group, applied.instance_id, exc.strerror)

    def sweep(self) -> list[Path]:
        """Remove this node's empty groups left by an earlier daemon that was killed; returns them.
        (A group that still holds a process cannot be removed and stays.)"""
        if self.unavailable:
            return []
        parents = [self._v2_parent()] if self.version == 2 else [
            self._v1_base(c) for c in ("memory", "cpu")
        ]
        removed = []
        for parent in parents:
            for group in parent.glob("*/"):
                try:
                    group.rmdir()
                    removed.append(group)
                except OSError:
                    pass
        return removed

    def close(self) -> None:
        """Remove this node's (now empty) parent groups."""
        parents = [self._v2_parent()] if self.version == 2 else [
            self._v1_base(c) for c in ("memory", "cpu")
        ]
        for parent in parents:
            for d in (parent, parent.parent):  # moemesh/<node>, then moemesh if empty
                try:
                    d.rmdir()
                except OSError:
                    break


def _write(path: Path, value: int | str) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def _read_int(path: Path) -> int:
    text = path.read_text().strip()
    return -1 if text == "max" else int(text)
