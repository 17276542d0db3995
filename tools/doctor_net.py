"""The preflight's all-reduce bandwidth test across every rank of the allocation, and which node is slowest.

Bandwidth as nccl-tests computes it (doc/PERFORMANCE.md there): ``algbw = bytes / time`` and, for
all-reduce, ``busbw = algbw * 2 (n - 1) / n``, which is comparable across rank counts and with the
hardware's link speed. The time is the slowest rank's mean over the timed iterations.

One all-reduce over everyone says the allocation is slow, not where. To name a node, each node is
also measured on its own: an all-reduce inside the node (when it has several ranks), all-reduces
between pairs of nodes (when there are three or more nodes: two rounds of neighbours, so each node
is paired twice and a bad node is the one slow in both of its pairs), and a device-memory copy per
rank. Each measure is divided by its median over nodes; a node's score is its worst ratio and the
slowest node is the lowest score. With two nodes of one rank the inter-node link cannot be blamed
on either end: only the copy test separates them, and the report says so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from kit.faults import fault_point


@dataclass(slots=True)
class NetResult:
    world_size: int
    nbytes: int
    time_s: float
    algbw_gbps: float
    busbw_gbps: float
    nodes: list[str]
    node_scores: dict[str, float] = field(default_factory=dict)
    node_measures: dict[str, dict[str, float]] = field(default_factory=dict)
    slowest_node: str = ""
    note: str = ""


def busbw(nbytes: int, seconds: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes, as nccl-tests) of an all-reduce of ``nbytes`` on ``n`` ranks."""
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * 2 * (n - 1) / n


def _device() -> Any:
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_allreduce(buf: Any, iters: int, group: Any, rank: int, point: str = "doctor.allreduce") -> float:
    """Mean seconds per all-reduce on this rank (2 warm-ups, a barrier, then ``iters`` timed); ``point``
    is the fault point inside the timed loop (kit.faults: tests slow one rank's loop with it)."""
    import torch.distributed as dist

    for _ in range(2):
        dist.all_reduce(buf, group=group)
    _sync()
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        fault_point(point, 0, rank)
        dist.all_reduce(buf, group=group)
    _sync()
    return (time.perf_counter() - t0) / iters


def _max_over(value: float, group: Any = None) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _copy_gbps(buf: Any, iters: int, rank: int) -> float:
    """Device-memory copy bandwidth of this rank (read + write bytes per second, GB/s)."""
    dst = buf.clone()
    _sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fault_point("doctor.copy", 0, rank)
        dst.copy_(buf)
    _sync()
    return 2 * buf.numel() * buf.element_size() * iters / (time.perf_counter() - t0) / 1e9


def measure(node: str, nbytes: int, iters: int) -> NetResult:
    """Run on every rank of an initialised process group; every rank returns the same result."""
    import torch
    import torch.distributed as dist

    rank, n = dist.get_rank(), dist.get_world_size()
    names: list[Any] = [None] * n
    dist.all_gather_object(names, node)
    nodes = list(dict.fromkeys(names))  # node order: by first rank
    buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=_device())
    nbytes = buf.numel() * 4
    t = _max_over(_timed_allreduce(buf, iters, None, rank))
    algbw, bus = busbw(nbytes, t, n)
    per_node: dict[str, dict[str, float]] = {x: {} for x in nodes}
    # device copy, per rank, worst rank of each node
    copies: list[Any] = [None] * n
    dist.all_gather_object(copies, _copy_gbps(buf, iters, rank))
    for r, g in enumerate(copies):
        m = per_node[names[r]]
        m["copy_gbps"] = min(m.get("copy_gbps", float("inf")), float(g))
    ranks_of = {x: [r for r in range(n) if names[r] == x] for x in nodes}
    if len(nodes) == 1 and n > 1:  # the node's own all-reduce is the global one: do not run it twice
        per_node[nodes[0]]["intra_busbw_gbps"] = bus
    elif any(len(r) > 1 for r in ranks_of.values()):
        _sub_allreduce(buf, iters, rank, [ranks_of[x] for x in nodes], names, per_node, "intra_busbw_gbps")
    note = ""
    if len(nodes) >= 3:
        for rnd in (0, 1):
            pairs = [(nodes[i], nodes[(i + 1) % len(nodes)]) for i in range(rnd, len(nodes), 2)
                     if (rnd == 0 and i + 1 < len(nodes)) or rnd == 1]
            groups = [ranks_of[a] + ranks_of[b] for a, b in pairs]
            _sub_allreduce(buf, iters, rank, groups, names, per_node, "pair_busbw_gbps", keep=max)
    elif len(nodes) == 2:
        note = "two nodes: a slow link between them cannot be blamed on either; the node is named by its copy test"
    scores, slowest = _scores(per_node)
    return NetResult(world_size=n, nbytes=nbytes, time_s=t, algbw_gbps=algbw, busbw_gbps=bus, nodes=nodes,
                     node_scores=scores, node_measures=per_node, slowest_node=slowest, note=note)


def _sub_allreduce(buf: Any, iters: int, rank: int, groups: list[list[int]], names: list[Any],
                   per_node: dict[str, dict[str, float]], key: str, keep: Any = min) -> None:
    """All-reduce inside disjoint rank groups at once; record each group's busbw for its nodes.
    Every rank creates every group (torch requires it), and ranks outside all groups only wait."""
    import torch.distributed as dist

    handles = [dist.new_group(g) for g in groups]
    mine = next((i for i, g in enumerate(groups) if rank in g), None)
    result = -1.0
    if mine is not None and len(groups[mine]) > 1:
        t = _max_over(_timed_allreduce(buf, iters, handles[mine], rank), handles[mine])
        result = busbw(buf.numel() * 4, t, len(groups[mine]))[1]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    for r, bw in enumerate(everyone):
        if bw >= 0:
            m = per_node[names[r]]
            m[key] = keep(m[key], bw) if key in m else bw
    for h in handles:
        dist.destroy_process_group(h)


def _scores(per_node: dict[str, dict[str, float]]) -> tuple[dict[str, float], str]:
    """Each measure over its median across nodes; a node's score is its worst ratio (1.0 = typical)."""
    keys = sorted({k for m in per_node.values() for k in m})
    medians = {k: statistics.median([m[k] for m in per_node.values() if k in m]) for k in keys}
    scores = {}
    for node, m in per_node.items():
        ratios = [m[k] / medians[k] for k in keys if k in m and medians[k] > 0]
        scores[node] = round(min(ratios), 4) if ratios else 1.0
    slowest = min(scores, key=lambda x: scores[x]) if scores else ""
    return scores, slowest
