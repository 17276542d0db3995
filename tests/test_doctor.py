"""The preflight: versions against the pins, GPU health through NVML, the checkpoint filesystem, and the
all-reduce bandwidth test on real gloo ranks (two torchrun "nodes" on this machine).

NVML is faked (there is no GPU and no NVML library here): :func:`fake_nvml` builds a module with the
real pynvml's function names, constants and error classes (checked against the installed pynvml, so
it cannot drift), holding GPUs whose counters the tests set. The real pynvml is also used, to show that
a missing NVML is reported as "na" and never crashes.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml
import pytest

from kit.containers.pins import load_pins
from kit.dist import free_port
from kit.ledger import read_all
from kit.rundir import RunDir
from kit.tools.doctor_checks import (
    FAIL,
    NA,
    OK,
    WARN,
    Environment,
    check_build_locks,
    check_filesystem,
    check_gpus,
    check_versions,
)
from kit.tools.doctor_net import _scores, busbw

# ------------------------------------------------------------------------------------------ fake NVML


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    ecc_uncorrected: Any = 0
    remapped: Any = (0, 0, 0, 0)  # corrected, uncorrected, pending, failure
    retired_pending: Any = 0
    xids: list[int] = field(default_factory=list)


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml turns the code into its subclass, as on a real GPU


FAKED = ("nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount",
         "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetTotalEccErrors",
         "nvmlDeviceGetRemappedRows", "nvmlDeviceGetRetiredPagesPendingStatus", "nvmlEventSetCreate",
         "nvmlDeviceRegisterEvents", "nvmlEventSetWait_v2", "nvmlEventSetFree")


def fake_nvml(gpus: list[FakeGpu], driver: str = "550.54.15") -> types.ModuleType:
    m = types.ModuleType("fake_pynvml")
    for name in ("NVMLError", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC",
                 "nvmlEventTypeXidCriticalError"):
        setattr(m, name, getattr(pynvml, name))
    registered: dict[int, list[int]] = {}

    def value(v: Any) -> Any:
        if v is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return v

    def wait(es: int, timeoutms: int) -> Any:
        pending = registered.get(es, [])
        if not pending:
            raise _err(pynvml.NVML_ERROR_TIMEOUT)
        return types.SimpleNamespace(eventData=pending.pop(0), eventType=pynvml.nvmlEventTypeXidCriticalError)

    def register(handle: int, types_: int, es: int) -> None:
        registered.setdefault(es, []).extend(gpus[handle].xids)

    impl = {
        "nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: driver,
        "nvmlDeviceGetCount": lambda: len(gpus),
        "nvmlDeviceGetHandleByIndex": lambda index: index,
        "nvmlDeviceGetName": lambda handle: gpus[handle].name,
        "nvmlDeviceGetUUID": lambda handle: gpus[handle].uuid,
        "nvmlDeviceGetTotalEccErrors": lambda handle, errorType, counterType: value(gpus[handle].ecc_uncorrected),
        "nvmlDeviceGetRemappedRows": lambda device: value(gpus[device].remapped),
        "nvmlDeviceGetRetiredPagesPendingStatus": lambda device: value(gpus[device].retired_pending),
        "nvmlEventSetCreate": lambda: len(registered) + 1,
        "nvmlDeviceRegisterEvents": register,
        "nvmlEventSetWait_v2": wait,
        "nvmlEventSetFree": lambda eventSet: None,
    }
    for name, fn in impl.items():
        setattr(m, name, fn)
    return m


def test_fake_nvml_matches_the_real_api() -> None:
    fake = fake_nvml([FakeGpu()])
    for name in FAKED:
        real = inspect.signature(getattr(pynvml, name))
        mine = inspect.signature(getattr(fake, name))
        assert len(real.parameters) == len(mine.parameters), name


def gpus8(**changes: Any) -> list[FakeGpu]:
    out = [FakeGpu(uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000") for i in range(8)]
    for k, v in changes.items():
        i, attr = k.split("_", 1)
        setattr(out[int(i[1:])], attr, v)
    return out


def by_name(checks: list[Any]) -> dict[str, Any]:
    return {c.name: c for c in checks}


# ------------------------------------------------------------------------------------------------ GPUs


def test_healthy_node_passes() -> None:
    checks, driver = check_gpus(8, [], "H100", nvml=fake_nvml(gpus8()))
    assert driver == "550.54.15"
    assert [c for c in checks if c.status != OK] == []
    assert by_name(checks)["gpu.count"].value == 8


@pytest.mark.parametrize(("change", "failing", "text"), [
    ({"g3_ecc_uncorrected": 2}, "gpu.3.ecc", "2 uncorrected ECC errors"),
    ({"g5_remapped": (1, 1, 1, 0)}, "gpu.5.memory", "pending=True, failure=False; reset the GPU"),
    ({"g6_remapped": (0, 8, 0, 1)}, "gpu.6.memory", "replace the GPU"),
    ({"g1_xids": [79]}, "gpu.1.xid", "pending Xid errors [79]"),
    ({"g2_name": "NVIDIA A100-SXM4-80GB"}, "gpu.2.model", "the image was built for H100"),
])
def test_unhealthy_gpu_fails_only_its_check(change: dict[str, Any], failing: str, text: str) -> None:
    checks, _ = check_gpus(8, [], "H100", nvml=fake_nvml(gpus8(**change)))
    bad = [c for c in checks if c.status == FAIL]
    assert [c.name for c in bad] == [failing]
    assert text in bad[0].detail


def test_a_lost_gpu_fails_without_a_crash() -> None:
    nv = fake_nvml(gpus8())
    real = nv.nvmlDeviceGetHandleByIndex

    def lost(index: int) -> Any:
        if index == 2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return real(index)

    nv.nvmlDeviceGetHandleByIndex = lost
    checks, _ = check_gpus(8, [], nvml=nv)
    assert [c.name for c in checks if c.status == FAIL] == ["gpu.2.handle"]
    assert "GPU is lost" in by_name(checks)["gpu.2.handle"].detail


def test_missing_gpus_and_known_bad_uuid_fail() -> None:
    gpus = gpus8()[:7]
    checks, _ = check_gpus(8, [gpus[4].uuid], nvml=fake_nvml(gpus))
    named = by_name(checks)
    assert named["gpu.count"].status == FAIL and "7 GPUs visible, the recipe expects 8" in named["gpu.count"].detail
    assert named["gpu.4.uuid"].status == FAIL


def test_unsupported_counters_are_na_and_pre_ampere_uses_retired_pages() -> None:
    gpus = [FakeGpu(ecc_uncorrected=None, remapped=None, retired_pending=1),
            FakeGpu(remapped=None, retired_pending=None)]
    checks, _ = check_gpus(2, [], nvml=fake_nvml(gpus))
    named = by_name(checks)
    assert named["gpu.0.ecc"].status == NA
    assert named["gpu.0.memory"].status == FAIL and "retired pages pending" in named["gpu.0.memory"].detail
    assert named["gpu.1.memory"].status == NA


def test_real_nvml_absent_is_na_not_a_crash() -> None:
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("this machine has a GPU")
    checks, driver = check_gpus(0, [])
    assert driver is None and [(c.name, c.status) for c in checks] == [("gpu.nvml", NA)]
    required, _ = check_gpus(8, [])
    assert required[0].status == FAIL and "expects 8 GPUs" in required[0].detail


# -------------------------------------------------------------------------------------------- versions


def pinned_env(**changes: str | None) -> Environment:
    v: dict[str, str | None] = dict(load_pins().stack)
    v.update(changes)
    return Environment(versions=v, driver="550.54.15")


def test_versions_match_the_pins() -> None:
    checks = check_versions(load_pins(), "h100", pinned_env(cuda="12.8.1"), strict=True)
    assert {c.status for c in checks} == {OK}


def test_version_drift_fails_inside_the_image_and_warns_outside() -> None:
    env = pinned_env(deepspeed="0.20.0", nccl=None)
    inside = by_name(check_versions(load_pins(), "h100", env, strict=True))
    assert inside["versions.deepspeed"].status == FAIL and "pinned 0.19.8" in inside["versions.deepspeed"].detail
    assert inside["versions.nccl"].status == FAIL
    outside = by_name(check_versions(load_pins(), "h100", env, strict=False))
    assert outside["versions.deepspeed"].status == WARN and outside["versions.nccl"].status == NA


def test_old_driver_fails() -> None:
    env = pinned_env()
    env.driver = "470.57.02"
    named = by_name(check_versions(load_pins(), "a100", env, strict=True))
    assert named["versions.driver"].status == FAIL and "older than driver.min" in named["versions.driver"].detail


# ---------------------------------------------------------------------------------------------- filesystem


def test_checkpoint_filesystem(tmp_path: Path) -> None:
    ok = by_name(check_filesystem(tmp_path / "run" / "checkpoints", 1e6, 10, 1 << 20, 0.0, "t"))
    assert {c.status for c in ok.values()} <= {OK, NA}
    assert ok["fs.write"].value > 0 and not list(tmp_path.iterdir())  # probe removed, nothing created
    full = by_name(check_filesystem(tmp_path, 1e18, 10, 1 << 20, 1e9, "t"))
    assert full["fs.space"].status == FAIL and full["fs.write"].status == FAIL  # too slow for 1e9 MB/s


def test_unwritable_checkpoint_filesystem() -> None:
    """/sys refuses new files even to root (these tests run as root here, so a chmod would prove nothing)."""
    named = by_name(check_filesystem(Path("/sys/kit-doctor-test/checkpoints"), 1, 1, 1 << 20, 0.0, "t"))
    assert named["fs.write"].status == FAIL and "cannot write to /sys" in named["fs.write"].detail
    assert named["fs.inodes"].status == NA  # sysfs reports no inode counts


# ---------------------------------------------------------------------------------- DeepSpeed op cache


def _plant_lock(ext: Path, age_s: float, layout: str = "deepspeed_shm_comm") -> Path:
    lock = ext / layout / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_stale_build_lock_is_named_with_the_command_to_remove_it(tmp_path: Path) -> None:
    """A lock file left by a process killed while it compiled a DeepSpeed op (every later DeepSpeed
    start waits on it forever): old, and no process holds it open, so it is stale; the check names it
    and the command that removes it. A held lock, or a fresh one, is a build in progress."""
    ext = tmp_path / "ext"
    assert [c.status for c in check_build_locks([ext])] == [OK]
    lock = _plant_lock(ext, 3600)
    torch_layout = _plant_lock(ext, 3600, "py311_cpu/fused_adam")  # torch's default cache layout
    [c] = check_build_locks([ext])
    assert c.name == "fs.build_lock" and c.status == FAIL, c
    assert f"remove it: rm {lock}" in c.detail and f"rm {torch_layout}" in c.detail and "60 min old" in c.detail
    torch_layout.unlink()
    # torch's builder keeps the lock's descriptor open while it builds: a holder means in progress
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "print('holding', flush=True); time.sleep(600)", str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        [c] = check_build_locks([ext])
        assert c.status == OK and "build in progress" in c.detail and str(holder.pid) in c.detail
    finally:
        holder.kill()
        holder.wait()
    os.utime(lock)  # just created: a build on another node of a shared cache may hold it
    assert [c.status for c in check_build_locks([ext])] == [OK]
    assert [c.status for c in check_build_locks([ext], max_age_s=-1)] == [FAIL]


def test_kit_doctor_names_a_stale_lock_in_this_installs_cache(tiny_cfg: Any, tmp_path: Path) -> None:
    """`kit doctor` looks in the cache this install's DeepSpeed starts use (TORCH_EXTENSIONS_DIR, or
    the kit's own default) and fails with the lock named, blaming no node."""
    run = make_run(tiny_cfg, **{"doctor.allreduce_mib": 1.0, "doctor.allreduce_iters": 2})
    ext = tmp_path / "ext"
    lock = _plant_lock(ext, 900)
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "doctor", str(run), "--json"], capture_output=True,
                         text=True, env={**os.environ, "KIT_IMAGE_TARGET": "", "TORCH_EXTENSIONS_DIR": str(ext)},
                         timeout=120)
    assert out.returncode == 76, out.stderr
    report = json.loads(out.stdout)
    [check] = [c for c in report["checks"] if c["name"] == "fs.build_lock"]
    assert check["status"] == FAIL and f"rm {lock}" in check["detail"]
    assert report["failed_nodes"] == [] and report["shared_failures"] == ["fs.build_lock"]


