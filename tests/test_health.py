"""The node health sampler (kit.health).

GPU paths use tests/fake_nvml.py, a fake pynvml: NVML is faked because no GPU and no NVML library exist
on these machines (test_fake_nvml_matches_real_pynvml keeps the fake's names, parameters and constants
equal to the installed nvidia-ml-py). The host side uses the real psutil, and the NVML-absent path uses
the real pynvml, which fails to load its library here.
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kit.config import HealthSection
from kit.health import CLEAR_SAMPLES, ESCALATE_SAMPLES, NONFINITE_CLEAR_STEPS, HealthSampler, throttle_names
from kit.ledger import read_all

sys.path.insert(0, str(Path(__file__).parent))
import fake_nvml


def _sampler(tmp_path: Path, nvml: Any = fake_nvml, **cfg: Any) -> HealthSampler:
    cfg.setdefault("record_every", 1)
    # these tests are about the GPUs: the machine's own free disk (50 GiB bar) must not alert in them
    cfg.setdefault("disk_min_free_gib", 0.0)
    return HealthSampler(tmp_path, HealthSection(**cfg), seg="t", node="node7", nvml=nvml)


def _alerts(tmp_path: Path) -> list[dict[str, Any]]:
    return read_all(tmp_path, {"alert"})


def test_fake_nvml_matches_real_pynvml() -> None:
    import pynvml

    for name, obj in vars(fake_nvml).items():
        if name.startswith("nvml") and callable(obj):
            real = getattr(pynvml, name, None)
            assert real is not None, f"pynvml has no {name}: the fake must only use real names"
            fake_params = list(inspect.signature(obj).parameters)
            real_params = list(inspect.signature(real).parameters)
            assert fake_params == real_params, f"{name}: fake {fake_params} != real {real_params}"
        elif name.startswith(("NVML_", "nvmlEventType", "nvmlClocks")):
            assert getattr(pynvml, name) == obj, f"{name} differs from pynvml"
        elif name.startswith("NVMLError_"):
            assert hasattr(pynvml, name), name
    real_mem = [f[0] for f in pynvml.c_nvmlMemory_t._fields_]
    real_util = [f[0] for f in pynvml.c_nvmlUtilization_t._fields_]
    real_event = [f[0] for f in pynvml.c_nvmlEventData_t._fields_]
    assert list(fake_nvml.c_nvmlMemory_t.__dataclass_fields__) == real_mem
    assert list(fake_nvml.c_nvmlUtilization_t.__dataclass_fields__) == real_util
    assert list(fake_nvml.EventData.__dataclass_fields__) == real_event


def test_gpu_sample_shapes_and_units(tmp_path: Path) -> None:
    gpus = fake_nvml.install(2)
    gpus[1].temp_c = 71
    s = _sampler(tmp_path)
    event = s.sample_once()
    assert event is not None and event["node"] == "node7" and event["driver"] == fake_nvml.driver_version
    g0, g1 = event["gpus"]
    assert (g0["index"], g1["index"]) == (0, 1) and g1["uuid"] == gpus[1].uuid
    assert g0["util_pct"] == 97 and g0["mem_util_pct"] == 41
    assert g0["mem_used_gib"] == 60.0 and 79 < g0["mem_total_gib"] < 80  # bytes -> GiB
    assert g0["power_w"] == 512.3 and g0["power_limit_w"] == 700.0  # milliwatts -> watts
    assert g1["temp_c"] == 71 and g0["sm_clock_mhz"] == 1980
    assert g0["ecc_vol_unc"] == 0 and g0["retired_pages"] == 0 and g0["nvlink_errors"] == 0
    assert g0["remap_pending"] is False and g0["xid"] == [] and g0["lost"] is False
    host = event["host"]
    assert 0 <= host["mem_pct"] <= 100 and host["fs_free_gib"] > 0 and host["load1"] >= 0
    assert host["net_rx_mbps"] is None  # rates need two samples
    assert (s.sample_once() or {})["host"]["net_rx_mbps"] is not None
    assert not _alerts(tmp_path), "a healthy node raises no alert"
    s.stop()


def test_unsupported_counters_are_null_not_errors(tmp_path: Path) -> None:
    gpus = fake_nvml.install(1, power_mw=fake_nvml.UNSUPPORTED, remapped=fake_nvml.UNSUPPORTED,
                             retired=fake_nvml.UNSUPPORTED, nvlinks=0)
    gpus[0].ecc = {(1, 0): fake_nvml.UNSUPPORTED}
    g = (_sampler(tmp_path).sample_once() or {})["gpus"][0]
    assert g["power_w"] is None and g["remapped_rows_unc"] is None and g["remap_pending"] is None
    assert g["retired_pages"] is None and g["nvlink_errors"] is None and g["ecc_vol_unc"] is None
    assert g["ecc_agg_unc"] == 0 and g["temp_c"] == 62


def test_alerts_name_node_gpu_and_uuid_once_per_condition(tmp_path: Path) -> None:
    gpus = fake_nvml.install(4)
    s = _sampler(tmp_path, gpu_temp_max_c=85.0)
    s.sample_once()
    gpus[2].temp_c = 91
    gpus[3].throttle = fake_nvml.nvmlClocksEventReasonHwThermalSlowdown
    s.sample_once()
    s.sample_once()  # still hot: no second alert
    alerts = _alerts(tmp_path)
    assert [(a["condition"], a["gpu"]) for a in alerts] == [("temp", 2), ("throttle", 3)]
    hot = alerts[0]
    assert hot["node"] == "node7" and hot["uuid"] == gpus[2].uuid and "GPU 2" in hot["message"]
    assert gpus[2].uuid in hot["message"] and "node7" in hot["message"] and hot["severity"] == "warning"
    assert "hw_thermal" in alerts[1]["message"]
    gpus[2].temp_c = 60
    s.sample_once()
    gpus[2].temp_c = 90
    s.sample_once()  # one cool sample on the threshold is not the end of it: no flapping
    assert [a["condition"] for a in _alerts(tmp_path)].count("temp") == 1
    gpus[2].temp_c = 60
    for _ in range(CLEAR_SAMPLES):
        s.sample_once()
    cleared = read_all(tmp_path, {"alert_cleared"})
    assert [c["incident"] for c in cleared] == [hot["incident"]] and cleared[0]["gpu"] == 2
    gpus[2].temp_c = 90
    s.sample_once()  # cleared, then hot again: a new incident
    temps = [a for a in _alerts(tmp_path) if a["condition"] == "temp"]
    assert len(temps) == 2 and temps[1]["incident"] != hot["incident"]


def test_a_lasting_condition_escalates_once(tmp_path: Path) -> None:
    gpus = fake_nvml.install(1)
    s = _sampler(tmp_path)
    gpus[0].temp_c = 95
    for _ in range(ESCALATE_SAMPLES + 5):
        s.sample_once()
    temps = [a for a in _alerts(tmp_path) if a["condition"] == "temp"]
    assert [(a["severity"], a.get("escalated", False)) for a in temps] == [("warning", False), ("error", True)]
    assert temps[0]["incident"] == temps[1]["incident"]


def test_error_counters_xids_and_lost_gpus(tmp_path: Path) -> None:
    gpus = fake_nvml.install(3)
    gpus[0].ecc = {(fake_nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, fake_nvml.NVML_AGGREGATE_ECC): 4}
    s = _sampler(tmp_path)
    s.sample_once()
    assert not _alerts(tmp_path), "old aggregate errors alone are history, not news"
    gpus[1].nvlink_errors = {(3, fake_nvml.NVML_NVLINK_ERROR_DL_CRC_FLIT): 12}
    gpus[1].remapped = (0, 1, 1, 0)
    fake_nvml.inject_xid(2, 79)
    fake_nvml.inject_xid(2, 13)
    event = s.sample_once() or {}
    assert event["gpus"][2]["xid"] == [79, 13] and event["gpus"][1]["nvlink_errors"] == 12
    by = {(a["condition"], a["gpu"]): a for a in _alerts(tmp_path)}
    assert by[("xid", 2)]["severity"] == "critical" and by[("xid", 2)]["xid"] == [79, 13]
    assert by[("remapped_rows_unc", 1)]["severity"] == "error" and ("remap", 1) in by
    assert ("nvlink_errors", 1) in by
    gpus[0].lost = True
    event = s.sample_once() or {}
    assert event["gpus"][0]["lost"] is True and event["gpus"][0]["temp_c"] is None
    lost = [a for a in _alerts(tmp_path) if a["condition"] == "gpu_lost"]
    assert len(lost) == 1 and lost[0]["severity"] == "critical" and lost[0]["uuid"] == gpus[0].uuid


def test_nvml_absent_is_recorded_once_and_the_host_is_sampled(tmp_path: Path) -> None:
    """Real pynvml on this GPU-less machine: its library is missing."""
    pynvml = pytest.importorskip("pynvml")
    cfg = HealthSection(period_s=0.05, record_every=1)
    s = HealthSampler(tmp_path, cfg, seg="t", node="cpu1")  # nvml=None: the real pynvml
    s.start()
    deadline = time.monotonic() + 20
    while s.samples < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    s.stop()
    assert s.samples >= 3
    absent = read_all(tmp_path, {"nvml_absent"})
    assert len(absent) == 1 and absent[0]["node"] == "cpu1" and "NVML" in absent[0]["reason"]
    health = read_all(tmp_path, {"health"})
    assert len(health) >= 3 and all(h.get("gpus") is None and h["host"]["mem_pct"] > 0 for h in health)
    assert (tmp_path / "ledger" / "health-cpu1.jsonl").exists()
    assert pynvml is not None


def test_host_thresholds(tmp_path: Path) -> None:
    s = _sampler(tmp_path, nvml=None, host_mem_max_pct=0.001, disk_min_free_gib=1e9)
    s._nvml_module = None
    s.nvml_reason = "test: host only"  # skip NVML entirely
    s.sample_once()
    s.sample_once()
    conds = sorted(a["condition"] for a in _alerts(tmp_path))
    assert conds == ["fs_free", "host_mem"]


def test_sampler_failure_is_reported_not_fatal(tmp_path: Path) -> None:
    fake_nvml.install(1)
    s = _sampler(tmp_path, period_s=0.02)

    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("boom")

    s._open_nvml()
    assert s.gpus is not None
    s.gpus.sample = broken  # type: ignore[method-assign]
    s.start()
    time.sleep(0.3)
    assert s._thread is not None and s._thread.is_alive()
    s.stop()
    alerts = _alerts(tmp_path)
    assert len(alerts) == 1 and "RuntimeError: boom" in alerts[0]["message"]


def test_throttle_names() -> None:
    assert throttle_names(0x48) == ["hw_slowdown", "hw_thermal"]
    assert throttle_names(None) == [] and throttle_names(0) == []


def test_nonfinite_steps_are_recorded_once_per_stretch_of_them(tmp_path: Path) -> None:
    """The health side only records non-finite steps (the spike policy acts on them): one incident for a
    stretch of them (a finite step or two in between does not end it), cleared after
    NONFINITE_CLEAR_STEPS finite steps, then a new one."""
    from kit.health import JobHealth
    from kit.ledger import LedgerWriter

    quiet = [0] * NONFINITE_CLEAR_STEPS
    with LedgerWriter(tmp_path, "train-r0") as led:
        h = JobHealth(None, None, None, led, rank=0, world=4)
        for step, bad in enumerate([0, 2, 2, 0, 0, 1, *quiet, 3], start=1):
            h.after_step(step, 0.1, float(bad))
    alerts = _alerts(tmp_path)
    assert [(a["step"], a["ranks"]) for a in alerts] == [(2, 2), (12, 3)]
    assert all(a["condition"] == "nonfinite" and a["severity"] == "error" for a in alerts)
    assert "2 of 4 ranks" in alerts[0]["message"]
    cleared = read_all(tmp_path, {"alert_cleared"})
    assert [(c["incident"], c["step"]) for c in cleared] == [(alerts[0]["incident"], 11)]


def test_every_nth_sample_and_every_alerting_sample_are_written(tmp_path: Path) -> None:
    gpus = fake_nvml.install(2)
    s = _sampler(tmp_path, record_every=4)
    written = [s.sample_once() is not None for _ in range(6)]
    gpus[1].temp_c = 99
    written.append(s.sample_once() is not None)  # sample 6 raises an alert: written
    written.append(s.sample_once() is not None)  # sample 7: still hot, no new alert, not the 4th
    written.append(s.sample_once() is not None)  # sample 8: the 4th
    assert written == [True, False, False, False, True, False, True, False, True]
    hot = [h for h in read_all(tmp_path, {"health"}) if h["gpus"][1]["temp_c"] == 99]
    assert len(hot) == 2 and s.samples == 9


def test_gpus_of_other_jobs_are_skipped(tmp_path: Path) -> None:
    """Behind Slurm's device cgroup NVML may list GPUs this job cannot open: not ours, not 'lost'."""
    gpus = fake_nvml.install(3)
    gpus[1].denied = True
    s = _sampler(tmp_path)
    event = s.sample_once() or {}
    assert [g["index"] for g in event["gpus"]] == [0, 2] and event["gpus"][1]["uuid"] == gpus[2].uuid
    fake_nvml.inject_xid(2, 48)  # an Xid on NVML device 2, the second GPU sampled
    s.sample_once()
    assert not [a for a in _alerts(tmp_path) if a["condition"] != "xid"]
    [xid] = _alerts(tmp_path)
    assert xid["gpu"] == 2 and xid["uuid"] == gpus[2].uuid
