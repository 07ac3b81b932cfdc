"""cpus: ``workers = "auto"`` from the affinity mask and the cgroup CPU quota.

The cgroup tests lay out real files as the kernel does (a cgroup2 mount with ``cpu.max`` files, cgroup v1 ``cpu``
hierarchies with ``cpu.cfs_quota_us``) under a temporary root, with ``/proc/self/cgroup`` and ``mountinfo`` texts
in the kernel's format pointing into it.  The affinity test narrows the real affinity of a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import cpus

ROOT = Path(__file__).resolve().parent.parent

V2_MOUNTINFO = "31 23 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
HYBRID_MOUNTINFO = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")


def tree(base: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return base


@pytest.mark.parametrize(("text", "limit"), [
    ("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000\n", 1.5), ("50000 100000\n", 0.5),
    ("400000\n", 4.0), ("0 100000\n", None), ("garbage\n", None), ("", None), ("100000 0\n", None),
])
def test_cpu_max(text: str, limit: float | None) -> None:
    assert cpus.parse_cpu_max(text) == limit


@pytest.mark.parametrize(("quota", "period", "limit"), [
    ("-1\n", "100000\n", None), ("300000\n", "100000\n", 3.0), ("25000\n", "100000\n", 0.25), ("x", "1", None),
])
def test_cfs_quota(quota: str, period: str, limit: float | None) -> None:
    assert cpus.parse_cfs(quota, period) == limit


def test_v2_quota_of_the_process_cgroup(tmp_path: Path) -> None:
    base = tree(tmp_path, {"sys/fs/cgroup/cpu.max": "max 100000\n",
                           "sys/fs/cgroup/ecs/task/cpu.max": "max 100000\n",
                           "sys/fs/cgroup/ecs/task/proxy/cpu.max": "200000 100000\n"})
    assert cpus.cgroup_cpu_limit("0::/ecs/task/proxy\n", V2_MOUNTINFO, base) == 2.0


def test_v2_a_parent_quota_binds_the_child(tmp_path: Path) -> None:
    base = tree(tmp_path, {"sys/fs/cgroup/ecs/task/cpu.max": "150000 100000\n",
                           "sys/fs/cgroup/ecs/task/proxy/cpu.max": "max 100000\n"})
    limit = cpus.cgroup_cpu_limit("0::/ecs/task/proxy\n", V2_MOUNTINFO, base)
    assert limit == 1.5 and cpus.combine(8, limit) == 1  # rounded down


def test_v2_in_a_cgroup_namespace(tmp_path: Path) -> None:
    # Inside a container with its own cgroup namespace the process sits at "/" of a mount of its own cgroup.
    base = tree(tmp_path, {"sys/fs/cgroup/cpu.max": "300000 100000\n"})
    assert cpus.cgroup_cpu_limit("0::/\n", V2_MOUNTINFO, base) == 3.0


def test_v1_cfs_quota_when_v2_has_none(tmp_path: Path) -> None:
    base = tree(tmp_path, {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
                           "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
                           "sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_quota_us": "-1\n",
                           "sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_period_us": "100000\n"})
    proc = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n"
    limit = cpus.cgroup_cpu_limit(proc, HYBRID_MOUNTINFO, base)
    assert limit == 2.5 and cpus.combine(4, limit) == 2


def test_v1_mount_rooted_at_the_container_cgroup(tmp_path: Path) -> None:
    # Docker on cgroup v1 mounts the container's own cgroup (mountinfo root /docker/abc) at the usual place.
    mountinfo = "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    base = tree(tmp_path, {"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "100000\n",
                           "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    assert cpus.cgroup_cpu_limit("3:cpu:/docker/abc\n", mountinfo, base) == 1.0


def test_no_limit_anywhere(tmp_path: Path) -> None:
    base = tree(tmp_path, {"sys/fs/cgroup/unified/user.slice/cgroup.procs": "",
                           "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                           "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    proc = "4:cpu,cpuacct:/\n0::/user.slice\n"
    assert cpus.cgroup_cpu_limit(proc, HYBRID_MOUNTINFO, base) is None
    assert cpus.cgroup_cpu_limit("", "", base) is None  # no cgroup information at all


def test_an_escaped_mount_point(tmp_path: Path) -> None:
    mountinfo = r"31 23 0:28 / /srv/cg\040root rw - cgroup2 cgroup2 rw" + "\n"
    base = tree(tmp_path, {"srv/cg root/cpu.max": "100000 100000\n"})
    assert cpus.cgroup_cpu_limit("0::/\n", mountinfo, base) == 1.0


@pytest.mark.parametrize(("affinity", "limit", "usable"), [
    (2, None, 2), (8, 2.0, 2), (8, 2.9999999999, 2), (2, 4.0, 2), (4, 0.25, 1), (1, None, 1),
])
def test_combine(affinity: int, limit: float | None, usable: int) -> None:
    assert cpus.combine(affinity, limit) == usable


def test_the_real_affinity_of_a_narrowed_process() -> None:
    # A child pinned to one CPU (as taskset or a container's cpuset would) sees one, and auto gives one worker.
    first = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{first}}}); from proxy import cpus; "
            "print(cpus.affinity(), cpus.available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_this_machine() -> None:
    assert cpus.affinity() == len(os.sched_getaffinity(0))
    limit = cpus.cgroup_cpu_limit(cpus.PROC_CGROUP.read_text(), cpus.PROC_MOUNTINFO.read_text())
    assert cpus.available() == cpus.combine(len(os.sched_getaffinity(0)), limit) >= 1
