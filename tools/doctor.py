"""``kit doctor``: the preflight that runs on every node at the start of every segment, and on demand.

Why: a run of months dies of silent version drift and of bad nodes found after hours. Before a
segment trains, every rank calls :func:`preflight`; node-local checks run once per node (versions
against containers/pins.toml, GPUs through NVML, the checkpoint filesystem), then every rank takes
part in an all-reduce bandwidth test, and the verdict is agreed by all ranks: if any node failed,
every rank gets ``ok = False`` and the list of nodes to exclude, and the segment ends with
:data:`kit.exitcodes.PREFLIGHT` (76), which the chain reads as "exclude these nodes and resubmit",
not as a training failure. Results go to the ledger (kind ``doctor``), one file per node.

On a CPU machine the same code runs with gloo and reports NVML as absent ("na"), never a crash.
From a login node, ``kit doctor RECIPE_OR_RUN`` runs it in one process; ``kit doctor --static``
(the images' %test) compares only the versions with the pins.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from kit import envvars, exitcodes
from kit.config import RunConfig
from kit.dist import DistEnv
from kit.errors import ConfigError, KitError
from kit.tools.doctor_checks import FAIL, NA, OK, WARN, Check, Environment, probe_environment

IMAGE_ENV = envvars.IMAGE_TARGET  # set by the images' %environment: "we are inside the image of this target"


@dataclass(slots=True)
class Report:
    """What one rank concluded. ``ok`` and ``failed_nodes`` are the same on every rank."""

    ok: bool
    node: str
    rank: int
    world_size: int
    checks: list[Check] = field(default_factory=list)
    failed_nodes: list[str] = field(default_factory=list)
    shared_failures: list[str] = field(default_factory=list)  # fs.* checks every node failed: not the nodes'
    slowest_node: str = ""
    busbw_gbps: float | None = None
    algbw_gbps: float | None = None
    node_scores: dict[str, float] = field(default_factory=dict)
    node_measures: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float | None = None  # wall time of this rank's preflight (the goodput account's "preflight")
    layout: dict[str, int] = field(default_factory=dict)  # the recipe's layout at this world (empty: not one)
    groups: list[dict[str, Any]] = field(default_factory=list)  # tensor groups' and pipeline pairs' measures

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else exitcodes.PREFLIGHT

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "node": self.node, "rank": self.rank, "world_size": self.world_size,
                "failed_nodes": self.failed_nodes, "shared_failures": self.shared_failures,
                "slowest_node": self.slowest_node,
                "busbw_gbps": self.busbw_gbps, "algbw_gbps": self.algbw_gbps, "node_scores": self.node_scores,
                "node_measures": self.node_measures, "checks": [c.to_dict() for c in self.checks],
                "seconds": self.seconds, "layout": self.layout, "groups": self.groups}


def node_label(env: DistEnv) -> str:
    """The node's name: Slurm's node name, else the host name; with the node index appended when
    several "nodes" share a host (several slurmd or torchrun agents on one machine, as in tests)."""
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    index = os.environ.get("SLURM_NODEID") or os.environ.get("GROUP_RANK")
    if index is None:
        index = str(env.rank // max(1, env.local_world_size))
    return f"{host}#{index}" if "SLURMD_NODENAME" not in os.environ and _shared_host(env) else host


def _shared_host(env: DistEnv) -> bool:
    # Several nodes on one host: torchrun's multi-agent launch sets GROUP_RANK with fewer local ranks than ranks.
    return "GROUP_RANK" in os.environ and env.local_world_size < env.world_size


# --------------------------------------------------------------------------------------- local checks


def static_checks(target: str, strict: bool, environment: Environment | None = None,
                  driver: str | None = None) -> list[Check]:
    """Versions of this environment against the pins of ``target`` (what the images' %test runs)."""
    from kit.containers.pins import load_pins
    from kit.tools.doctor_checks import check_versions

    pins = load_pins()
    env = environment or probe_environment()
    if driver is not None:
        env.driver = driver
    return check_versions(pins, target, env, strict=strict)


def node_checks(cfg: RunConfig, run_dir: Path, *, expect_gpus: int, nvml: Any = None,
                environment: Environment | None = None, tag: str = "") -> list[Check]:
    """Everything checked once per node: image, GPUs, versions, checkpoint filesystem."""
    from kit.containers.pins import load_pins
    from kit.model import sizing
    from kit.tools.doctor_checks import check_build_locks, check_filesystem, check_gpus

    checks: list[Check] = []
    inside = os.environ.get(IMAGE_ENV, "")
    target = cfg.container.target or inside
    gpu_name = load_pins().target(target).gpu_name if target else ""
    if cfg.container.image and not inside:
        checks.append(Check("image.inside", FAIL if expect_gpus else WARN,
                            f"not running inside container.image {cfg.container.image} ({IMAGE_ENV} is unset)"))
    if inside and cfg.container.target and inside != cfg.container.target:
        checks.append(Check("image.target", FAIL, f"inside the {inside!r} image, the recipe's container.target "
                            f"is {cfg.container.target!r}"))
    gpus, driver = check_gpus(expect_gpus, cfg.doctor.bad_gpu_uuids, gpu_name, nvml=nvml)
    checks += gpus
    if target:
        checks += static_checks(target, strict=bool(inside), environment=environment, driver=driver)
    else:
        checks.append(Check("versions", NA, "container.target is empty: nothing pinned to compare with"))
    s = sizing(cfg)
    n = cfg.doctor.min_free_checkpoints
    files_per_ckpt = 2 * int(s["world_size"]) + 4  # model + optimizer + RNG file per rank, manifest, latest
    checks += check_filesystem(run_dir / "checkpoints", n * float(s["checkpoint_bytes"]), int(n * files_per_ckpt),
                               int(cfg.doctor.probe_mib * 2**20), cfg.doctor.min_write_mbps, tag or "x")
    checks += check_build_locks()
    return checks


# ------------------------------------------------------------------------------------------ preflight


def preflight(cfg: RunConfig, run_dir: str | Path, env: DistEnv, *, expect_gpus: int | None = None,
              nvml: Any = None, environment: Environment | None = None, ledger: str | None = "",
              seg: str = "") -> Report:
    """Run the preflight on this rank; call it on every rank of the segment (the all-reduce and the
    verdict are collective). Initialises torch.distributed when it is not (NCCL on GPUs, gloo
    otherwise) and leaves it initialised: DeepSpeed reuses an initialised process group.

    ``ledger``: the ledger writer's name ("" = ``doctor-r<rank>``, None = write nothing); only each
    node's first rank writes. Returns the report; ``report.exit_code`` is 0 or PREFLIGHT.
    """
    t0 = time.monotonic()
    run_dir = Path(run_dir)
    node = node_label(env)
    expect = cfg.slurm.gpus_per_node if expect_gpus is None else expect_gpus
    checks: list[Check] = []
    if env.local_rank == 0:
        checks = [*node_checks(cfg, run_dir, expect_gpus=expect, nvml=nvml, environment=environment,
                               tag=f"{node.replace('#', '-')}-r{env.rank}")]
    for c in checks:
        c.node = node
    report = Report(ok=True, node=node, rank=env.rank, world_size=env.world_size, checks=checks)
    try:
        _init_group(env, cfg.doctor.timeout_s)
        _network(cfg, node, report)
        _agree(report)
    except (RuntimeError, TimeoutError, OSError) as e:  # a dead peer: rendezvous or collective failed
        report.checks.append(Check("net.collective", FAIL, f"process group or all-reduce failed: {e}", node=node))
        # The missing peer is unknown here; this node is to blame only for its own local failures.
        local = [c for c in report.failures if not c.name.startswith("net.")]
        report.failed_nodes = [node] if local else []
    report.ok = not report.failures and not report.failed_nodes and not report.shared_failures  # same on every rank
    report.seconds = round(time.monotonic() - t0, 3)
    if ledger is not None and env.local_rank == 0 and (run_dir / "run.toml").exists():
        _to_ledger(report, run_dir, ledger or f"doctor-r{env.rank}", seg)
    return report


def _init_group(env: DistEnv, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # env:// (not tcp://) so that under torchrun the ranks join the agent's store instead of racing it for the port
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))