# ------------------------------------------------------------------------------------------- bandwidth


def test_busbw_is_computed_as_nccl_tests() -> None:
    algbw, bus = busbw(10**9, 0.01, 8)  # 1 GB in 10 ms on 8 ranks
    assert algbw == pytest.approx(100.0) and bus == pytest.approx(175.0)
    assert busbw(10**9, 0.01, 1)[1] == 0.0


def test_slowest_node_is_the_worst_ratio_to_the_median() -> None:
    per_node = {"a": {"copy_gbps": 10.0, "pair_busbw_gbps": 20.0}, "b": {"copy_gbps": 10.5, "pair_busbw_gbps": 12.0},
                "c": {"copy_gbps": 9.8, "pair_busbw_gbps": 21.0}}
    scores, slowest = _scores(per_node)
    assert slowest == "b" and scores["b"] == pytest.approx(12.0 / 20.0)


# --------------------------------------------------------------------------------------- whole preflight


def make_run(tiny_cfg: Any, **extra: Any) -> Path:
    cfg = tiny_cfg(**extra)
    rd = RunDir(cfg.run_dir)
    rd.create(cfg)
    return rd.path


def test_kit_doctor_from_the_login_node(tiny_cfg: Any) -> None:
    run = make_run(tiny_cfg, **{"doctor.allreduce_mib": 1.0, "doctor.allreduce_iters": 2})
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "doctor", str(run), "--json"], capture_output=True,
                         text=True, env={**os.environ, "KIT_IMAGE_TARGET": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    named = {c["name"]: c["status"] for c in report["checks"]}
    assert report["ok"] and named["gpu.nvml"] == NA and named["fs.write"] == OK and named["net.busbw"] == NA
    (event,) = read_all(run, {"doctor"})
    assert event["src"].startswith("doctor-cli-") and event["ok"] is True and len(event["checks"]) == len(named)


def torchrun_two_nodes(run: Path, faults: str = "") -> list[subprocess.CompletedProcess[str]]:
    """Two torchrun agents with one rank each: two "nodes" on this machine, real gloo between them."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KIT_FAULTS": faults, "KIT_IMAGE_TARGET": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={i}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "kit.tools.cli", "doctor", str(run)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = []
    for p in procs:
        so, se = p.communicate(timeout=180)
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return outs


@pytest.mark.slow
def test_two_ranks_name_the_slowest_node_and_fail_below_the_threshold(tiny_cfg: Any) -> None:
    """Rank 1's node is made slow with the kit's fault points (a sleep in its timed copy loop); with a
    bus-bandwidth floor no gloo link can reach, both ranks agree to fail and to exclude that node."""
    run = make_run(tiny_cfg, **{"doctor.allreduce_mib": 2.0, "doctor.allreduce_iters": 3,
                                "doctor.min_busbw_gbps": 1e6})
    outs = torchrun_two_nodes(run, faults="doctor.copy:rank1=sleep0.05")
    events = sorted(read_all(run, {"doctor"}), key=lambda e: e["rank"])
    assert [e["src"] for e in events] == ["doctor-r0", "doctor-r1"], [o.stderr[-2000:] for o in outs]
    slow = events[1]["node"]
    assert slow.endswith("#1") and events[0]["node"].endswith("#0")
    for e in events:
        assert e["ok"] is False and e["slowest_node"] == slow and e["failed_nodes"] == [slow]
        assert e["world_size"] == 2 and e["busbw_gbps"] > 0
        assert e["node_scores"][slow] < 0.5 < e["node_scores"][events[0]["node"]]
        net = {c["name"]: c for c in e["checks"]}["net.busbw"]
        assert net["status"] == FAIL and f"slowest node {slow}" in net["detail"]
    assert all(o.returncode != 0 for o in outs)  # the ranks exited 76; torchrun reports a failed worker
    assert "exitcode  : 76" in outs[0].stderr + outs[1].stderr


@pytest.mark.slow
def test_a_filesystem_failure_on_every_node_blames_no_node(tiny_cfg: Any) -> None:
    """Two "nodes" (two torchrun agents) whose checkpoint filesystem is too slow for the recipe: the
    same fs check fails on both, so it is the shared filesystem's fault. No node may be named for
    exclusion (the chain would drop healthy nodes for the rest of the run); a critical alert says so."""
    run = make_run(tiny_cfg, **{"doctor.allreduce_mib": 1.0, "doctor.allreduce_iters": 2,
                                "doctor.min_write_mbps": 1e9})
    outs = torchrun_two_nodes(run)
    events = sorted(read_all(run, {"doctor"}), key=lambda e: e["rank"])
    assert [e["src"] for e in events] == ["doctor-r0", "doctor-r1"], [o.stderr[-2000:] for o in outs]
    for e in events:
        assert e["ok"] is False and e["failed_nodes"] == [] and e["shared_failures"] == ["fs.write"]
    [alert] = [a for a in read_all(run, {"alert"}) if a["src"] == "doctor-r0"]
    assert alert["severity"] == "critical" and "fs.write failed on every node" in alert["message"]
    assert all(o.returncode != 0 for o in outs) and "fix the shared filesystem" in outs[0].stdout


@pytest.mark.slow
def test_one_node_two_ranks_agree_on_a_local_failure(tiny_cfg: Any) -> None:
    """Node checks run on the node's first rank only; the verdict is collective, so rank 1 (which ran
    none) fails too, and only rank 0 writes the node's ledger file. A filesystem check failed on the
    allocation's only node is not blamed on it."""
    run = make_run(tiny_cfg, **{"doctor.allreduce_mib": 1.0, "doctor.allreduce_iters": 2,
                                "doctor.min_write_mbps": 1e9})
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "kit.tools.cli", "doctor", str(run)], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "KIT_IMAGE_TARGET": ""})
    (event,) = read_all(run, {"doctor"})
    assert event["src"] == "doctor-r0" and event["ok"] is False, out.stderr[-2000:]
    named = {c["name"]: c for c in event["checks"]}
    assert named["fs.write"]["status"] == FAIL and named["net.busbw"]["status"] == OK
    # a one-node allocation cannot tell its own disk from a shared one: no node is blamed (the chain
    # used to exclude the only node of the allocation for a full shared filesystem)
    assert event["failed_nodes"] == [] and event["shared_failures"] == ["fs.write"]
    measures = event["node_measures"][event["node"]]
    assert measures["intra_busbw_gbps"] > 0 and measures["copy_gbps"] > 0  # the intra-node all-reduce ran
    assert out.stdout.count("doctor: FAILED") == 2 and out.returncode != 0


