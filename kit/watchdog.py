"""Heartbeat and hang watchdog: one thread per rank that ends a segment in which no step completes.

BLOOM lost 35+ hours to hangs that never hit an NCCL timeout. A step is a natural heartbeat: the
trainer calls :meth:`Watchdog.beat` after every step (a few attribute writes, no I/O, no collective).
The watchdog thread of each rank checks that the last beat is younger than a bound derived from the
recent step times: ``clamp(health.hang_factor * median(step time), hang_floor_s, hang_ceiling_s)``
(the ceiling until a few steps are known, and while a checkpoint is being saved).

When the bound is passed, every rank's watchdog fires on its own (all ranks stall together: the
step's all-reduce waits for the stuck rank), and:

1. dumps the Python stacks of all its threads to ``<run>/stacks/<seg>-<stamp>/r00001.txt``
   (faulthandler; plus ``py-spy dump`` when py-spy is installed), a JSON header line first;
2. the reporting rank (rank 0, or the lowest rank that dumped if rank 0 never did) waits up to
   ``health.hang_grace_s`` for the other dumps, compares the main threads' stacks, and writes
   ``hang.json``, a ``hang`` event, a critical ``alert`` naming the ranks whose stacks differ from
   the rest (and their nodes), and ``segment_ended`` with reason ``hang``;
3. every rank exits with :data:`kit.exitcodes.HANG`: the chain resubmits excluding the suspect nodes.

Which ranks are suspects: ranks that never dumped (dead, or stuck in C code holding the GIL); else the
ranks whose main thread is NOT inside a collective while others wait in one (they are what the others
wait for); else the ranks outside the largest group of identical stacks. All ranks in the same
collective means the network or NCCL itself: no suspect node, the chain resubmits as is.

A last resort covers hangs that hold the GIL (the watchdog thread cannot run then): faulthandler's C
timer is armed at ``1.5 * ceiling + 2 * hang_grace_s``; it dumps to stderr (the Slurm log) and exits.

Setup is watched too (:func:`for_setup`): the watchdog starts before the first collective, with
``health.setup_timeout_s`` as its bound, so a rank stuck in the rendezvous, in NCCL's communicator
set-up, in DeepSpeed's initialisation or in loading a checkpoint ends the segment instead of holding
the allocation for its 20 hours. No collective can say where the other ranks are then: all ranks of
a launch agree on the stack folder from their environment (:func:`setup_stamp`), and nodes come from
``KIT_NODES`` (set by the chain's driver) or, on one machine, this host.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kit import envvars, exitcodes
from kit.config import HealthSection
from kit.fsio import atomic_write_json
from kit.ledger import LedgerWriter, writer_name
from kit.parallel.layout import Layout, placed
from kit.rundir import STACKS
from kit.stragglers import RankInfo

RING = 32  # step intervals kept for the median
MIN_HISTORY = 2  # intervals needed before the bound leaves the ceiling
REPORT = "hang.json"
_FRAME = re.compile(r'^\s+File "(?P<file>[^"]*)", line (?P<line>\d+) in (?P<func>\S+)')
_THREAD = re.compile(r"^(Current thread|Thread) (?P<ident>0x[0-9a-fA-F]+)")
COLLECTIVE_FUNCS = {"all_reduce", "barrier", "all_gather", "all_gather_object", "broadcast", "reduce_scatter",
                    "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast_object_list", "wait",
                    "all_to_all", "monitored_barrier", "send", "recv", "reduce"}


SETUP = "setup"  # the phase before the first step of a segment (bound: health.setup_timeout_s)


class Watchdog:
    """Per-rank hang detector. ``beat(step)`` from the training loop; ``start()`` and ``stop()`` around it."""

    def __init__(self, run_dir: str | Path, cfg: HealthSection, rank: int, ranks: list[RankInfo], seg: str,
                 stamp: str, exit_fn: Callable[[int], Any] = os._exit, poll_s: float | None = None,
                 last_resort: bool = True, phase: str = "start") -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.rank = rank
        self.ranks = ranks
        self.seg = seg or "local"
        self.folder = self.run_dir / STACKS / f"{self.seg}-{stamp}"
        self.exit_fn = exit_fn
        self.poll_s = poll_s or min(1.0, max(0.05, cfg.hang_floor_s / 10))
        self.last_resort = last_resort
        self.step = -1
        self.fired: dict[str, Any] | None = None
        self._ring = [0.0] * RING
        self._n = 0
        self._last = time.monotonic()
        self._phase: str | None = phase  # no interval is recorded for the first beat (setup is not a step)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._armed_at = 0.0

    # --------------------------------------------------------------------- called by the trainer
    def beat(self, step: int) -> None:
        """A step completed. Cheap on purpose: it runs every step on every rank."""
        now = time.monotonic()
        if self._phase is None:
            self._ring[self._n % RING] = now - self._last
            self._n += 1
        self._phase = None
        self._last = now
        self.step = step

    def long_phase(self, what: str) -> None:
        """Something that is not a step and may take long (a checkpoint save): the ceiling applies
        until the next beat, and that beat's interval is not taken as a step time."""
        self._phase = what
        self._last = time.monotonic()

    def setup_done(self, ranks: list[RankInfo]) -> None:
        """Setup is over (the rank table is known now): from here until the first step, the ceiling."""
        self.ranks = ranks
        self.long_phase("start")

    def ceiling(self) -> float:
        return self.cfg.setup_timeout_s if self._phase == SETUP else self.cfg.hang_ceiling_s

    def bound(self) -> float:
        cfg = self.cfg
        if self._phase is not None or self._n < MIN_HISTORY:
            return self.ceiling()
        hist = sorted(self._ring[: min(self._n, RING)])
        median = hist[len(hist) // 2]
        return min(max(cfg.hang_factor * median, cfg.hang_floor_s), cfg.hang_ceiling_s)

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._loop, name="kit-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.last_resort:
            faulthandler.cancel_dump_traceback_later()

    # ------------------------------------------------------------------------------- the thread
    def _loop(self) -> None:
        seen = -2
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            if self.last_resort and (self.step != seen or not self._armed_at) and \
                    now - self._armed_at > self.ceiling() / 4:
                seen, self._armed_at = self.step, now
                faulthandler.dump_traceback_later(1.5 * self.ceiling() + 2 * self.cfg.hang_grace_s, exit=True)
            stalled, bound = now - self._last, self.bound()
            if stalled > bound:
                self.fire(stalled, bound)
                return

    def fire(self, stalled: float, bound: float) -> dict[str, Any]:
        """Dump this rank's stacks, report (the reporting rank) or wait for the report, then exit."""
        if self.last_resort:
            faulthandler.cancel_dump_traceback_later()
        dump_stacks(self.folder, self._header(stalled, bound))
        report = self._await_report()
        self.fired = report
        self.exit_fn(exitcodes.HANG)
        return report

    def _header(self, stalled: float, bound: float) -> dict[str, Any]:
        me = self.ranks[self.rank] if self.rank < len(self.ranks) else RankInfo(self.rank, "?", 0, -1, os.getpid())
        return {"rank": self.rank, "host": me.host, "local_rank": me.local_rank, "gpu": me.gpu, "pid": os.getpid(),
                "step": self.step, "stalled_s": round(stalled, 3), "bound_s": round(bound, 3),
                "phase": self._phase or "step", "t": time.time(),
                "main_thread": f"0x{threading.main_thread().ident or 0:016x}"}

    def _await_report(self) -> dict[str, Any]:
        grace = self.cfg.hang_grace_s
        report_path = self.folder / REPORT
        if self.rank != 0:
            # Rank 0 reports; if it never does (stuck holding the GIL, or dead), the lowest rank that dumped does.
            deadline = time.monotonic() + 2 * grace
            while time.monotonic() < deadline:
                if report_path.exists():
                    return _read_json(report_path)
                time.sleep(0.1)
            if min(read_dumps(self.folder), default=self.rank) != self.rank:
                return {"reporter": None}
        deadline = time.monotonic() + grace
        while len(read_dumps(self.folder)) < len(self.ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        report = analyse(read_dumps(self.folder), self.ranks)
        report.update(reporter=self.rank, stacks=str(self.folder.relative_to(self.run_dir)))
        self._ledger(report)  # first: the other ranks exit when hang.json appears, and a launcher that sees
        # one rank exit may kill this one (srun --kill-on-bad-exit)
        atomic_write_json(report_path, report)
        return report

    def _ledger(self, r: dict[str, Any]) -> None:
        me = r["dumps"].get(self.rank, {})
        who = ", ".join(f"{k} ({_place(self.ranks[k])})" if k < len(self.ranks) else str(k) for k in r["suspect_ranks"])
        what = (f"setup did not finish in {me.get('stalled_s', '?')} s (health.setup_timeout_s = "
                f"{me.get('bound_s', '?')} s)" if me.get("phase") == SETUP else
                f"no step completed for {me.get('stalled_s', '?')} s (bound {me.get('bound_s', '?')} s) after "
                f"step {me.get('step', '?')}")
        msg = (f"hang: {what}; " + (f"suspect ranks {who}: {r['why']}" if who else r["why"]) +
               f"; stacks in {r['stacks']}; exiting with HANG ({exitcodes.HANG})" +
               (f" so the chain resubmits without {', '.join(r['suspect_nodes'])}" if r["suspect_nodes"] else ""))
        with LedgerWriter(self.run_dir, writer_name("watchdog", self.rank), seg=self.seg) as led:
            led.emit("hang", bound_s=me.get("bound_s"), stalled_s=me.get("stalled_s"), step=me.get("step"),
                     phase=me.get("phase"),
                     suspect_ranks=r["suspect_ranks"], suspect_nodes=r["suspect_nodes"],
                     suspect_coords=r.get("suspect_coords", []), missing_ranks=r["missing_ranks"],
                     groups=r["groups"], stacks=r["stacks"])
            led.alert("critical", msg, suspect_nodes=r["suspect_nodes"], suspect_ranks=r["suspect_ranks"],
                      suspect_coords=r.get("suspect_coords", []))
            led.emit("segment_ended", reason="hang", step=me.get("step", -1), exit_code=exitcodes.HANG,
                     suspect_nodes=r["suspect_nodes"])


def _place(info: RankInfo) -> str:
    """``node; tensor 1, pipeline 0, data 1`` (the node alone before the layout is known)."""
    return f"{info.host}; {info.coords}" if info.coords is not None else info.host


# -------------------------------------------------------------------------------------- setup
def setup_stamp(environ: Any = None) -> str:
    """A name every rank of one launch derives alike, without a collective: torchrun's run id, the
    Slurm job and restart count, the rendezvous port."""
    e = os.environ if environ is None else environ
    parts = [e.get("TORCHELASTIC_RUN_ID", "")[:8], e.get("SLURM_JOB_ID", ""), e.get("SLURM_RESTART_COUNT", ""),
             e.get("MASTER_PORT", "")]
    return "setup-" + "-".join(p for p in parts if p).replace("/", "_")


def setup_ranks(rank: int, world: int, local_world: int, environ: Any = None) -> list[RankInfo]:
    """The rank table as far as the environment knows it: nodes from ``KIT_NODES`` (rank r on node
    r // local_world), else this host for the ranks of this node and "?" for the others."""
    from kit.ledger import hostname

    e = os.environ if environ is None else environ
    nodes = [n for n in e.get(envvars.NODES, "").split(",") if n]
    per = max(1, local_world)

    def host(r: int) -> str:
        if nodes:
            return nodes[min(r // per, len(nodes) - 1)]
        return hostname() if r // per == rank // per else "?"  # this node's ranks are on this host

    return [RankInfo(r, host(r), r % per, -1, os.getpid() if r == rank else 0) for r in range(world)]


def for_setup(run_dir: str | Path, cfg: HealthSection, rank: int, world: int, local_world: int,
              seg: str, layout: tuple[int, int] = (1, 1)) -> Watchdog | None:
    """A started watchdog in the setup phase (None when ``health.watchdog`` is off); the trainer's
    JobHealth takes it over once setup is done. ``layout``: (tensor, pipeline) of the recipe, so that
    a hang in setup names the suspects' coordinates too (the rank order is arithmetic)."""
    if not cfg.watchdog:
        return None
    ranks = setup_ranks(rank, world, local_world)
    if world % (layout[0] * layout[1]) == 0:
        ranks = placed(ranks, Layout.of(layout[0], layout[1], world))
    return Watchdog(run_dir, cfg, rank, ranks, seg, setup_stamp(), phase=SETUP).start()


# ---------------------------------------------------------------------------------- stack files
def dump_stacks(folder: Path, header: dict[str, Any]) -> Path:
    """Write ``r<rank>.txt``: a JSON header line, faulthandler's dump of every thread, py-spy's if installed.
    Written under a temporary name and renamed, so the reporter reads complete files only."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"r{header['rank']:05d}.txt"
    tmp = final.with_suffix(".part")
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.flush()
        spy = shutil.which("py-spy")
        if spy:
            try:
                out = subprocess.run([spy, "dump", "--pid", str(os.getpid())], capture_output=True, text=True,
                                     timeout=30)
                f.write(f"\n--- py-spy dump (exit {out.returncode}) ---\n{out.stdout}{out.stderr}")
            except (OSError, subprocess.TimeoutExpired) as e:
                f.write(f"\n--- py-spy dump failed: {e} ---\n")
    os.replace(tmp, final)
    return final


def read_dumps(folder: Path) -> dict[int, dict[str, Any]]:
    """rank -> {header fields..., "frames": [(file, line, func), ...] of the main thread, innermost first}."""
    out: dict[int, dict[str, Any]] = {}
    try:
        files = sorted(folder.glob("r*.txt"))
    except OSError:
        return out
    for p in files:
        try:
            head, _, body = p.read_text(errors="replace").partition("\n")
            info = json.loads(head)
        except (OSError, ValueError):
            continue
        info["frames"] = main_frames(body, info.get("main_thread", ""))
        out[int(info["rank"])] = info
    return out


def main_frames(text: str, main_ident: str) -> list[tuple[str, int, str]]:
    """The frames of the main thread in a faulthandler dump (most recent call first)."""
    frames: list[tuple[str, int, str]] = []
    inside = False
    for line in text.splitlines():
        m = _THREAD.match(line)
        if m:
            inside = int(m["ident"], 16) == int(main_ident or "0", 16)
            continue
        if line.startswith("---"):
            break  # py-spy's section follows
        f = _FRAME.match(line)
        if inside and f:
            frames.append((f["file"], int(f["line"]), f["func"]))
    return frames


def in_collective(frames: list[tuple[str, int, str]]) -> bool:
    return any("torch/distributed" in file or "deepspeed/comm" in file or (func in COLLECTIVE_FUNCS and
               ("torch" in file or "deepspeed" in file)) for file, _, func in frames)


def analyse(dumps: dict[int, dict[str, Any]], ranks: list[RankInfo]) -> dict[str, Any]:
    """Group ranks by main-thread stack and pick the suspects (see the module docstring)."""
    world = len(ranks) or (max(dumps, default=-1) + 1)
    missing = [r for r in range(world) if r not in dumps]
    sigs = {r: tuple((os.path.basename(f), fn) for f, _, fn in d["frames"]) for r, d in dumps.items()}
    groups: dict[tuple[Any, ...], list[int]] = {}
    for r, s in sigs.items():
        groups.setdefault(s, []).append(r)
    coll = {s: in_collective(dumps[rs[0]]["frames"]) for s, rs in groups.items()}
    sizes = Counter({s: len(rs) for s, rs in groups.items()})
    if missing:
        suspects, why = list(missing), "they wrote no stack dump (dead, or stuck holding the GIL)"
    elif len(groups) > 1 and any(coll.values()) and not all(coll.values()):
        suspects = sorted(r for s, rs in groups.items() if not coll[s] for r in rs)
        why = "their stacks are outside any collective while the other ranks wait in one"
    elif len(groups) > 1 and len(sizes.most_common(2)) == 2 and sizes.most_common(2)[0][1] > sizes.most_common(2)[1][1]:
        top = sizes.most_common(1)[0][0]
        suspects = sorted(r for s, rs in groups.items() if s != top for r in rs)
        why = "their stacks differ from the majority"
    else:
        suspects = []
        why = ("every rank has the same stack (a collective or network hang: no suspect node)" if len(groups) <= 1
               else "the stacks differ without a clear odd one out")
    hosts = {i.rank: i.host for i in ranks if i.host != "?"}
    info = {i.rank: i for i in ranks}
    hosts.update({r: str(d["host"]) for r, d in dumps.items() if d.get("host", "?") != "?"})  # setup: ranks say
    return {
        "suspect_ranks": suspects,
        "suspect_nodes": sorted({hosts[r] for r in suspects if r in hosts}),
        "suspect_coords": [{"rank": r, "node": hosts.get(r, "?"), **info[r].coord_fields()}
                           for r in suspects if r in info and info[r].coords is not None],
        "missing_ranks": missing,
        "why": why,
        "groups": [{"ranks": sorted(rs), "in_collective": coll[s],
                    "top": _where(dumps[rs[0]]["frames"])} for s, rs in groups.items()],
        "dumps": {r: {k: v for k, v in d.items() if k != "frames"} for r, d in dumps.items()},
    }


def _where(frames: list[tuple[str, int, str]]) -> str:
    """The innermost frame of the main thread, as ``func (file:line)``."""
    if not frames:
        return "?"
    file, line, func = frames[0]
    return f"{func} ({os.path.basename(file)}:{line})"


def _read_json(p: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(p.read_text())
        return data
    except (OSError, ValueError):
        return {}