def _network(cfg: RunConfig, node: str, report: Report) -> None:
    from kit.tools.doctor_net import measure

    d = cfg.doctor
    r = measure(node, int(d.allreduce_mib * 2**20), d.allreduce_iters)
    report.busbw_gbps, report.algbw_gbps = round(r.busbw_gbps, 4), round(r.algbw_gbps, 4)
    report.slowest_node, report.node_scores = r.slowest_node, r.node_scores
    report.node_measures = {k: {m: round(v, 4) for m, v in ms.items()} for k, ms in r.node_measures.items()}
    detail = (f"all-reduce of {r.nbytes / 2**20:.0f} MiB on {r.world_size} ranks / {len(r.nodes)} nodes: "
              f"{r.time_s * 1e3:.2f} ms, algbw {r.algbw_gbps:.2f} GB/s, busbw {r.busbw_gbps:.2f} GB/s")
    if r.world_size == 1:
        report.checks.append(Check("net.busbw", NA, detail + " (one rank: busbw is 0 by definition)", node=node))
    elif d.min_busbw_gbps and r.busbw_gbps < d.min_busbw_gbps:
        report.checks.append(Check("net.busbw", FAIL, detail + f", below doctor.min_busbw_gbps {d.min_busbw_gbps}; "
                                   f"slowest node {r.slowest_node}", value=r.busbw_gbps, node=node))
    else:
        report.checks.append(Check("net.busbw", OK, detail, value=r.busbw_gbps, node=node))
    scores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.node_scores.items(), key=lambda kv: kv[1]))
    report.checks.append(Check("net.slowest_node", OK, f"{r.slowest_node} (scores vs the median node: {scores})"
                               + (f"; {r.note}" if r.note else ""), value=r.slowest_node, node=node))
    _layout_links(cfg, node, r.world_size, report)