@pytest.mark.slow
def test_a_missing_peer_fails_the_preflight_instead_of_hanging(tiny_cfg: Any) -> None:
    """Rank 0 of 2 alone: the rendezvous times out after doctor.timeout_s and the preflight fails (76)."""
    run = make_run(tiny_cfg, **{"doctor.timeout_s": 3.0})
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "KIT_IMAGE_TARGET": ""}
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "doctor", str(run)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 76, out.stdout + out.stderr
    assert "FAIL  net.collective" in out.stdout
    (event,) = read_all(run, {"doctor"})
    assert event["ok"] is False and event["failed_nodes"] == []  # the missing peer is not this node's fault


def test_kit_train_refuses_to_start_ranks_on_a_stale_lock(tmp_path: Path, no_leftovers: Path) -> None:
    """`kit train` runs no preflight, so it checks the lock itself: one red line naming the lock and the
    `rm` that removes it, instead of two ranks sleeping on it forever (the trap that hung a test suite)."""
    ext = tmp_path / "ext"
    lock = _plant_lock(ext, 900)
    runs = tmp_path / "runs"
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "train", "tiny.toml", "--set",
                          f'run.runs_dir="{runs}"', "--set", "trainer.max_steps=12"], capture_output=True, text=True,
                         timeout=300,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)})
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.startswith("kit: error: stale DeepSpeed build lock") and f"rm {lock}" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------ layout links


