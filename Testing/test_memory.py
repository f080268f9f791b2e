"""The memory a job may use: the room under the cgroup limits (v1 and v2 files written as the kernel writes them),
the available RAM, and a real `mim3d segment` job in a real memory cgroup, planned within its limit or refused with
exit code 2, never killed."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from segment_helpers import model_info

from mim3d import memory
from mim3d.models import build_segmenter
from mim3d.package import save_package
from mim3d.protocol import EXIT_BAD_INPUT, EXIT_OK, parse_line

GB = 10**9


def write(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)
    return folder


def proc_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


# ---- cgroup v2 ------------------------------------------------------------------------------------------------------

def test_v2_room_is_the_limit_less_the_usage_without_the_reclaimable_file_cache(tmp_path):
    root = tmp_path / "sys-fs-cgroup"
    write(root / "user.slice" / "job", memory_max=f"{6 * GB}\n", memory_current=f"{GB}\n",
          memory_stat="anon 700000000\nfile 300000000\ninactive_file 200000000\nactive_file 100000000\n")
    room = memory.cgroup_room(root, proc_cgroup(tmp_path, "0::/user.slice/job\n"))
    assert room.bytes == 6 * GB - (GB - 200_000_000)
    assert room.source == f"cgroup {root / 'user.slice' / 'job'} limit 6.0 GB"


def test_v2_a_parent_groups_smaller_room_is_the_one_that_counts(tmp_path):
    root = tmp_path / "sys-fs-cgroup"
    write(root / "slurm", memory_max=f"{3 * GB}\n", memory_current=f"{2_500_000_000}\n")
    write(root / "slurm" / "job_42", memory_max="max\n", memory_current=f"{GB}\n")
    assert memory.cgroup_room(root, proc_cgroup(tmp_path, "0::/slurm/job_42\n")).bytes == 500_000_000


def test_v2_without_a_limit_has_no_room_to_report(tmp_path):
    root = tmp_path / "sys-fs-cgroup"
    write(root / "job", memory_max="max\n", memory_current=f"{GB}\n")
    assert memory.cgroup_room(root, proc_cgroup(tmp_path, "0::/job\n")) is None


def test_v2_on_a_hybrid_system_is_found_under_unified(tmp_path):
    root = tmp_path / "sys-fs-cgroup"
    write(root / "unified" / "job", memory_max=f"{2 * GB}\n", memory_current=f"{GB}\n")
    assert memory.cgroup_room(root, proc_cgroup(tmp_path, "0::/job\n")).bytes == GB


# ---- cgroup v1 ------------------------------------------------------------------------------------------------------

def test_v1_room_is_the_memory_controllers_limit_less_its_usage(tmp_path):
    root = tmp_path / "sys-fs-cgroup"
    write(root / "memory", memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes=f"{5 * GB}\n")
    write(root / "memory" / "docker" / "abc", memory_limit_in_bytes=f"{4 * GB}\n",
          memory_usage_in_bytes=f"{GB}\n", memory_stat="cache 300000000\ntotal_inactive_file 100000000\n")
    room = memory.cgroup_room(root, proc_cgroup(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n"))
    assert room.bytes == 4 * GB - (GB - 100_000_000)


def test_v1_inside_a_container_whose_group_is_mounted_as_the_root(tmp_path):
    root = tmp_path / "sys-fs-cgroup"  # /proc/self/cgroup names the host's group, which the container cannot see
    write(root / "memory", memory_limit_in_bytes=f"{6 * GB}\n", memory_usage_in_bytes=f"{2 * GB}\n")
    assert memory.cgroup_room(root, proc_cgroup(tmp_path, "4:memory:/kubepods/pod1/c0ffee\n")).bytes == 4 * GB


def test_v1_unlimited_has_no_room_to_report(tmp_path):
    root = tmp_path / "sys-fs-cgroup"
    write(root / "memory" / "job", memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes="1\n")
    assert memory.cgroup_room(root, proc_cgroup(tmp_path, "4:memory:/job\n")) is None


# ---- the host budget ------------------------------------------------------------------------------------------------

def test_the_host_budget_is_the_smaller_of_available_ram_and_the_cgroup_room(tmp_path):
    root = tmp_path / "sys-fs-cgroup"
    write(root / "memory" / "job", memory_limit_in_bytes=f"{6 * GB}\n", memory_usage_in_bytes=f"{GB}\n")
    cgroup = proc_cgroup(tmp_path, "4:memory:/job\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   32000000 kB\n")
    assert memory.host_budget(cgroup_root=root, proc_cgroup=cgroup, meminfo=meminfo).bytes == 5 * GB
    meminfo.write_text("MemTotal:       8000000 kB\nMemAvailable:    2000000 kB\n")
    budget = memory.host_budget(cgroup_root=root, proc_cgroup=cgroup, meminfo=meminfo)
    assert budget == memory.Budget(2_048_000_000, "RAM available")


def test_without_a_cgroup_file_the_budget_is_the_available_ram(tmp_path):
    budget = memory.budget(torch.device("cpu"), cgroup_root=tmp_path, proc_cgroup=tmp_path / "missing")
    assert budget.source == "RAM available" and 0 < budget.bytes <= os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_PHYS_PAGES")


# ---- a real job under a real limit ----------------------------------------------------------------------------------

@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A new memory cgroup limited to ``limit`` bytes (v2 where its memory controller is mounted, else v1); yields its
    cgroup.procs file. Skips the test where this process may not create one."""
    name = f"mim3d-test-{os.getpid()}"
    candidates = [(Path("/sys/fs/cgroup") / name, "memory.max"),
                  (Path("/sys/fs/cgroup/unified") / name, "memory.max"),
                  (Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes")]
    for group, limit_file in candidates:
        controllers = group.parent / "cgroup.controllers"
        if limit_file == "memory.max" and not (controllers.exists() and "memory" in controllers.read_text().split()):
            continue
        try:
            if limit_file == "memory.max":
                (group.parent / "cgroup.subtree_control").write_text("+memory")
            group.mkdir()
        except OSError:
            continue
        try:
            (group / limit_file).write_text(str(limit))
            (group / "memory.swap.max" if limit_file == "memory.max" else group / "memory.swappiness").write_text("0")
            yield group / "cgroup.procs"
        finally:
            group.rmdir()
        return
    pytest.skip("this process may not create a memory cgroup (/sys/fs/cgroup is not writable, or no memory "
                "controller is mounted): the real-limit test needs root on a machine that allows it")


def segment_in_cgroup(limit: int, package: Path, ct: Path, output: Path) -> tuple[int, list[dict]]:
    with memory_cgroup(limit) as procs:
        command = ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", sys.executable, "-m", "mim3d", "segment",
                   str(ct), "--model", str(package), "--output", str(output)]
        done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=600,
                              env={**os.environ, "PYTHONUTF8": "1"})
    return done.returncode, [e for e in map(parse_line, done.stdout.splitlines()) if e is not None]


