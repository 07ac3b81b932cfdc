"""How many CPUs this process may use: what ``server.workers = "auto"`` resolves to.

Owns: combining the CPU affinity mask (``sched_getaffinity``: the CPUs the scheduler may run this process on) with
the CPU bandwidth limit of its cgroup (cgroup v2 ``cpu.max``; cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
where no v2 limit is found), taking the smallest limit on the way from the process's cgroup up to the root of the
mounted hierarchy (a limit on a parent cgroup binds the children too).  The result is rounded down (1.5 CPUs of
quota keep only one worker busy without throttling) and is at least 1.

The parsing functions take file contents, and ``cgroup_cpu_limit`` takes the text of ``/proc/self/cgroup`` and
``/proc/self/mountinfo`` plus a root under which the mount points are looked up, so the tests run them on real
files laid out like a cgroup filesystem.

Limits it cannot see: a quota set on a cgroup above the one mounted in a container (a cgroup namespace hides it;
on AWS Fargate the task's quota sits on the task's cgroup, so a container there sees the whole microVM's CPUs).
The CloudFormation template therefore derives its worker count from the task size instead.

Must not: be called per connection or per request (it reads /proc and /sys: once, when the config is loaded).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
PROC_MOUNTINFO = Path("/proc/self/mountinfo")


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` ("$MAX $PERIOD", "max" for none) as CPUs, or None when unlimited or unreadable."""
    parts = text.split()
    if len(parts) not in (1, 2) or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) == 2 else 100_000  # the kernel's default period
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (-1 for none) over ``cpu.cfs_period_us`` as CPUs, or None."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...), see proc(5).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts(mountinfo: str) -> Iterator[tuple[str, str, str, set[str]]]:
    """(root, mount point, filesystem type, super options) of each line of /proc/self/mountinfo."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        yield _unescape(fields[3]), _unescape(fields[4]), tail[0], set(tail[2].split(","))


def _dirs(cgroup_path: str, mount_root: str, mount_point: str, base: Path) -> list[Path]:
    """The directories of the process's cgroup and its ancestors inside the mount, innermost first."""
    top = base / mount_point.lstrip("/")
    root = mount_root.rstrip("/")
    if cgroup_path == root or cgroup_path.startswith(root + "/"):
        relative = cgroup_path[len(root):].strip("/")
    else:  # the process's cgroup is outside what is mounted (another namespace): only the mount's own limit
        relative = ""
    parts = [p for p in relative.split("/") if p and p not in (".", "..")]
    return [top.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_limit(proc_cgroup: str, mountinfo: str, base: Path = Path("/")) -> float | None:
    """The CPU bandwidth limit of the process's cgroup (the smallest on its path to the mount root), or None."""
    entries = [line.split(":", 2) for line in proc_cgroup.splitlines() if line.count(":") >= 2]
    mounts = list(_mounts(mountinfo))
    limits: list[float] = []
    for hierarchy, controllers, path in entries:  # cgroup v2: the unified hierarchy, "0::/path"
        if hierarchy == "0" and controllers == "":
            for root, point, fstype, _opts in mounts:
                if fstype == "cgroup2":
                    for d in _dirs(path, root, point, base):
                        text = _read(d / "cpu.max")
                        limit = parse_cpu_max(text) if text is not None else None
                        if limit is not None:
                            limits.append(limit)
    if limits:
        return min(limits)
    for _hierarchy, controllers, path in entries:  # cgroup v1: the hierarchy the cpu controller is attached to
        if "cpu" in controllers.split(","):
            for root, point, fstype, opts in mounts:
                if fstype == "cgroup" and "cpu" in opts:
                    for d in _dirs(path, root, point, base):
                        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                        limit = parse_cfs(quota, period) if quota is not None and period is not None else None
                        if limit is not None:
                            limits.append(limit)
    return min(limits) if limits else None


def affinity() -> int:
    """CPUs in this process's affinity mask."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def combine(cpus: int, limit: float | None) -> int:
    """The usable whole CPUs: the affinity, capped by the quota rounded down; never less than 1."""
    if limit is not None:
        cpus = min(cpus, math.floor(limit))  # a whole quota divides exactly (200000 / 100000 == 2.0)
    return max(1, cpus)


def available() -> int:
    """The CPUs this process may use (``workers = "auto"``)."""
    text, mountinfo = _read(PROC_CGROUP), _read(PROC_MOUNTINFO)
    limit = cgroup_cpu_limit(text, mountinfo) if text is not None and mountinfo is not None else None
    return combine(affinity(), limit)