def test_layout_groups_follow_the_rank_order() -> None:
    """The tensor groups and pipeline pairs the preflight measures are the layout's (tensor-fastest order)."""
    from kit.parallel.layout import Layout
    from kit.tools.doctor_layout import pipeline_pairs, tensor_groups

    lay = Layout(tensor=2, pipeline=3, data=2)
    groups = tensor_groups(lay)
    assert groups["tensor(pipeline=0,data=0)"] == [0, 1] and groups["tensor(pipeline=2,data=1)"] == [10, 11]
    assert sorted(r for g in groups.values() for r in g) == list(range(12))  # disjoint, everyone once
    rounds = pipeline_pairs(lay)
    assert rounds[0]["pipeline(tensor=1,data=0) 0->1"] == (1, 3)
    assert rounds[1]["pipeline(tensor=0,data=1) 1->2"] == (8, 10)
    for pairs in rounds:  # a rank is in at most one pair per round (no deadlock between pairs)
        ranks = [r for pair in pairs.values() for r in pair]
        assert len(ranks) == len(set(ranks))
    assert sum(len(r) for r in rounds) == lay.tensor * lay.data * (lay.pipeline - 1)
    assert pipeline_pairs(Layout(tensor=4, pipeline=1, data=2)) == []


def doctor_four_ranks(run: Path, faults: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                           "-m", "kit.tools.cli", "doctor", str(run)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "KIT_IMAGE_TARGET": "", "KIT_FAULTS": faults})


