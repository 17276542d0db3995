"""A fake ``pynvml`` module: NVML is faked here because no GPU (and no NVML library) exists on these machines.

It mirrors the real nvidia-ml-py (13.x) API that kit.health calls: the same function names and
positional parameters, the same constants (values copied from pynvml), the same return shapes and units
(memory in bytes via ``.total/.free/.used``, utilisation in percent via ``.gpu/.memory``, power in
milliwatts, temperature in C, clocks in MHz, throttle reasons as a bit mask, remapped rows as a 4-tuple,
retired pages as a list of addresses, Xid events as structs with ``.device`` and ``.eventData``), and
errors as ``NVMLError`` subclasses carrying ``.value``. tests/test_health_fake_nvml.py checks the names,
signatures and constants against the installed pynvml, so the fake cannot drift silently.

Tests build GPUs with :func:`install` and change their state (``fake.gpus[0].temp_c = 95``) between
samples; a counter set to :data:`UNSUPPORTED` raises NVML_ERROR_NOT_SUPPORTED like a real GPU without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

# ---- constants (values as in pynvml / nvml.h)
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
NVML_NVLINK_MAX_LINKS = 36
NVML_NVLINK_ERROR_DL_REPLAY = 0
NVML_NVLINK_ERROR_DL_RECOVERY = 1
NVML_NVLINK_ERROR_DL_CRC_FLIT = 2
NVML_NVLINK_ERROR_DL_CRC_DATA = 3
nvmlEventTypeXidCriticalError = 8
nvmlClocksThrottleReasonHwSlowdown = 0x8
nvmlClocksThrottleReasonHwThermalSlowdown = 0x40
nvmlClocksEventReasonHwSlowdown = 0x8
nvmlClocksEventReasonHwThermalSlowdown = 0x40

UNSUPPORTED = object()


class NVMLError(Exception):
    """As pynvml's: ``NVMLError(code)`` is an instance of the subclass for that code, with ``.value``."""

    _map: ClassVar[dict[int, type[NVMLError]]] = {}

    def __new__(cls, value: int) -> NVMLError:
        typ = NVMLError._map.get(value, cls) if cls is NVMLError else cls
        obj = Exception.__new__(typ)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {3: "Not Supported", 4: "Insufficient Permissions", 10: "Timeout", 12: "NVML Shared Library Not Found",
                15: "GPU is lost", 2: "Invalid Argument"}.get(self.value, f"NVML Error with code {self.value}")


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_Timeout(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_InvalidArgument(NVMLError):
    pass


NVMLError._map.update({3: NVMLError_NotSupported, 10: NVMLError_Timeout, 12: NVMLError_LibraryNotFound,
                       15: NVMLError_GpuIsLost, 2: NVMLError_InvalidArgument})


# ---- state
@dataclass
class FakeGpu:
    """One GPU's readings, in NVML's units. Set a field to UNSUPPORTED to make its read raise."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    util_gpu: Any = 97
    util_mem: Any = 41
    mem_total: int = 85520809984  # bytes (an H100 80GB reports this)
    mem_used: int = 60 * (1 << 30)
    temp_c: Any = 62
    power_mw: Any = 512345
    power_limit_mw: Any = 700000
    sm_clock_mhz: Any = 1980
    throttle: Any = 0
    ecc: dict[tuple[int, int], Any] = field(default_factory=dict)  # (error type, counter type) -> count
    retired: dict[int, list[int]] | Any = field(default_factory=dict)  # cause -> page addresses
    remapped: Any = (0, 0, 0, 0)  # corrected rows, uncorrected rows, pending, failure
    nvlinks: int = 18  # active links (H100 SXM: 18)
    nvlink_errors: dict[tuple[int, int], int] = field(default_factory=dict)  # (link, counter) -> count
    lost: bool = False
    denied: bool = False  # another job's GPU behind Slurm's device cgroup: NVML_ERROR_NO_PERMISSION


@dataclass
class EventData:
    """As pynvml's c_nvmlEventData_t: device handle, event type, and the Xid code in eventData."""

    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int = 0
    computeInstanceId: int = 0


@dataclass(frozen=True)
class _Handle:
    index: int


gpus: list[FakeGpu] = []
pending_xids: list[tuple[int, int]] = []  # (gpu index, xid)
driver_version = "570.124.06"
initialised = False
absent = False  # True: nvmlInit raises NVML_ERROR_LIBRARY_NOT_FOUND, like a machine without a driver


def install(n: int = 8, **kw: Any) -> list[FakeGpu]:
    """Reset the fake to ``n`` healthy GPUs (field overrides in ``kw``); returns them for the test to change."""
    global absent, initialised
    absent, initialised = False, False
    pending_xids.clear()
    gpus[:] = [FakeGpu(uuid=f"GPU-fake{i:04d}-0000-0000-0000-00000000000{i % 10}", **kw) for i in range(n)]
    return gpus


def inject_xid(index: int, xid: int) -> None:
    pending_xids.append((index, xid))


def _gpu(handle: _Handle) -> FakeGpu:
    if not initialised:
        raise NVMLError(1)  # NVML_ERROR_UNINITIALIZED
    g = gpus[handle.index]
    if g.denied:
        raise NVMLError(NVML_ERROR_NO_PERMISSION)
    if g.lost:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    return g


def _v(value: Any) -> Any:
    if value is UNSUPPORTED:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return value


@dataclass
class c_nvmlUtilization_t:
    gpu: int
    memory: int


@dataclass
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


# ---- API (same names and positional parameters as pynvml)
def nvmlInit() -> None:
    global initialised
    if absent:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    initialised = True


def nvmlShutdown() -> None:
    global initialised
    initialised = False


def nvmlSystemGetDriverVersion() -> str:
    return driver_version


def nvmlDeviceGetCount() -> int:
    return len(gpus)


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    if not 0 <= index < len(gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(index)


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    return _gpu(handle).uuid


def nvmlDeviceGetName(handle: _Handle) -> str:
    return _gpu(handle).name


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> c_nvmlUtilization_t:
    g = _gpu(handle)
    return c_nvmlUtilization_t(_v(g.util_gpu), _v(g.util_mem))


def nvmlDeviceGetMemoryInfo(handle: _Handle, version: Any = None) -> c_nvmlMemory_t:
    g = _gpu(handle)
    return c_nvmlMemory_t(g.mem_total, g.mem_total - g.mem_used, g.mem_used)


def nvmlDeviceGetTemperature(handle: _Handle, sensor: int) -> int:
    return int(_v(_gpu(handle).temp_c))


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    return int(_v(_gpu(handle).power_mw))


def nvmlDeviceGetEnforcedPowerLimit(handle: _Handle) -> int:
    return int(_v(_gpu(handle).power_limit_mw))


def nvmlDeviceGetClockInfo(handle: _Handle, type: int) -> int:
    return int(_v(_gpu(handle).sm_clock_mhz))


def nvmlDeviceGetCurrentClocksThrottleReasons(handle: _Handle) -> int:
    return int(_v(_gpu(handle).throttle))


def nvmlDeviceGetCurrentClocksEventReasons(handle: _Handle) -> int:
    return int(_v(_gpu(handle).throttle))


def nvmlDeviceGetTotalEccErrors(handle: _Handle, errorType: int, counterType: int) -> int:
    g = _gpu(handle)
    return int(_v(g.ecc.get((errorType, counterType), 0)))


def nvmlDeviceGetRetiredPages(device: _Handle, sourceFilter: int) -> list[int]:
    g = _gpu(device)
    return list(_v(g.retired).get(sourceFilter, []))


def nvmlDeviceGetRemappedRows(device: _Handle) -> tuple[int, int, int, int]:
    return tuple(_v(_gpu(device).remapped))


def nvmlDeviceGetNvLinkState(device: _Handle, link: int) -> int:
    g = _gpu(device)
    if link >= g.nvlinks:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return 1


def nvmlDeviceGetNvLinkErrorCounter(device: _Handle, link: int, counter: int) -> int:
    return _gpu(device).nvlink_errors.get((link, counter), 0)


def nvmlEventSetCreate() -> list[int]:
    return []


def nvmlDeviceRegisterEvents(handle: _Handle, eventTypes: int, eventSet: Any) -> None:
    _gpu(handle)


def nvmlEventSetWait_v2(eventSet: Any, timeoutms: int) -> EventData:
    if not pending_xids:
        raise NVMLError(NVML_ERROR_TIMEOUT)
    index, xid = pending_xids.pop(0)
    return EventData(device=_Handle(index), eventType=nvmlEventTypeXidCriticalError, eventData=xid)


def nvmlEventSetFree(eventSet: Any) -> None:
    pass
