"""The preflight's checks of the links a tensor x pipeline layout uses: all-reduce inside each tensor
group, point-to-point between pipeline neighbours.

Why: the global all-reduce of kit.tools.doctor_net measures the data-parallel path, but at a layout
with tensor > 1 every block's forward and backward all-reduces inside its tensor group (the node's
NVLink when the group stays in a node), and with pipeline > 1 every micro-batch's activations go from
one stage to the next by send/recv. A slow NVLink or a bad link between two stages slows the whole
run and is invisible to the global test. Each group is measured and named by its coordinates
(kit.parallel.layout: ``tensor(pipeline=0,data=1)``, ``pipeline(tensor=0,data=1) 0->1``), its ranks
and its nodes, so that the operator sees which link is slow.

All groups of one kind run at once (they are disjoint); pipeline pairs run in two rounds (even then
odd stages), so each rank is in at most one pair at a time. Bandwidth: tensor groups as nccl-tests'
all-reduce busbw; pipeline pairs as bytes / one-way time (half a round trip), as nccl-tests' sendrecv.
A group slower than :data:`SLOW_RATIO` of its dimension's median is a WARN naming it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from kit.faults import fault_point
from kit.parallel.layout import Layout
from kit.tools.doctor_checks import NA, OK, WARN, Check
from kit.tools.doctor_net import _max_over, _sync, _timed_allreduce, busbw

SLOW_RATIO = 0.5
"""A group below this fraction of its dimension's median bandwidth is named as slow (WARN)."""
REPEATS = 3
"""Each group is measured this many times and keeps its best: a slow link is slow every time, a busy
moment is not (one measurement flagged healthy groups on a loaded machine)."""


@dataclass(slots=True)
class GroupResult:
    """One measured group: a tensor group's all-reduce or one pipeline neighbour pair's send/recv."""

    dim: str  # "tensor" or "pipeline"
    name: str
    ranks: list[int]
    nodes: list[str]
    time_ms: float
    gbps: float
    ratio: float = 1.0  # gbps over the median group of the same dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensor_groups(layout: Layout) -> dict[str, list[int]]:
    """Every tensor group's name and ranks, in a fixed order (every rank must create them alike)."""
    return {f"tensor(pipeline={p},data={d})": [layout.rank(t, p, d) for t in range(layout.tensor)]
            for d in range(layout.data) for p in range(layout.pipeline)}


def pipeline_pairs(layout: Layout) -> list[dict[str, tuple[int, int]]]:
    """Neighbour pairs (stage s sends to s + 1) in two rounds: even s, then odd s."""
    rounds: list[dict[str, tuple[int, int]]] = [{}, {}]
    for d in range(layout.data):
        for t in range(layout.tensor):
            for s in range(layout.pipeline - 1):
                rounds[s % 2][f"pipeline(tensor={t},data={d}) {s}->{s + 1}"] = (layout.rank(t, s, d),
                                                                               layout.rank(t, s + 1, d))
    return [r for r in rounds if r]


def measure_layout(layout: Layout, node: str, nbytes: int, iters: int) -> list[GroupResult]:
    """Run on every rank of an initialised process group of ``layout.world`` ranks; every rank
    returns the same results (tensor groups first, then pipeline pairs)."""
    import torch
    import torch.distributed as dist

    from kit.tools.doctor_net import _device

    rank, n = dist.get_rank(), dist.get_world_size()
    names: list[Any] = [None] * n
    dist.all_gather_object(names, node)
    buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=_device())
    nbytes = buf.numel() * 4
    best: dict[str, GroupResult] = {}
    for _ in range(REPEATS):
        tries: list[GroupResult] = []
        if layout.tensor > 1:
            tries += _tensor(layout, buf, iters, rank, names)
        if layout.pipeline > 1:
            for pairs in pipeline_pairs(layout):
                tries += _p2p_round(pairs, buf, iters, rank, names)
        for g in tries:  # the same on every rank: every rank saw the same gathered times
            if g.name not in best or g.gbps > best[g.name].gbps:
                best[g.name] = g
    results = list(best.values())
    for dim in ("tensor", "pipeline"):
        mine = [g for g in results if g.dim == dim]
        med = statistics.median([g.gbps for g in mine]) if mine else 0.0
        for g in mine:
            g.ratio = round(g.gbps / med, 4) if med > 0 else 1.0
    return results