LAYOUT_RUN = {"parallel.tensor": 2, "parallel.pipeline": 2, "trainer.nproc": 4, "slurm.tasks_per_node": 4,
              "batch.grad_accum": 2, "deepspeed.zero_stage": 1, "doctor.allreduce_mib": 1.0,
              "doctor.allreduce_iters": 3}


@pytest.mark.slow
def test_tp2_pp2_preflight_measures_tensor_groups_and_pipeline_neighbours(tiny_cfg: Any) -> None:
    """Four real gloo ranks at TP2 x PP2: both tensor groups' all-reduces and both pipeline pairs'
    send/recv are measured and named by their coordinates, ranks and node. Rank 3's tensor all-reduce
    and send/recv loops are slowed by fault points, so the group and the pair holding rank 3 must be the
    ones named slow (WARN, the run is not failed for it), and the others not."""
    run = make_run(tiny_cfg, **LAYOUT_RUN)
    out = doctor_four_ranks(run, faults="doctor.tensor:rank3=sleep0.2,doctor.p2p:rank3=sleep0.2")
    (event,) = read_all(run, {"doctor"})
    assert event["ok"] is True and out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert event["layout"] == {"tensor": 2, "pipeline": 2, "data": 1}
    by_name = {g["name"]: g for g in event["groups"]}
    assert set(by_name) == {"tensor(pipeline=0,data=0)", "tensor(pipeline=1,data=0)",
                            "pipeline(tensor=0,data=0) 0->1", "pipeline(tensor=1,data=0) 0->1"}
    assert by_name["tensor(pipeline=1,data=0)"]["ranks"] == [2, 3]
    assert by_name["pipeline(tensor=1,data=0) 0->1"]["ranks"] == [1, 3]
    for g in event["groups"]:
        assert g["gbps"] > 0 and g["time_ms"] > 0 and g["nodes"] == [event["node"]]
    slow_t, fast_t = by_name["tensor(pipeline=1,data=0)"], by_name["tensor(pipeline=0,data=0)"]
    slow_p, fast_p = by_name["pipeline(tensor=1,data=0) 0->1"], by_name["pipeline(tensor=0,data=0) 0->1"]
    assert slow_t["time_ms"] >= 200 > fast_t["time_ms"] and slow_p["time_ms"] >= 100 > fast_p["time_ms"]
    checks = {c["name"]: c for c in event["checks"]}
    for dim, slow, fast in (("tensor", slow_t, fast_t), ("pipeline", slow_p, fast_p)):
        assert checks[f"net.{dim}"]["status"] == WARN and checks[f"net.{dim}"]["value"] == slow["name"]
        assert slow["name"] + " (ranks " in checks[f"net.{dim}"]["detail"]
        assert fast["name"] not in checks[f"net.{dim}"]["detail"].split("of the median:")[1]
    assert "WARN  net.tensor" in out.stdout and "pipeline(tensor=1,data=0) 0->1" in out.stdout