def _layout_links(cfg: RunConfig, node: str, world: int, report: Report) -> None:
    """At a layout with tensor or pipeline > 1: all-reduce in each tensor group, send/recv between
    pipeline neighbours (kit.tools.doctor_layout), each named by its coordinates."""
    from kit.parallel.layout import Layout
    from kit.tools.doctor_layout import layout_checks, measure_layout, not_measured

    t, p = cfg.parallel.tensor, cfg.parallel.pipeline
    if t == 1 and p == 1:
        return
    if world % (t * p):
        report.checks += not_measured(t, p, world, node)
        return
    layout = Layout.of(t, p, world)
    d = cfg.doctor
    nbytes = int(d.allreduce_mib * 2**20)
    groups = measure_layout(layout, node, nbytes, d.allreduce_iters)
    report.layout, report.groups = layout.to_dict(), [g.to_dict() for g in groups]
    report.checks += layout_checks(groups, layout, max(4, nbytes // 4 * 4), node)


def _agree(report: Report) -> None:
    """Every rank learns which nodes failed; a bandwidth failure blames the slowest node.

    A filesystem check (``fs.*``) that fails on every node of the allocation is the shared
    filesystem's problem (full, out of inodes, slow, a stale build lock), not the nodes': blaming them
    would make the chain exclude healthy nodes for the rest of the run. Those are ``shared_failures``.
    On a one-node allocation that is every node too: nothing shows the filesystem is the node's own,
    and a full shared disk must not get the only node excluded."""
    import torch.distributed as dist

    mine = (report.node, [c.name for c in report.failures if not c.name.startswith("net.")])
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    by_node: dict[str, set[str]] = {}
    for node, names in everyone:
        by_node.setdefault(node, set()).update(names)
    shared = {n for n in set().union(*by_node.values())
              if n.startswith("fs.") and all(n in names for names in by_node.values())}
    report.shared_failures = sorted(shared)
    failed = {node for node, names in by_node.items() if names - shared}
    if any(c.name == "net.busbw" and c.status == FAIL for c in report.checks) and report.slowest_node:
        failed.add(report.slowest_node)
    report.failed_nodes = sorted(failed)


def _to_ledger(report: Report, run_dir: Path, name: str, seg: str) -> None:
    from kit.ledger import LedgerWriter

    d = report.to_dict()
    with LedgerWriter(run_dir, name, seg=seg or os.environ.get(envvars.SEGMENT, "")) as led:
        led.emit("doctor", **d)
        if report.shared_failures and report.rank == 0:
            details = "; ".join(f"{c.name}: {c.detail}" for c in report.failures if c.name in report.shared_failures)
            led.alert("critical", f"preflight: {', '.join(report.shared_failures)} failed on every node "
                      f"({details}): a shared filesystem's problem, not the nodes' (none is excluded). Free "
                      "space or fix the filesystem as the check says; the chain retries with backoff and stops "
                      "after chain.crash_loop_limit tries", checks=report.shared_failures)


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("recipe", nargs="?", default="",
                   help="a recipe (.toml, or a name shipped in jobs/) or a run directory; not needed with --static")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set doctor.min_busbw_gbps=100 (repeatable)")
    p.add_argument("--static", action="store_true",
                   help="only compare this environment's versions with containers/pins.toml (the images' %%test)")
    p.add_argument("--target", default="", help="pin target for --static (default: $KIT_IMAGE_TARGET)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace, verb: str) -> int:
    if args.static:
        return _run_static(args)
    if not args.recipe:
        raise ConfigError("kit doctor needs a recipe or a run directory (or --static inside an image)")
    from kit import dist
    from kit.containers.apptainer import check_recipe
    from kit.rundir import RunDir

    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    rd = RunDir(args.recipe)
    if rd.exists():
        cfg, run_dir, where = rd.load_config(), rd.path, str(rd.run_toml)
    else:
        from kit.config import load_recipe

        cfg = load_recipe(args.recipe, args.overrides)
        run_dir, where = cfg.run_dir, args.recipe
    check_recipe(cfg, where)
    env = dist.from_environ()
    host = socket.gethostname().split(".")[0]
    report = preflight(cfg, run_dir, env, expect_gpus=None if launched else 0,
                       ledger="" if launched else f"doctor-cli-{host}")
    _leave_group(together=not any(c.name == "net.collective" for c in report.failures))
    _print(report, args.json)
    return report.exit_code


def _leave_group(together: bool) -> None:
    """End the process group the preflight opened, together, before the interpreter exits.

    Left to interpreter teardown, gloo's pair threads see the first rank to exit close its sockets
    and abort the others (SIGABRT after a verdict already written: a CI run saw it); torchrun then
    reports the whole preflight failed. A barrier first, so that no rank closes while a peer still
    reads; not when a collective already failed (``together`` False): a dead peer would make the
    barrier wait out the timeout again, and the verdict already says so."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if together:
        with contextlib.suppress(RuntimeError, OSError):
            dist.barrier()
    dist.destroy_process_group()


def _run_static(args: argparse.Namespace) -> int:
    target = args.target or os.environ.get(IMAGE_ENV, "")
    if not target:
        raise ConfigError(f"kit doctor --static needs --target (a100, h100) or {IMAGE_ENV} (set inside the images)")
    from kit.tools.doctor_checks import check_gpus

    _, driver = check_gpus(0, [])
    checks = static_checks(target, strict=True, driver=driver)
    report = Report(ok=not any(c.status == FAIL for c in checks), node=socket.gethostname(), rank=0, world_size=1,
                    checks=checks)
    _print(report, args.json)
    return report.exit_code


def _print(report: Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
        return
    width = max((len(c.name) for c in report.checks), default=10)
    for c in report.checks:
        print(f"{c.status.upper():4}  {c.name:<{width}}  {c.detail}")
    if report.ok:
        print(f"doctor: OK on {report.node} ({report.world_size} ranks)")
    else:
        exclude = (f"exclude {', '.join(report.failed_nodes)}" if report.failed_nodes else
                   f"{', '.join(report.shared_failures)} failed on every node: fix the shared filesystem"
                   if report.shared_failures else "see the FAIL lines")
        print(f"doctor: FAILED on {report.node}: {exclude} (exit {exitcodes.PREFLIGHT})")


class PreflightFailed(KitError):
    """Raised by callers that prefer an exception to an exit status."""

    exit_code = exitcodes.PREFLIGHT