def _tensor(layout: Layout, buf: Any, iters: int, rank: int, names: list[Any]) -> list[GroupResult]:
    import torch.distributed as dist

    groups = tensor_groups(layout)
    handles = {k: dist.new_group(r) for k, r in groups.items()}
    mine = next(k for k, r in groups.items() if rank in r)
    t = _max_over(_timed_allreduce(buf, iters, handles[mine], rank, point="doctor.tensor"), handles[mine])
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine, t))
    times = dict(everyone)
    for h in handles.values():
        dist.destroy_process_group(h)
    nbytes = buf.numel() * 4
    return [GroupResult("tensor", k, r, _nodes(r, names), round(times[k] * 1e3, 4),
                        round(busbw(nbytes, times[k], len(r))[1], 4)) for k, r in groups.items()]


def _p2p_round(pairs: dict[str, tuple[int, int]], buf: Any, iters: int, rank: int,
               names: list[Any]) -> list[GroupResult]:
    """Ping-pong inside each pair at once: the lower stage sends, the upper sends back; the one-way
    time is half the round trip, the slower end's view."""
    import torch.distributed as dist

    mine = next(((k, a, b) for k, (a, b) in pairs.items() if rank in (a, b)), None)
    one_way = -1.0
    if mine is not None:
        k, a, b = mine
        peer, first = (b, True) if rank == a else (a, False)
        other = buf.clone()
        for i in range(2 + iters):
            if i == 2:
                _sync()
                t0 = time.perf_counter()
            if i >= 2:
                fault_point("doctor.p2p", 0, rank)
            if first:
                dist.send(buf, peer)
                dist.recv(other, peer)
            else:
                dist.recv(other, peer)
                dist.send(buf, peer)
        _sync()
        one_way = (time.perf_counter() - t0) / iters / 2
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine[0] if mine else "", one_way))
    worst: dict[str, float] = {}
    for k, t in everyone:
        if k:
            worst[k] = max(worst.get(k, 0.0), t)
    nbytes = buf.numel() * 4
    return [GroupResult("pipeline", k, list(r), _nodes(list(r), names), round(worst[k] * 1e3, 4),
                        round(nbytes / worst[k] / 1e9, 4)) for k, r in pairs.items()]


def _nodes(ranks: list[int], names: list[Any]) -> list[str]:
    return list(dict.fromkeys(str(names[r]) for r in ranks))


def layout_checks(results: list[GroupResult], layout: Layout, nbytes: int, node: str) -> list[Check]:
    """``net.tensor`` and ``net.pipeline``: OK naming the slowest group, or WARN naming the groups
    below :data:`SLOW_RATIO` of the median (their ranks and nodes)."""
    checks = []
    what = {"tensor": f"all-reduce of {nbytes / 2**20:.0f} MiB in each tensor group of {layout.tensor} ranks",
            "pipeline": f"send/recv of {nbytes / 2**20:.0f} MiB between pipeline neighbours (one way)"}
    for dim in ("tensor", "pipeline"):
        mine = [g for g in results if g.dim == dim]
        if not mine:
            continue
        worst = min(mine, key=lambda g: g.gbps)
        med = statistics.median([g.gbps for g in mine])
        detail = (f"{what[dim]}: {len(mine)} groups, median {med:.2f} GB/s, slowest {_named(worst)}")
        slow = [g for g in mine if g.ratio < SLOW_RATIO]
        if slow:
            checks.append(Check(f"net.{dim}", WARN, f"{detail}; below {SLOW_RATIO:.0%} of the median: "
                                + "; ".join(_named(g) for g in slow), value=worst.name, node=node))
        else:
            checks.append(Check(f"net.{dim}", OK, detail, value=worst.name, node=node))
    return checks


def _named(g: GroupResult) -> str:
    return (f"{g.name} (ranks {','.join(map(str, g.ranks))} on {','.join(g.nodes)}): "
            f"{g.gbps:.2f} GB/s, {g.time_ms:.2f} ms, {g.ratio:.2f} x median")


def not_measured(tensor: int, pipeline: int, world: int, node: str) -> list[Check]:
    """The recipe's layout does not fit this preflight's ranks (``kit doctor`` from a login node)."""
    return [Check(f"net.{dim}", NA, f"parallel.tensor x parallel.pipeline = {tensor} x {pipeline} does not divide "
                  f"this preflight's {world} rank(s): the {dim} links are measured when the segment's ranks run it",
                  node=node)
            for dim, deg in (("tensor", tensor), ("pipeline", pipeline)) if deg > 1]
