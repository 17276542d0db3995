"""Node health: one sampler thread per node (local rank 0) reading NVML for each GPU and psutil for the host.

Why a thread on local rank 0 and not a sidecar process: it lives and dies with the segment, needs no
extra launcher, and sees the same GPUs and filesystems as the ranks. It never touches the training
step: NVML and psutil calls are made off the main thread (ctypes releases the GIL), one sample every
``health.period_s`` seconds (bench/health.py measures the cost).

Each sample is one ``health`` event in the node's own ledger file (``ledger/health-<node>.jsonl``,
never shared with another writer). Missing data is a value: a counter the GPU does not support is
``null``, never an exception. Where NVML itself is absent (CPU machines) the sampler says so once
(``nvml_absent``) and samples the host only.

Threshold breaches become ``alert`` events naming node, GPU index and UUID, with kit.alerts'
discipline: one incident per condition (per GPU), opened at the first sample that shows it,
escalated (warning -> error) when it lasts ESCALATE_SAMPLES samples, cleared (``alert_cleared``) after
CLEAR_SAMPLES samples without it, so a hot GPU neither floods the ledger nor flaps on the threshold.
Xids are events, not states: each batch is an incident of its own.

:class:`JobHealth` assembles the sampler, the hang watchdog (kit.watchdog) and the straggler timings
(kit.stragglers) behind the four calls the trainer makes.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from kit.alerts import Incidents
from kit.config import HealthSection
from kit.ledger import LedgerWriter, NullLedger, hostname, writer_name

# Clock event ("throttle") reasons that mean the hardware is slowing the GPU down (nvml.h bit values).
THROTTLE_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}
BAD_THROTTLE = 0x8 | 0x20 | 0x40 | 0x80  # hardware, thermal and power-brake slowdowns: alert
NO_PERMISSION = 4  # NVML_ERROR_NO_PERMISSION
GiB = 1 << 30
CLEAR_SAMPLES = 3  # samples without a condition before its incident is cleared (no flapping on a threshold)
ESCALATE_SAMPLES = 30  # samples with it before a warning becomes an error (5 min at the default period)
NONFINITE_CLEAR_STEPS = 5  # finite steps that end a non-finite-loss incident
NONFINITE_CRITICAL_STEPS = 10  # non-finite steps in a row that make it critical
# Error counters that alert when they grow (uncorrected volatile ECC also when merely non-zero).
COUNTERS = (("ecc_vol_unc", "uncorrected ECC errors"), ("remapped_rows_unc", "uncorrectable remapped rows"),
            ("retired_pages", "retired pages"), ("nvlink_errors", "NVLink errors"))


def throttle_names(mask: int | None) -> list[str]:
    if not mask:
        return []
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit]


def _none(*_: Any) -> None:
    return None


class _NvmlGpus:
    """The NVML side: open once, then read every counter of every GPU, tolerating unsupported ones."""

    def __init__(self, nvml: ModuleType) -> None:
        self.nv = nvml
        nvml.nvmlInit()
        self.driver = self._try(nvml.nvmlSystemGetDriverVersion)
        self.handles: list[Any] = []
        self.indices: list[int] = []  # NVML indices of the GPUs sampled (a GPU of another job is skipped)
        self.lost: set[int] = set()
        for i in range(nvml.nvmlDeviceGetCount()):
            h: Any = None
            try:
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                nvml.nvmlDeviceGetUUID(h)
            except nvml.NVMLError as e:
                if getattr(e, "value", None) == NO_PERMISSION:
                    continue  # a GPU this job may not open (Slurm's device cgroup): not ours to watch
                # any other failure: keep the GPU; one that cannot be read is reported lost
            self.handles.append(h)
            self.indices.append(i)
        self.uuids = [str(self._try(nvml.nvmlDeviceGetUUID, h) or f"gpu{i}") if h is not None else f"gpu{i}"
                      for i, h in zip(self.indices, self.handles, strict=True)]
        self.names = [str(self._try(nvml.nvmlDeviceGetName, h) or "") if h is not None else ""
                      for h in self.handles]
        self.events: Any = None
        try:
            self.events = nvml.nvmlEventSetCreate()
            for h in filter(None, self.handles):
                nvml.nvmlDeviceRegisterEvents(h, nvml.nvmlEventTypeXidCriticalError, self.events)
        except nvml.NVMLError:
            self.events = None  # Xid events not supported here (some drivers, MIG): samples say null

    def _try(self, fn: Any, *args: Any) -> Any:
        """One NVML read; an unsupported or failing counter is None (missing data is a value)."""
        try:
            return fn(*args)
        except self.nv.NVMLError:
            return None

    @staticmethod
    def _key(handle: Any) -> Any:
        """pynvml hands out a new ctypes pointer object per call: compare the address it points to."""
        try:
            return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)
        except (TypeError, ctypes.ArgumentError):
            return handle  # not a ctypes pointer (a hashable handle object)

    def xids(self) -> dict[int, list[int]]:
        """Drain pending Xid events (non-blocking): GPU index -> Xid codes since the last sample."""
        out: dict[int, list[int]] = {}
        if self.events is None:
            return out
        index = {self._key(h): j for j, h in enumerate(self.handles) if h is not None}
        for _ in range(1000):  # bound the drain: a storm of events must not stall the sampler
            try:
                data = self.nv.nvmlEventSetWait_v2(self.events, 0)
            except self.nv.NVMLError:
                break  # NVML_ERROR_TIMEOUT: nothing pending
            out.setdefault(index.get(self._key(data.device), -1), []).append(int(data.eventData))
        return out

    def nvlink_errors(self, h: Any) -> int | None:
        nv, total, seen = self.nv, 0, False
        counters = (nv.NVML_NVLINK_ERROR_DL_REPLAY, nv.NVML_NVLINK_ERROR_DL_RECOVERY,
                    nv.NVML_NVLINK_ERROR_DL_CRC_FLIT, nv.NVML_NVLINK_ERROR_DL_CRC_DATA)
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            if not self._try(nv.nvmlDeviceGetNvLinkState, h, link):
                continue  # inactive, absent or unsupported link
            for c in counters:
                v = self._try(nv.nvmlDeviceGetNvLinkErrorCounter, h, link, c)
                if v is not None:
                    total, seen = total + int(v), True
        return total if seen else None

    def sample(self) -> list[dict[str, Any]]:
        nv = self.nv
        xids = self.xids()
        gpus = []
        for i, h in enumerate(self.handles):  # i: position here; the GPU's NVML index is self.indices[i]
            t = self._try if h is not None else _none
            util = t(nv.nvmlDeviceGetUtilizationRates, h)
            mem = t(nv.nvmlDeviceGetMemoryInfo, h)
            power_mw = t(nv.nvmlDeviceGetPowerUsage, h)
            limit_mw = t(nv.nvmlDeviceGetEnforcedPowerLimit, h)
            reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                nv.nvmlDeviceGetCurrentClocksThrottleReasons
            throttle = t(reasons_fn, h)
            remap = t(nv.nvmlDeviceGetRemappedRows, h)
            retired = [t(nv.nvmlDeviceGetRetiredPages, h, c) for c in
                       (nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
                        nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)]
            ecc = {f"ecc_{scope}_{kind}": t(nv.nvmlDeviceGetTotalEccErrors, h, et, ct)
                   for scope, ct in (("vol", nv.NVML_VOLATILE_ECC), ("agg", nv.NVML_AGGREGATE_ECC))
                   for kind, et in (("unc", nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
                                    ("cor", nv.NVML_MEMORY_ERROR_TYPE_CORRECTED))}
            temp = t(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            if util is None and mem is None and temp is None:
                self.lost.add(i)  # every read failed: the GPU has fallen off the bus (Xid 79) or is lost
            gpus.append({
                "index": self.indices[i], "uuid": self.uuids[i], "name": self.names[i],
                "util_pct": None if util is None else int(util.gpu),
                "mem_util_pct": None if util is None else int(util.memory),
                "mem_used_gib": None if mem is None else round(mem.used / GiB, 3),
                "mem_total_gib": None if mem is None else round(mem.total / GiB, 3),
                "temp_c": temp,
                "power_w": None if power_mw is None else round(power_mw / 1000.0, 1),
                "power_limit_w": None if limit_mw is None else round(limit_mw / 1000.0, 1),
                "sm_clock_mhz": t(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
                "throttle": throttle,
                "throttle_reasons": throttle_names(throttle),
                **ecc,
                "retired_pages": None if retired[0] is None and retired[1] is None
                else sum(len(r or ()) for r in retired),
                "remapped_rows_cor": None if remap is None else int(remap[0]),
                "remapped_rows_unc": None if remap is None else int(remap[1]),
                "remap_pending": None if remap is None else bool(remap[2]),
                "remap_failed": None if remap is None else bool(remap[3]),
                "nvlink_errors": self.nvlink_errors(h) if h is not None else None,
                "xid": xids.get(i, []),
                "lost": i in self.lost,
            })
        return gpus

    def close(self) -> None:
        if self.events is not None:
            self._try(self.nv.nvmlEventSetFree, self.events)
        self._try(self.nv.nvmlShutdown)


class HealthSampler:
    """Background sampler of one node. ``start()``/``stop()``; ``sample_once()`` for tests and benches."""

    def __init__(self, run_dir: str | Path, cfg: HealthSection, seg: str = "", node: str = "",
                 fs_path: str | Path | None = None, nvml: ModuleType | None = None,
                 ledger: LedgerWriter | NullLedger | None = None) -> None:
        self.cfg = cfg
        self.node = node or hostname()
        self.fs_path = Path(fs_path or run_dir)
        self.ledger = ledger if ledger is not None else LedgerWriter(run_dir, writer_name("health", host=self.node),
                                                                     seg=seg)
        self._nvml_module = nvml
        self.gpus: _NvmlGpus | None = None
        self.nvml_reason = ""
        self.incidents = Incidents(self.ledger, f"{self.ledger.src or 'health'}/{self.node}",
                                   clear_after=CLEAR_SAMPLES, escalate_after=ESCALATE_SAMPLES)
        self._last_net: tuple[float, int, int] | None = None
        self._last: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.alerts = 0

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> HealthSampler:
        self._thread = threading.Thread(target=self._loop, name="kit-health", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.gpus is not None:
            self.gpus.close()
            self.gpus = None
        self.ledger.close()

    def _loop(self) -> None:
        errors: set[str] = set()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as e:  # a sampler bug must not end training: it is reported once
                msg = f"{type(e).__name__}: {e}"
                if msg not in errors:
                    errors.add(msg)
                    self.ledger.alert("warning", f"health sampler on {self.node} failed: {msg}", node=self.node)
            self._stop.wait(self.cfg.period_s)

    # -------------------------------------------------------------------------------- sampling
    def _open_nvml(self) -> None:
        if self.gpus is not None or self.nvml_reason:
            return
        try:
            if self._nvml_module is None:
                import pynvml

                self._nvml_module = pynvml
            self.gpus = _NvmlGpus(self._nvml_module)
        except ImportError as e:
            self.nvml_reason = f"nvidia-ml-py not installed ({e})"
        except Exception as e:  # pynvml raises NVMLError subclasses (no driver, no GPU): NVML is absent
            self.nvml_reason = f"{type(e).__name__}: {e}"
        if self.nvml_reason:
            self.ledger.emit("nvml_absent", node=self.node, reason=self.nvml_reason)

    def sample_once(self) -> dict[str, Any] | None:
        """Take one sample and raise the alerts it implies; write it when it is every ``record_every``-th
        sample or when it raised an alert (so the ledger holds the readings behind every alert).
        Returns the event written, or None."""
        self._open_nvml()
        gpus = self.gpus.sample() if self.gpus is not None else None
        host = self._host()
        alerts = self.alerts
        self._check(gpus or [], host)
        event = None
        if self.samples % self.cfg.record_every == 0 or self.alerts > alerts:
            event = self.ledger.emit("health", node=self.node, gpus=gpus, host=host,
                                     driver=self.gpus.driver if self.gpus else None)
        self.samples += 1
        return event

    def _host(self) -> dict[str, Any]:
        import psutil

        vm = psutil.virtual_memory()
        out: dict[str, Any] = {
            "cpu_pct": psutil.cpu_percent(interval=None),
            "mem_pct": vm.percent,
            "mem_used_gib": round(vm.used / GiB, 3),
            "mem_avail_gib": round(vm.available / GiB, 3),
            "load1": round(os.getloadavg()[0], 2),
        }
        try:
            out["fs_free_gib"] = round(psutil.disk_usage(str(self.fs_path)).free / GiB, 3)
        except OSError:
            out["fs_free_gib"] = None
        net = psutil.net_io_counters()
        now = time.monotonic()
        if self._last_net is not None and now > self._last_net[0]:
            dt = now - self._last_net[0]
            out["net_rx_mbps"] = round((net.bytes_recv - self._last_net[1]) * 8 / dt / 1e6, 3)
            out["net_tx_mbps"] = round((net.bytes_sent - self._last_net[2]) * 8 / dt / 1e6, 3)
        else:
            out["net_rx_mbps"] = out["net_tx_mbps"] = None
        self._last_net = (now, net.bytes_recv, net.bytes_sent)
        return out

    # -------------------------------------------------------------------------------- alerting
    def _raise(self, cond: str, idx: int, on: bool, severity: str, message: str, escalate: bool = True,
               **fields: Any) -> None:
        """One observation of a condition (kit.alerts): opens, escalates (warning -> error) or clears its
        incident."""
        to = "error" if escalate and severity == "warning" else ""
        if not on:
            where = f"{self.node}{f' GPU {idx}' if idx >= 0 else ''}"
            message = f"{where}: {cond} back to normal for {CLEAR_SAMPLES} samples"
        what = self.incidents.observe(f"{cond}:{idx}", on, severity, message, escalate_to=to, node=self.node,
                                      condition=cond, **fields)
        if what in ("opened", "escalated"):
            self.alerts += 1

    def _check(self, gpus: list[dict[str, Any]], host: dict[str, Any]) -> None:
        cfg, node = self.cfg, self.node
        for g in gpus:
            i, uuid = g["index"], g["uuid"]
            where = f"GPU {i} ({uuid}) on {node}"
            ids = {"gpu": i, "uuid": uuid}
            prev = self._last.get(i, {})
            self._raise("gpu_lost", i, g["lost"], "critical", f"{where} does not answer NVML (lost?)", **ids)
            temp = g["temp_c"]
            self._raise("temp", i, temp is not None and temp > cfg.gpu_temp_max_c, "warning",
                        f"{where} at {temp} C (> health.gpu_temp_max_c = {cfg.gpu_temp_max_c})", temp_c=temp, **ids)
            bad = (g["throttle"] or 0) & BAD_THROTTLE
            self._raise("throttle", i, bool(bad), "warning",
                        f"{where} slowed down by {', '.join(throttle_names(bad))}", **ids)
            for key, label in COUNTERS:
                now, before = g[key], prev.get(key)
                # Aggregate counters can be non-zero for life: alert on growth; volatile unc > 0 alerts at once.
                grew = now is not None and ((before is not None and now > before) or (key == "ecc_vol_unc" and now > 0))
                self._raise(key, i, grew, "error" if key != "nvlink_errors" else "warning",
                            f"{where}: {label} {before if before is not None else 0} -> {now}", value=now, **ids)
            self._raise("remap", i, bool(g["remap_pending"] or g["remap_failed"]), "error",
                        f"{where}: row remapping {'failed' if g['remap_failed'] else 'pending'} (reset the GPU)", **ids)
            if g["xid"]:  # Xids are events, not states: every batch is an incident of its own
                self.alerts += 1
                self.incidents.event("critical" if set(g["xid"]) & {48, 63, 64, 74, 79, 92, 94, 95} else "error",
                                     f"{where}: Xid {', '.join(map(str, g['xid']))}", node=node, condition="xid",
                                     xid=g["xid"], **ids)
            self._last[i] = g
        self._raise("host_mem", -1, host["mem_pct"] > cfg.host_mem_max_pct, "warning",
                    f"{node}: memory at {host['mem_pct']}% (> health.host_mem_max_pct = {cfg.host_mem_max_pct})")
        free = host["fs_free_gib"]
        self._raise("fs_free", -1, free is not None and free < cfg.disk_min_free_gib, "warning",
                    f"{node}: {free} GiB free on {self.fs_path} (< health.disk_min_free_gib = {cfg.disk_min_free_gib})")


class JobHealth:
    """What the trainer calls (issue 5): ``start`` in setup, ``after_step`` every step, ``long_phase``
    before a save, ``stop`` at the end. Assembles the node sampler (local rank 0 only), the hang watchdog
    and the straggler timer; each part is off when its recipe switch is."""

    def __init__(self, sampler: HealthSampler | None, watchdog: Any, timer: Any,
                 ledger: LedgerWriter | NullLedger, rank: int, world: int) -> None:
        self.sampler = sampler
        self.watchdog = watchdog
        self.timer = timer
        self.ledger = ledger
        self.rank = rank
        self.world = world
        self.incidents = Incidents(ledger, f"{ledger.src or 'train'}/loss", clear_after=NONFINITE_CLEAR_STEPS,
                                   escalate_after=NONFINITE_CRITICAL_STEPS)

    @classmethod
    def start(cls, cfg: Any, run_dir: Any, env: Any, seg: str, engine: Any,
              ledger: LedgerWriter | NullLedger, watchdog: Any = None) -> JobHealth:
        """``cfg``: RunConfig, ``run_dir``: RunDir, ``env``: DistEnv. Makes one collective (rank table).
        ``watchdog``: the one that watched setup (kit.watchdog.for_setup), taken over from here."""
        from kit.parallel.layout import Layout, placed
        from kit.stragglers import StepTimer, StragglerDetector, gather_ranks
        from kit.watchdog import Watchdog

        h = cfg.health
        ranks, stamp = gather_ranks(env.rank, env.local_rank, env.world_size)
        ranks = placed(ranks, Layout.of(cfg.parallel.tensor, cfg.parallel.pipeline, env.world_size))
        sampler = None
        if h.enabled and env.is_node_main:
            sampler = HealthSampler(run_dir.path, h, seg=seg, fs_path=run_dir.checkpoints).start()
        if watchdog is not None:
            watchdog.setup_done(ranks)
        elif h.watchdog:
            watchdog = Watchdog(run_dir.path, h, env.rank, ranks, seg, stamp).start()
        detector = StragglerDetector(h.straggler_threshold, h.straggler_noise_k, h.straggler_windows,
                                     h.straggler_persist)
        timer = StepTimer(engine, env.rank, ranks, h.straggler_interval, h.straggler_threshold, ledger,
                          detector) if h.straggler_interval else None
        return cls(sampler, watchdog, timer, ledger, env.rank, env.world_size)

    def after_step(self, step: int, dt: float, nonfinite: float = 0.0) -> None:
        """Heartbeat, non-finite record, straggler timings (a collective every straggler_interval steps)."""
        if self.watchdog is not None:
            self.watchdog.beat(step)
        if self.rank == 0:
            # Recorded here (one incident per stretch of non-finite steps, critical when it lasts); what to
            # do about it (skip, roll back) is the spike policy's (kit.trainer).
            bad = nonfinite > 0
            msg = (f"loss is not finite at step {step} on {int(nonfinite)} of {self.world} ranks" if bad else
                   f"loss finite again for {NONFINITE_CLEAR_STEPS} steps (step {step})")
            self.incidents.observe("nonfinite", bad, "error", msg, escalate_to="critical", step=step,
                                   ranks=int(nonfinite), condition="nonfinite")
        if self.timer is not None:
            self.timer.after_step(step, dt)

    def long_phase(self, what: str) -> None:
        if self.watchdog is not None:
            self.watchdog.long_phase(what)

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.timer is not None:
            self.timer.detach()
