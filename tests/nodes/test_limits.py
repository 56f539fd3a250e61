"""cgroup limits: real groups where this machine lets us write them (cgroup v1 memory + cpu as
root here), skipped with the reason elsewhere; modes "off" and "require"; cleanup."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nodes.limits import GIB, KNOB, Cgroups, CgroupUnavailable, cfs_quota_us, join, own_cgroups


@pytest.fixture
def node_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def real(node_name: str):
    cgroups = Cgroups(node_name, "auto", cfs_period_us=10_000)
    why_not = cgroups.probe()
    if why_not:
        pytest.skip(f"cgroups not writable here: {why_not}")
    yield cgroups
    cgroups.close()


@pytest.fixture
def sleeper():
    """A process that blocks on its stdin until the test closes it."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=10)


def test_limits_read_back(real: Cgroups):
    applied = real.apply("inst-a", memory_gb=0.5, cpu_share=0.25)
    try:
        assert applied.skipped == ""
        values = applied.values
        assert values["memory_limit_bytes"] == GIB // 2
        assert values["cpu_period_us"] == 10_000
        assert values["cpu_quota_us"] == 2_500
        assert values["cpu_share"] == pytest.approx(0.25)
        if values["version"] == 1:  # the files themselves say so
            memory, cpu = Path(values["memory_path"]), Path(values["cpu_path"])
            assert int((memory / "memory.limit_in_bytes").read_text()) == GIB // 2
            assert int((cpu / "cpu.cfs_quota_us").read_text()) == 2_500
            assert int((cpu / "cpu.cfs_period_us").read_text()) == 10_000
            assert memory.parts[-3:] == ("moemesh", real.node, "inst-a")
    finally:
        real.remove(applied)
    assert all(not d.exists() for d in applied.dirs)


def test_join_moves_the_process_and_cleanup_removes_the_groups(real: Cgroups, sleeper):
    applied = real.apply("inst-b", memory_gb=1.0, cpu_share=1.0)
    join(applied.procs_files, sleeper.pid)
    for procs in applied.procs_files:
        assert str(sleeper.pid) in Path(procs).read_text().split()
    mine = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
    assert f"/moemesh/{real.node}/inst-b" in mine
    sleeper.stdin.close()
    sleeper.wait(timeout=10)
    real.remove(applied)
    assert applied.dirs and all(not d.exists() for d in applied.dirs)


def test_require_mode_applies_where_writable(node_name: str):
    cgroups = Cgroups(node_name, "require")
    if cgroups.probe():
        with pytest.raises(CgroupUnavailable, match=r"\[functions\] cgroups"):
            cgroups.apply("inst-c", 1.0, 1.0)
        return
    applied = cgroups.apply("inst-c", 1.0, 1.0)
    assert applied.skipped == "" and applied.values is not None
    cgroups.remove(applied)
    cgroups.close()


def test_off_mode_skips_with_a_reason(node_name: str):
    applied = Cgroups(node_name, "off").apply("inst-d", 1.0, 1.0)
    assert applied.values is None and applied.dirs == () and applied.procs_files == ()
    assert KNOB in applied.skipped and '"off"' in applied.skipped


def test_no_hierarchy_skips_or_fails_by_mode(tmp_path: Path, node_name: str):
    auto = Cgroups(node_name, "auto", root=tmp_path).apply("inst-e", 1.0, 1.0)
    assert auto.values is None and KNOB in auto.skipped and str(tmp_path) in auto.skipped
    with pytest.raises(CgroupUnavailable, match="require"):
        Cgroups(node_name, "require", root=tmp_path).apply("inst-e", 1.0, 1.0)


def test_bad_settings_name_the_knob():
    with pytest.raises(ValueError, match=r"\[functions\] cgroups"):
        Cgroups("n", "sometimes")
    with pytest.raises(ValueError, match="cfs_period_us"):
        Cgroups("n", "off", cfs_period_us=10)
    with pytest.raises(ValueError, match="cannot name a cgroup"):
        Cgroups("n", "off").apply("../escape", 1.0, 1.0)


def test_quota_and_own_groups(tmp_path: Path):
    assert cfs_quota_us(10_000, 1.5) == 15_000
    assert cfs_quota_us(10_000, 0.01) == 1_000  # the kernel's minimum
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/box/a\n2:cpu,cpuacct:/\n0::/user.slice\n")
    assert own_cgroups(proc) == {"memory": "/box/a", "cpu": "/", "cpuacct": "/", "": "/user.slice"}