@pytest.mark.slow
def test_a_healthy_layout_preflight_is_ok_and_a_login_node_says_not_measured(tiny_cfg: Any) -> None:
    """Without faults the four ranks' layout checks run and never fail the preflight (on this shared
    2-core machine a group can still measure slow by chance: OK or WARN, both exit 0); from one process
    (a login node) the recipe's TP2 x PP2 cannot be formed, which is reported as not measured."""
    run = make_run(tiny_cfg, **LAYOUT_RUN)
    out = doctor_four_ranks(run)
    (event,) = read_all(run, {"doctor"})
    checks = {c["name"]: c for c in event["checks"]}
    assert {checks["net.tensor"]["status"], checks["net.pipeline"]["status"]} <= {OK, WARN}, out.stderr[-3000:]
    assert len(event["groups"]) == 4 and event["ok"] is True
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    login = subprocess.run([sys.executable, "-m", "kit.tools.cli", "doctor", str(run), "--json"], capture_output=True,
                           text=True, env={**os.environ, "KIT_IMAGE_TARGET": ""}, timeout=120)
    named = {c["name"]: c for c in json.loads(login.stdout)["checks"]}
    assert named["net.tensor"]["status"] == NA
    assert "does not divide this preflight's 1 rank" in named["net.tensor"]["detail"]
    assert named["net.pipeline"]["status"] == NA and login.returncode == 0
