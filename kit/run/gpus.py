"""GPU health samples, read tolerantly, ranked worst first.

A ``health`` event is one node's sample (kit.health's sampler, one ledger file per node): ``node``, a
list ``gpus`` of per-GPU readings (``null`` where NVML is absent) and ``host`` readings. Field names
are kit.health's (``temp_c``, ``util_pct``, ``mem_used_gib``, ``ecc_vol_unc``, ``xid``, ``lost``...);
a few plain aliases (``temp``, ``util``...) are accepted too, so that a sampler that evolves does not
blank the table. Whatever is missing or not a number is N/A, never an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

NA = "N/A"
HOT_C = 85.0  # A100/H100 slow down around 85-90 C
ALIASES: dict[str, tuple[str, ...]] = {
    "index": ("index", "gpu", "idx", "i"),
    "uuid": ("uuid",),
    "temp": ("temp_c", "temp", "temperature"),
    "power": ("power_w", "power"),
    "power_limit": ("power_limit_w", "power_limit"),
    "util": ("util_pct", "util", "utilization"),
    "mem_used": ("mem_used_gib", "mem_used"),  # GiB
    "mem_total": ("mem_total_gib", "mem_total"),  # GiB
    "sm_clock": ("sm_clock_mhz", "sm_clock"),
    "throttle": ("throttle", "throttle_reasons"),
    "ecc": ("ecc_vol_unc", "ecc"),
    "ecc_agg": ("ecc_agg_unc",),
    "xid": ("xid", "xids"),
}
# NVML throttle reasons that mean the hardware is slowing the GPU (not idle or the application's cap)
HW_THROTTLE_BITS = 0x8 | 0x20 | 0x40 | 0x80  # HW slowdown, SW thermal, HW thermal, HW power brake
THROTTLE_NAMES = {0x1: "idle", 0x2: "app", 0x4: "sw-power", 0x8: "hw-slow", 0x20: "sw-thermal",
                  0x40: "hw-thermal", 0x80: "power-brake"}


def pick(d: dict[str, Any], name: str) -> Any:
    for key in ALIASES[name]:
        if key in d:
            return d[key]
    return None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _count(v: Any) -> float | None:
    """An error count that may be a number, a list of events, or a dict of counters."""
    if isinstance(v, list):
        return float(len(v))
    if isinstance(v, dict):
        vals = [_num(x) for x in v.values()]
        nums = [x for x in vals if x is not None]
        return sum(nums) if nums else None
    return _num(v)


def _throttle(v: Any) -> tuple[str, bool]:
    """(label, hardware-caused) from a bitmask, a list of names or a string."""
    if isinstance(v, bool) or v is None:
        return "", False
    if isinstance(v, int):
        names = [n for bit, n in THROTTLE_NAMES.items() if v & bit and bit != 0x1]
        return ",".join(names), bool(v & HW_THROTTLE_BITS)
    if isinstance(v, list):
        names = [str(x) for x in v if str(x) not in ("idle", "gpu_idle", "none")]
        return ",".join(names)[:40], any(("hw" in n or "thermal" in n or "brake" in n) for n in names)
    if isinstance(v, str):
        return v[:40], ("hw" in v or "thermal" in v)
    return "", False


@dataclass(slots=True)
class GpuHealth:
    index: int
    uuid: str = ""
    temp: float | None = None
    power: float | None = None
    power_limit: float | None = None
    util: float | None = None
    mem_used: float | None = None
    mem_total: float | None = None
    sm_clock: float | None = None
    throttle: str = ""
    hw_throttle: bool = False
    ecc: float | None = None
    ecc_agg: float | None = None
    xid: float | None = None
    xid_codes: str = ""
    lost: bool = False
    remap: bool = False  # row remapping pending or failed: the GPU needs a reset

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append("lost")
        if self.remap:
            out.append("remap")
        if self.xid:
            out.append("xid")
        if self.ecc:
            out.append("ecc")
        if self.temp is not None and self.temp >= HOT_C:
            out.append("hot")
        if self.hw_throttle:
            out.append("throttle")
        return out

    def badness(self) -> float:
        """Sort key: errors first, then heat and throttling, then idleness."""
        score = 2000.0 * self.lost + 1000.0 * bool(self.xid) + 500.0 * bool(self.ecc) + 300.0 * self.remap
        score += 100.0 * self.hw_throttle
        score += max(0.0, (self.temp or 0.0) - 60.0)
        if self.util is not None:
            score += (100.0 - self.util) / 10.0
        return score


@dataclass(slots=True)
class NodeHealth:
    node: str
    t: float
    gpus: list[GpuHealth] = field(default_factory=list)
    host: dict[str, float | None] = field(default_factory=dict)


def parse_health(node: str, t: float, e: dict[str, Any]) -> NodeHealth:
    raw = e.get("gpus")
    if raw is None:
        raw = e.get("gpu", e.get("devices"))
    gpus: list[GpuHealth] = []
    if isinstance(raw, list):
        for i, g in enumerate(raw[:64]):
            if isinstance(g, dict):
                gpus.append(_gpu(i, g))
    host = e.get("host")
    h = {k: _num(v) for k, v in host.items()} if isinstance(host, dict) else {}
    return NodeHealth(node, t, gpus, h)


def _gpu(i: int, g: dict[str, Any]) -> GpuHealth:
    idx = pick(g, "index")
    label, hw = _throttle(pick(g, "throttle"))
    uuid = pick(g, "uuid")
    return GpuHealth(
        index=idx if isinstance(idx, int) and not isinstance(idx, bool) else i,
        uuid=uuid if isinstance(uuid, str) else "",
        temp=_num(pick(g, "temp")), power=_num(pick(g, "power")), power_limit=_num(pick(g, "power_limit")),
        util=_num(pick(g, "util")), mem_used=_num(pick(g, "mem_used")), mem_total=_num(pick(g, "mem_total")),
        sm_clock=_num(pick(g, "sm_clock")), throttle=label, hw_throttle=hw,
        ecc=_count(pick(g, "ecc")), ecc_agg=_count(pick(g, "ecc_agg")), xid=_count(pick(g, "xid")),
        xid_codes=",".join(str(x) for x in xid[:6]) if isinstance(xid := pick(g, "xid"), list) else "",
        lost=g.get("lost") is True, remap=g.get("remap_pending") is True or g.get("remap_failed") is True,
    )


def fmt(v: float | None, spec: str = ".0f", unit: str = "") -> str:
    return NA if v is None else f"{v:{spec}}{unit}"


def mem_text(g: GpuHealth) -> str:
    """Memory as used/total GiB (the sampler writes GiB)."""
    if g.mem_used is None:
        return NA
    return f"{g.mem_used:.1f}/{g.mem_total:.0f}G" if g.mem_total else f"{g.mem_used:.1f}G"


def worst_first(nodes: dict[str, NodeHealth], flagged: set[str] | None = None) -> list[tuple[NodeHealth, GpuHealth]]:
    """Every GPU of every node, the worst at the top; flagged nodes (stragglers, suspects) rank higher."""
    flagged = flagged or set()
    rows = [(n, g) for n in nodes.values() for g in n.gpus]
    rows.sort(key=lambda r: (-(r[1].badness() + (200.0 if r[0].node in flagged else 0.0)), r[0].node, r[1].index))
    return rows