@pytest.fixture(scope="module")
def small_package(tmp_path_factory) -> Path:
    """mim-unetr small with 96³ windows at 1.5 mm: 1.2 GB at its peak on the example CT (measured, max_usage)."""
    torch.manual_seed(0)
    model = build_segmenter("mim-unetr", 3, preset="small", roi_size=(96, 96, 96))
    folder = tmp_path_factory.mktemp("models") / "fine"
    save_package(folder, model, model_info(spacing_mm=(1.5, 1.5, 1.5), roi_size=(96, 96, 96), overlap=0.25))
    return folder


def test_a_segmentation_in_a_memory_cgroup_is_planned_within_its_limit_and_completes(example_ct_sm_path, tmp_path):
    torch.manual_seed(0)
    model = build_segmenter("mim-unetr", 3, preset="small", roi_size=(64, 64, 32))
    package = tmp_path / "coarse"
    save_package(package, model, model_info(spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 64, 32), overlap=0.25))
    output = tmp_path / "labels.nii.gz"
    code, events = segment_in_cgroup(2 * GB, package, example_ct_sm_path, output)
    assert code == EXIT_OK, events[-1:]
    plan = [e["message"] for e in events if e.get("message", "").startswith("plan: ")]
    assert len(plan) == 1 and plan[0].endswith(" limit 2.0 GB)") and "memory " in plan[0] and "(cgroup /" in plan[0]
    assert output.exists()


def test_a_segmentation_that_its_cgroup_cannot_hold_exits_2_before_writing_instead_of_being_killed(
        small_package, example_ct_path, tmp_path):
    output = tmp_path / "labels.nii.gz"
    code, events = segment_in_cgroup(GB, small_package, example_ct_path, output)  # the job peaks at 1.2 GB
    assert code == EXIT_BAD_INPUT, f"exit code {code}: {events[-1:]}"
    assert events[-1]["type"] == "error" and events[-1]["kind"] == "bad_input"
    assert events[-1]["message"].startswith("not enough memory to segment a 244×202×224 model grid: even cpu, 1 ")
    assert " limit 1.0 GB); close other programs" in events[-1]["message"]
    assert not output.exists()
