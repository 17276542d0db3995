"""The node-local checks of the preflight: versions against the pins, GPUs through NVML, and the
checkpoint filesystem. Each returns :class:`Check` values; none raises for a bad node (a bad node is
a result, not an exception) and a missing NVML is a value ("na"), as in nvitop.

Why these: a four-month run died of silent version drift, of GPUs with pending retired pages or
remapped rows that NVML already showed, and of checkpoints that did not fit on the filesystem.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from kit.containers.pins import Pins, driver_tuple

OK, WARN, FAIL, NA = "ok", "warn", "fail", "na"
STATUSES = (OK, WARN, FAIL, NA)


@dataclass(slots=True)
class Check:
    """One result: ``name`` is dotted (``versions.torch``, ``gpu.0.ecc``, ``fs.space``)."""

    name: str
    status: str
    detail: str
    value: Any = None
    node: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "status": self.status, "detail": self.detail, "node": self.node}
        if self.value is not None:
            d["value"] = self.value
        return d


# ------------------------------------------------------------------------------------------ versions


@dataclass(slots=True)
class Environment:
    """Versions found in the running environment (None: not there, e.g. CUDA in a CPU build)."""

    versions: dict[str, str | None] = field(default_factory=dict)
    driver: str | None = None


def probe_environment() -> Environment:
    """Read versions without importing DeepSpeed (its import is slow and prints): package metadata
    for the Python packages, torch itself for CUDA and NCCL."""
    import torch

    v: dict[str, str | None] = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for key, dist in (("torch", "torch"), ("deepspeed", "deepspeed"), ("transformers", "transformers"),
                      ("tokenizers", "tokenizers"), ("nvidia_ml_py", "nvidia-ml-py"), ("kit", "kit")):
        try:
            v[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[key] = None
    v["cuda"] = torch.version.cuda
    v["nccl"] = None
    if torch.version.cuda and hasattr(torch.cuda, "nccl"):
        try:
            nv = torch.cuda.nccl.version()
            v["nccl"] = ".".join(map(str, nv)) if isinstance(nv, tuple) else str(nv)
        except (RuntimeError, AttributeError):
            v["nccl"] = None
    return Environment(versions=v)


def _same(key: str, want: str, got: str) -> bool:
    if key in ("cuda", "python"):  # pinned as major.minor; torch reports "12.8", python "3.12"
        return got.split(".")[:2] == want.split(".")[:2]
    return got == want


def check_versions(pins: Pins, target: str, env: Environment, strict: bool) -> list[Check]:
    """Each pinned version against the environment. ``strict`` (inside the image, or the image's own
    %test): a difference fails. Otherwise (a login node's own Python) it only warns."""
    pins.target(target)
    bad = FAIL if strict else WARN
    out: list[Check] = []
    for key, want in pins.stack.items():
        got = env.versions.get(key)
        name = f"versions.{key}"
        if got is None:
            status = bad if strict else NA
            out.append(Check(name, status, f"{key} not found in this environment (pinned {want})"))
        elif _same(key, want, got):
            out.append(Check(name, OK, f"{got}", value=got))
        else:
            out.append(Check(name, bad, f"{got}, pinned {want} in {pins.path.name}", value=got))
    if env.driver is None:
        out.append(Check("versions.driver", NA, "no NVIDIA driver (NVML absent)"))
    elif driver_tuple(env.driver) < driver_tuple(pins.driver["min"]):
        out.append(Check("versions.driver", FAIL, f"driver {env.driver} is older than driver.min "
                         f"{pins.driver['min']} of the image (docs/containers.md: host driver older than the image)",
                         value=env.driver))
    else:
        out.append(Check("versions.driver", OK, f"{env.driver} >= {pins.driver['min']}", value=env.driver))
    return out


# ----------------------------------------------------------------------------------------------- GPUs


def load_nvml() -> ModuleType:
    import pynvml

    return pynvml


def check_gpus(expect: int, bad_uuids: list[str], gpu_name: str = "", nvml: ModuleType | None = None
               ) -> tuple[list[Check], str | None]:
    """Count, UUIDs, ECC, retired pages, remapped rows and pending Xid events, through NVML.

    Returns the checks and the driver version (None without NVML). Without NVML (a CPU machine, a
    login node) the result is one "na" check, unless ``expect`` GPUs were required: then it fails.
    """
    nv = nvml or load_nvml()
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        status = FAIL if expect else NA
        return [Check("gpu.nvml", status, f"NVML not available: {e}" + (f"; the recipe expects {expect} GPUs"
                                                                      if expect else ""))], None
    try:
        return _gpu_checks(nv, expect, bad_uuids, gpu_name)
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError as e:
            print(f"kit doctor: warning: nvmlShutdown failed: {e}", file=sys.stderr)


def _call(nv: ModuleType, fn: str, *args: Any) -> Any:
    """An NVML query, or the NVMLError it raised (NotSupported is common: MIG, consumer GPUs)."""
    try:
        return getattr(nv, fn)(*args)
    except nv.NVMLError as e:
        return e


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _gpu_checks(nv: ModuleType, expect: int, bad_uuids: list[str], gpu_name: str
                ) -> tuple[list[Check], str | None]:
    out: list[Check] = []
    driver = _call(nv, "nvmlSystemGetDriverVersion")
    driver_s = None if isinstance(driver, nv.NVMLError) else _text(driver)
    count = _call(nv, "nvmlDeviceGetCount")
    if isinstance(count, nv.NVMLError):
        return [Check("gpu.count", FAIL, f"NVML cannot count the GPUs: {count}")], driver_s
    if expect and count < expect:
        out.append(Check("gpu.count", FAIL, f"{count} GPUs visible, the recipe expects {expect}", value=count))
    else:
        out.append(Check("gpu.count", OK, f"{count} GPUs" + (f" (expected {expect})" if expect else ""), value=count))
    uuids: list[str] = []
    for i in range(count):
        h = _call(nv, "nvmlDeviceGetHandleByIndex", i)
        if isinstance(h, nv.NVMLError):  # e.g. GPU_IS_LOST after an Xid 79: the node must not train
            out.append(Check(f"gpu.{i}.handle", FAIL, f"GPU {i} does not answer NVML: {h}"))
            continue
        name = _text(_call(nv, "nvmlDeviceGetName", h))
        uuid = _text(_call(nv, "nvmlDeviceGetUUID", h))
        uuids.append(uuid)
        p = f"gpu.{i}"
        if uuid in bad_uuids:
            out.append(Check(f"{p}.uuid", FAIL, f"{uuid} is listed in doctor.bad_gpu_uuids", value=uuid))
        else:
            out.append(Check(f"{p}.uuid", OK, f"{name} {uuid}", value=uuid))
        if gpu_name and gpu_name not in name:
            out.append(Check(f"{p}.model", FAIL, f"{name}: the image was built for {gpu_name}"))
        out.extend(_memory_health(nv, h, p))
    if len(set(uuids)) != len(uuids):
        out.append(Check("gpu.uuids", FAIL, "two GPUs report the same UUID", value=uuids))
    return out, driver_s


def _memory_health(nv: ModuleType, h: Any, p: str) -> list[Check]:
    out: list[Check] = []
    ecc = _call(nv, "nvmlDeviceGetTotalEccErrors", h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)
    if isinstance(ecc, nv.NVMLError):
        out.append(Check(f"{p}.ecc", NA, f"ECC counters: {ecc}"))
    else:
        out.append(Check(f"{p}.ecc", FAIL if ecc else OK, f"{ecc} uncorrected ECC errors since boot", value=int(ecc)))
    rows = _call(nv, "nvmlDeviceGetRemappedRows", h)  # (corrected, uncorrected, pending, failure)
    if isinstance(rows, nv.NVMLError):
        retired = _call(nv, "nvmlDeviceGetRetiredPagesPendingStatus", h)  # pre-Ampere: page retirement
        if isinstance(retired, nv.NVMLError):
            out.append(Check(f"{p}.memory", NA, f"remapped rows / retired pages: {rows}"))
        else:
            out.append(Check(f"{p}.memory", FAIL if retired else OK,
                             "retired pages pending: reset the GPU" if retired else "no retired pages pending"))
    else:
        corr, unc, pending, failure = (int(x) for x in rows)
        bad = pending or failure
        detail = (f"remapped rows: {corr} corrected, {unc} uncorrected, pending={bool(pending)}, "
                  f"failure={bool(failure)}")
        out.append(Check(f"{p}.memory", FAIL if bad else OK, detail + ("; reset the GPU" if pending else "")
                         + ("; replace the GPU" if failure else ""), value=[corr, unc, pending, failure]))
    out.append(_xid(nv, h, p))
    return out


def _xid(nv: ModuleType, h: Any, p: str) -> Check:
    """Xid events NVML holds for this GPU right now (it only reports events after registration, so a
    zero-timeout wait sees the pending ones; older Xids are in the kernel log, not here)."""
    es = _call(nv, "nvmlEventSetCreate")
    if isinstance(es, nv.NVMLError):
        return Check(f"{p}.xid", NA, f"Xid events: {es}")
    try:
        reg = _call(nv, "nvmlDeviceRegisterEvents", h, nv.nvmlEventTypeXidCriticalError, es)
        if isinstance(reg, nv.NVMLError):
            return Check(f"{p}.xid", NA, f"Xid events: {reg}")
        xids = []
        while True:
            ev = _call(nv, "nvmlEventSetWait_v2", es, 0)
            if isinstance(ev, nv.NVMLError):  # NVMLError_Timeout: nothing pending
                break
            xids.append(int(ev.eventData))
        if xids:
            return Check(f"{p}.xid", FAIL, f"pending Xid errors {xids}", value=xids)
        return Check(f"{p}.xid", OK, "no pending Xid errors")
    finally:
        _call(nv, "nvmlEventSetFree", es)


# ------------------------------------------------------------------------------------- checkpoint fs


def existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_filesystem(ckpt_dir: Path, need_bytes: float, need_inodes: int, probe_bytes: int,
                     min_write_mbps: float, tag: str) -> list[Check]:
    """Free space and inodes for the checkpoints to come, write permission, a write+fsync timing.

    A run directory that does not exist yet (``kit doctor RECIPE`` before the first submit) is
    checked at its nearest existing parent, which is where it will be created."""
    where = existing_ancestor(ckpt_dir)
    out: list[Check] = []
    try:
        st = os.statvfs(where)
    except OSError as e:  # a dead network mount answers EIO or ESTALE
        return [Check("fs.space", FAIL, f"cannot stat {where}: {e.strerror}")]
    free = st.f_bavail * st.f_frsize
    gib = 2**30
    out.append(Check("fs.space", OK if free >= need_bytes else FAIL,
                     f"{free / gib:.1f} GiB free at {where}, need {need_bytes / gib:.2f} GiB", value=free))
    if st.f_files == 0:
        out.append(Check("fs.inodes", NA, f"{where}: the filesystem reports no inode counts"))
    else:
        out.append(Check("fs.inodes", OK if st.f_favail >= need_inodes else FAIL,
                         f"{st.f_favail} inodes free, need {need_inodes}", value=st.f_favail))
    probe = where / f".kit-doctor-{tag}-{os.getpid()}"
    block = os.urandom(1 << 20)  # incompressible: a compressing filesystem must not flatter the timing
    try:
        t0 = time.perf_counter()
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = probe_bytes
            while left > 0:
                left -= os.write(fd, block[: min(left, len(block))])
            os.fsync(fd)
        finally:
            os.close(fd)
        dt = time.perf_counter() - t0
    except OSError as e:
        out.append(Check("fs.write", FAIL, f"cannot write to {where}: {e.strerror}"))
        return out
    finally:
        probe.unlink(missing_ok=True)
    mbps = probe_bytes / dt / 1e6
    slow = min_write_mbps and mbps < min_write_mbps
    out.append(Check("fs.write", FAIL if slow else OK,
                     f"wrote and fsynced {probe_bytes / 2**20:.0f} MiB in {dt:.3f} s ({mbps:.0f} MB/s)"
                     + (f", below doctor.min_write_mbps {min_write_mbps}" if slow else ""), value=round(mbps, 1)))
    return out


# ------------------------------------------------------------------------------- DeepSpeed op cache


def check_build_locks(folders: list[Path] | None = None, max_age_s: float | None = None) -> list[Check]:
    """Stale build locks in DeepSpeed's extension caches (kit.opcache): a lock left by a process killed
    while it compiled an op makes every later DeepSpeed start on this node wait on it forever, silently."""
    from kit import opcache

    age = opcache.STALE_AFTER_S if max_age_s is None else max_age_s
    locks = opcache.build_locks(folders)
    stale = [lk for lk in locks if not lk.holders and lk.age_s > age]
    if stale:
        detail = "; ".join(f"stale build lock {lk.path} ({lk.age_s / 60:.0f} min old, no process building): every "
                           f"DeepSpeed start waits on it forever; remove it: {lk.command}" for lk in stale)
        return [Check("fs.build_lock", FAIL, detail, value=[str(lk.path) for lk in stale])]
    busy = [lk for lk in locks if lk.holders or lk.age_s <= age]
    if busy:
        return [Check("fs.build_lock", OK, "; ".join(f"{lk.path}: a build in progress (pids {lk.holders or '?'}, "
                                                     f"{lk.age_s:.0f} s)" for lk in busy))]
    return [Check("fs.build_lock", OK, "no build lock in " + ", ".join(str(r) for r in (folders or opcache.roots())))]
