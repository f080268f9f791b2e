"""How much memory a job may use: its budget, measured when the job plans (standard library only at import time).

- CUDA: the free memory of the selected GPU (``torch.cuda.mem_get_info``, other processes and Slicer's renderer
  included) plus what this process's caching allocator holds but does not use.
- CPU: the available RAM (psutil when installed, else ``MemAvailable`` of /proc/meminfo), capped by the memory limit
  of the process's control group and of every group above it: inside a container or a SLURM job that limit, not the
  host's free memory, is what the kernel enforces by killing the process. cgroup v2: ``memory.max`` −
  ``memory.current``; v1: ``memory.limit_in_bytes`` − ``memory.usage_in_bytes``; from both usages the inactive file
  cache (``memory.stat``) is taken off, since the kernel reclaims it before it kills anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GB = 1e9
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2**63
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class Budget:
    """Bytes a job may allocate on a device, and where the number comes from (for the plan's message)."""

    bytes: int
    source: str  # e.g. "free on cuda:0", "RAM available", "cgroup /job limit 6.0 GB"

    def describe(self) -> str:
        return f"{self.bytes / GB:.1f} GB ({self.source})"


def budget(device, *, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Budget:
    """The memory a job on ``device`` (a torch.device) may use now (module docstring)."""
    if device.type == "cuda":
        return cuda_budget(device)
    return host_budget(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)


def cuda_budget(device) -> Budget:
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return Budget(int(free + cached), f"free on {device}")


def host_budget(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP,
                meminfo: Path = PROC_MEMINFO) -> Budget:
    """Available RAM, or the room left under the cgroup memory limit when that is smaller."""
    ram = Budget(available_ram(meminfo), "RAM available")
    group = cgroup_room(cgroup_root, proc_cgroup)
    return group if group is not None and group.bytes < ram.bytes else ram


def available_ram(meminfo: Path = PROC_MEMINFO) -> int:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None and meminfo == PROC_MEMINFO:
        return int(psutil.virtual_memory().available)
    for line in meminfo.read_text(encoding="utf-8").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"{meminfo}: no MemAvailable line")


def cgroup_room(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Budget | None:
    """The smallest room (limit − usage) of this process's memory cgroup and its ancestors, or None without a limit.

    ``root`` is where the cgroup file systems are mounted: v2 at ``root`` itself (or ``root/unified`` on a hybrid
    system), v1's memory controller at ``root/memory``."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            rooms += [_v2_room(mount, path) for mount in (root, root / "unified")]
        elif "memory" in controllers.split(","):
            rooms.append(_v1_room(root / "memory", path))
    rooms = [r for r in rooms if r is not None]
    return min(rooms, key=lambda r: r.bytes) if rooms else None


def _v2_room(mount: Path, path: str) -> Budget | None:
    return _smallest_room(_groups(mount, path), "memory.max", "memory.current", "inactive_file")


def _v1_room(mount: Path, path: str) -> Budget | None:
    return _smallest_room(_groups(mount, path), "memory.limit_in_bytes", "memory.usage_in_bytes",
                          "total_inactive_file")


def _groups(mount: Path, path: str) -> list[Path]:
    """The group folder of ``path`` under ``mount`` and every folder above it up to the mount. In a container whose
    cgroup namespace is not its own, the path names a host group that is not mounted: then the mount's root is the
    container's group."""
    group = mount / path.strip("/")
    if not group.is_dir():
        return [mount] if mount.is_dir() else []
    return [group, *(p for p in group.parents if p.is_relative_to(mount))]


def _smallest_room(groups: list[Path], limit_file: str, usage_file: str, reclaimable: str) -> Budget | None:
    rooms = []
    for group in groups:
        try:
            limit = (group / limit_file).read_text(encoding="utf-8").strip()
            usage = int((group / usage_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= UNLIMITED:
            continue
        usage -= _stat(group / "memory.stat", reclaimable)
        rooms.append(Budget(max(0, int(limit) - usage), f"cgroup {group} limit {int(limit) / GB:.1f} GB"))
    return min(rooms, key=lambda r: r.bytes) if rooms else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
