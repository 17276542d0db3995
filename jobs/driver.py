"""The per-rank driver of one chain segment: what submitit runs on every Slurm task.

Each task (one per GPU) runs :class:`SegmentJob`, which starts the trainer (``python -m kit.segment``,
inside the recipe's Apptainer image when one is set) as a CHILD process and watches it. Why a child
and not the trainer in-process: a rank that dies (SIGKILL, segfault, NCCL abort) then kills only the
child; the driver survives, tells rank 0's driver how its rank ended, and rank 0's driver decides what
the chain does next (kit.jobs.chain.decide): requeue, resubmit with backoff and exclusions, or end.

Signals: srun delivers the time-limit/preemption signal (USR2) and SIGTERM to every task. submitit's
own handler would checkpoint and requeue from rank 0 alone, mid-step; the driver replaces it and
forwards the signal to its trainer, which turns it into a collective save-and-exit at the next step
boundary (kit.trainer). The trainer starts with USR2/TERM ignored and installs its handlers during
setup; the driver re-sends a pending signal every second, so an early signal is never lost.

Coordination between the drivers of one segment goes through small files on the shared filesystem
(``<run>/slurm/ranks/<seg>/``): rank 0 writes ``go.json`` (start or not), every rank writes
``r<rank>.json`` when its trainer ends, rank 0 writes ``decision.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from kit import envvars, opcache, procs
from kit.config import RunConfig
from kit.errors import LedgerError
from kit.fsio import atomic_write_json
from kit.jobs import chain as ch
from kit.jobs.command import segment_command
from kit.ledger import LedgerWriter, hostname, writer_name
from kit.rundir import RunDir

GO, DECISION = "go.json", "decision.json"
FORWARDED = (signal.SIGUSR2, signal.SIGTERM)
RANK_WAIT_S = 20.0  # how long rank 0 waits for the other ranks' reports after a failure, beyond the time
# their drivers may take to stop a trainer that outlived the segment (health.exit_grace_s + procs.TERM_WAIT_S)


class SegmentJob(submitit.helpers.Checkpointable):
    """The pickled callable of every chain job: ``SegmentJob(run_dir)()`` on every task.

    Checkpointable so that a signal arriving before the driver has replaced submitit's handlers
    still requeues the same job (its state lives in the run directory, not in the pickle).
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def __call__(self) -> str:
        return Driver(RunDir(self.run_dir)).run()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data, indent=None)


def _wait_json(path: Path, timeout: float) -> dict[str, Any] | None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            time.sleep(0.25)
    return None


class Driver:
    """One rank's driver for one job (several segments in a row with the local executor)."""

    def __init__(self, rd: RunDir) -> None:
        self.rd = rd
        self.cfg: RunConfig = rd.load_config()
        self.dist = submitit.helpers.TorchDistributedEnvironment()
        self.job_env = submitit.JobEnvironment()
        self.executor = os.environ.get("SUBMITIT_EXECUTOR", "local")
        self.job_id = str(self.job_env.job_id)
        self.restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        self.nodes = list(self.job_env.hostnames)
        self.child: subprocess.Popen[bytes] | None = None
        self.pending_signal = ""
        self.forwarded = False
        self.stopped = False  # this segment's trainer was terminated by this driver (_stop_child)
        self.job_end: float | None = None  # when Slurm will kill this allocation (rank 0, from squeue)

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    # -------------------------------------------------------------------------------- main loop
    def run(self) -> str:
        for sig in FORWARDED:
            signal.signal(sig, self._on_signal)
        opcache.set_extensions_dir()  # the trainers inherit it: DeepSpeed's ops in this install's cache
        i = 0
        while True:
            seg = f"{self.job_id}_{self.restarts + i}"
            result = self._segment(seg, i)
            if result != "continue":
                return result
            i += 1

    def _segment(self, seg: str, i: int) -> str:
        folder = self.rd.slurm / ch.RANKS_DIR / seg
        folder.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            go = self._begin(seg)
            _write_json(folder / GO, go)
        else:
            go = _wait_json(folder / GO, timeout=600) or {"start": False, "reason": "no word from rank 0"}
        if not go["start"]:
            return str(go["reason"])
        if i:
            self.pending_signal = ""  # local loop: a new segment; under Slurm an early signal is kept
        self.stopped = False
        rc = self._run_child(seg, i)
        _write_json(folder / f"r{self.dist.rank}.json",
                    {"rank": self.dist.rank, "host": os.environ.get("SLURMD_NODENAME") or hostname(), "rc": rc,
                     "t_end": time.time(), "stopped": self.stopped})
        if self.is_main:
            decision = self._end(seg, folder, rc)
            _write_json(folder / DECISION, {"action": decision.action, "reason": decision.reason})
            return self._act(decision)
        if self.executor == "slurm":
            return "rank done"
        d = _wait_json(folder / DECISION, timeout=3600) or {"action": "end"}
        return "continue" if d["action"] in ("requeue", "resubmit") else "rank done"

    # ------------------------------------------------------------------------------ the trainer
    def _child_env(self, seg: str, i: int) -> dict[str, str]:
        env = dict(os.environ)
        port = self.dist.master_port + (i if self.executor != "slurm" else 0)
        env.update({
            "MASTER_ADDR": self.dist.master_addr, "MASTER_PORT": str(port), "RANK": str(self.dist.rank),
            "WORLD_SIZE": str(self.dist.world_size), "LOCAL_RANK": str(self.dist.local_rank),
            "LOCAL_WORLD_SIZE": str(self.dist.local_world_size), envvars.SEGMENT: seg,
            envvars.NODES: ",".join(self.nodes),  # the setup watchdog's rank -> node table (kit.watchdog)
            "OMP_NUM_THREADS": str(self.cfg.trainer.threads), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
            # A dead rank must end the job, not hang it: NCCL's asynchronous error handling aborts the
            # communicator of the survivors (both names: torch >= 2.2 and older).
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            "NCCL_ASYNC_ERROR_HANDLING": env.get("NCCL_ASYNC_ERROR_HANDLING", "1"),
        })
        if self.is_main and self.job_end:
            env[envvars.DEADLINE] = f"{self.job_end:.0f}"  # the trainer saves and leaves before it
        only = env.get(envvars.FAULTS_SEGMENTS)
        if only is not None and str(len(ch.load_state(self.rd).segments)) not in only.split(","):
            env.pop(envvars.FAULTS, None)  # test hook: inject faults into the listed segments only
        return env

    def _run_child(self, seg: str, i: int) -> int:
        """Start this rank's trainer and wait for it, but not forever: once the segment has ended
        (another rank's process ended, or rank 0 sees ``segment_ended`` in the ledger), a trainer
        still running after ``health.exit_grace_s`` is terminated, then killed (a frozen rank never
        exits by itself; waiting on it would hold the job and miss the next rendezvous)."""
        cmd = segment_command(self.cfg, self.rd.path, seg)

        def ignore_signals() -> None:  # until the trainer installs its own handlers
            for sig in FORWARDED:
                signal.signal(sig, signal.SIG_IGN)

        folder = self.rd.slurm / ch.RANKS_DIR / seg
        triggers = [procs.other_reports(folder, f"r{self.dist.rank}.json")]
        if self.is_main:  # one reader of the ledger per segment; the other ranks see rank 0's report
            triggers.append(procs.ledger_ended(procs.LedgerTail(self.rd.path, seg)))
        watch = procs.EndWatch(self.cfg.health.exit_grace_s, triggers)
        # The trainer dies with this driver (SIGKILL included): no rank outlives its launcher.
        self.child = subprocess.Popen(cmd, env=self._child_env(seg, i),
                                      preexec_fn=procs.preexec(signal.SIGKILL, ignore_signals))
        self.forwarded = False
        try:
            while self.child.poll() is None:
                self._forward()
                if watch.overdue():
                    return self._stop_child(seg, watch.seen)
                time.sleep(0.2)
            return int(self.child.returncode)
        finally:
            self.child = None

    def _stop_child(self, seg: str, why: str) -> int:
        assert self.child is not None
        print(f"[kit chain] rank {self.dist.rank}: the segment ended ({why}) but this rank's trainer (pid "
              f"{self.child.pid}) is still running after health.exit_grace_s = {self.cfg.health.exit_grace_s:g} s; "
              "terminating it", file=sys.stderr, flush=True)
        rc = procs.stop(self.child)
        self.stopped = True  # its exit status is this driver's doing, not a sign of its node's health
        try:  # each rank's driver has its own ledger file (one writer per file)
            with LedgerWriter(self.rd.path, writer_name("driver", self.dist.rank), seg=seg) as led:
                led.alert("warning", f"rank {self.dist.rank}'s trainer (pid {self.child.pid}) was still running "
                          f"{self.cfg.health.exit_grace_s:g} s after the segment ended ({why}); the driver "
                          f"terminated it (exit status {rc})", rank=self.dist.rank, exit_code=rc)
        except (LedgerError, OSError) as e:  # a full disk must not keep the driver from reporting below
            print(f"[kit chain] could not write the ledger: {e}", file=sys.stderr, flush=True)
        return rc

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        first = not self.pending_signal
        self.pending_signal = self.pending_signal or name
        self._forward()
        if first and self.is_main:
            with LedgerWriter(self.rd.path, "chain-signals") as led:
                led.emit("segment_signalled", signal=name, job_id=self.job_id)

    def _forward(self) -> None:
        """Deliver the pending signal once, when the trainer has a handler for it. Sending it while
        the trainer still ignores it would lose it; sending it after the trainer's interpreter has
        restored the default action (at exit) would kill it: /proc says which."""
        child = self.child
        if child is None or self.forwarded or not self.pending_signal:
            return
        sig = getattr(signal, self.pending_signal)
        if handler_state(child.pid, sig) == "caught":
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(sig)
            self.forwarded = True

    # ------------------------------------------------------------------------ rank 0: the chain
    def _ledger(self, seg: str) -> LedgerWriter:
        return LedgerWriter(self.rd.path, "chain", seg=seg)

    def _begin(self, seg: str) -> dict[str, Any]:
        """Rank 0, before training: is this job the chain's, may a segment start, record it."""
        state = ch.load_state(self.rd, repair=True)
        deadline = time.time() + 60
        while state.job_ids and self.job_id not in state.job_ids and time.time() < deadline:
            time.sleep(1)  # `kit submit` records the job id right after sbatch returns: give it time
            state = ch.load_state(self.rd, repair=True)
        with self._ledger(seg) as led:
            if state.job_ids and self.job_id not in state.job_ids:
                led.alert("error", f"job {self.job_id} is not part of this run's chain (its job is "
                                   f"{state.job_id}); refusing to train: two chains must never share a run")
                return {"start": False, "reason": "foreign job"}
            if state.state == ch.ENDED:
                return {"start": False, "reason": f"chain already ended ({state.end_reason})"}
            if state.segments and state.segments[-1].outcome == "running":
                self._record_lost(state, led)
            why = self._limit_reason(state)
            if why:
                state.state, state.end_reason = ch.ENDED, why
                ch.save_state(self.rd, state)
                led.emit("chain_ended", reason=why, job_id=self.job_id)
                return {"start": False, "reason": why}
            rec = ch.SegmentRecord(seg=seg, job_id=self.job_id, restarts=self.restarts, nodes=self.nodes,
                                   start=time.time(), ckpt_before=ch.latest_step(self.rd))
            state.segments.append(rec)
            state.state, state.job_id = ch.RUNNING, self.job_id
            if self.job_id not in state.job_ids:
                state.job_ids.append(self.job_id)
            ch.save_state(self.rd, state)
            if self.executor == "slurm":
                from kit.jobs import slurmctl

                self.job_end = slurmctl.job_end_time(self.job_id)
            gpus, driver = _gpus()
            led.emit("allocation_started", job_id=self.job_id, restarts=self.restarts, nodes=self.nodes,
                     world_size=self.dist.world_size, gpus=gpus, driver=driver, image=self.cfg.container.image,
                     executor=self.executor, excluded=state.excluded_nodes, ckpt_step=rec.ckpt_before,
                     job_end=self.job_end)
        return {"start": True, "reason": ""}

    def _limit_reason(self, state: ch.ChainState) -> str:
        from datetime import datetime

        if len(state.segments) >= self.cfg.chain.max_segments:
            return "max_segments"
        if self.cfg.chain.deadline and time.time() >= datetime.fromisoformat(self.cfg.chain.deadline).timestamp():
            return "chain_deadline"
        if state.no_progress >= self.cfg.chain.crash_loop_limit:
            return "crash_loop"
        return ""

    def _record_lost(self, state: ch.ChainState, led: LedgerWriter) -> None:
        """The previous segment never recorded its end: its job died with its driver (node failure)."""
        last = state.segments[-1]
        last.outcome, last.reason, last.end = ch.LOST, "driver vanished (node failure or job killed)", time.time()
        last.ckpt_after = ch.latest_step(self.rd)
        state.consecutive_crashes += 1
        state.no_progress = 0 if last.ckpt_after > last.ckpt_before else state.no_progress + 1
        led.emit("allocation_ended", job_id=last.job_id, outcome=last.outcome, reason=last.reason,
                 ckpt_step=last.ckpt_after, seg_ended=last.seg)

    def _end(self, seg: str, folder: Path, rc0: int) -> ch.Decision:
        """Rank 0, after training: collect the ranks' reports, record the segment, decide."""
        ended = [e for e in ch.tail_events(self.rd, {"segment_ended"}) if e.get("seg") == seg]
        reason = str(ended[-1]["reason"]) if ended else ""
        outcome = ch.classify(reason, rc0)
        reports = self._reports(folder, wait=outcome not in (ch.FINISHED, ch.CLEAN))
        state = ch.load_state(self.rd)  # re-read: `kit cancel` may have ended the chain meanwhile
        rec = next((r for r in state.segments if r.seg == seg), None)
        if rec is None:
            rec = ch.SegmentRecord(seg=seg, job_id=self.job_id, restarts=self.restarts, nodes=self.nodes)
            state.segments.append(rec)
        rec.end, rec.outcome = time.time(), outcome
        rec.reason = reason or f"exit status {rc0}" + (f" after {self.pending_signal}" if self.pending_signal else "")
        rec.step = int(ended[-1]["step"]) if ended else -1
        rec.ckpt_after = ch.latest_step(self.rd)
        rec.exit_codes = {str(r.rank): r.rc for r in reports}
        if outcome == ch.PREFLIGHT:
            rec.implicated = self._doctor_failed(seg)
        elif outcome == ch.DISK_FULL:  # only nodes whose own disk filled (kit.diskfull), never by default
            rec.implicated = sorted(str(n) for n in (ended[-1].get("suspect_nodes") or [] if ended else []))
        elif outcome not in (ch.FINISHED, ch.CLEAN):
            suspects = ended[-1].get("suspect_nodes") if ended and outcome == ch.HANG else None
            rec.implicated = ch.implicated_nodes(reports, self.dist.world_size, self.nodes, suspects)
        cancelled = state.state == ch.ENDED
        usable = self._usable_nodes()
        decision = ch.Decision("end", state.end_reason) if cancelled else ch.decide(self.cfg, state, rec, usable)
        with self._ledger(seg) as led:
            led.emit("allocation_ended", job_id=self.job_id, outcome=outcome, reason=rec.reason, step=rec.step,
                     ckpt_step=rec.ckpt_after, exit_codes=rec.exit_codes, implicated=rec.implicated,
                     decision=decision.action)
            for node in decision.exclude:
                led.emit("node_excluded", node=node, reason=f"{outcome} in segment {seg}")
            for node in rec.implicated:
                if node in state.suspect_nodes and node not in decision.exclude:
                    led.alert("warning", f"node {node} was implicated in a {outcome} but excluding it would leave "
                                         "too few nodes; it stays in use", node=node)
            if outcome in (ch.CRASH, ch.HANG) and decision.action != "end":
                led.alert("warning", f"segment {seg} {outcome}ed ({rec.reason}); resubmitting in "
                                     f"{decision.delay_s:.0f} s from checkpoint step {rec.ckpt_after}", seg_ended=seg)
            if decision.alert:
                led.alert(decision.severity or "warning", decision.alert)
            if decision.action == "end":
                if not cancelled:
                    state.state, state.end_reason = ch.ENDED, decision.reason
                led.emit("chain_ended", reason=decision.reason, job_id=self.job_id, step=rec.step)
            else:
                state.state = ch.QUEUED
        ch.save_state(self.rd, state)
        self._prune_ranks(seg)
        return decision

    def _doctor_failed(self, seg: str) -> list[str]:
        """Nodes the preflight (kit.tools.doctor) failed in this segment, from its ledger events."""
        failed: set[str] = set()
        for e in ch.tail_events(self.rd, {"doctor"}):
            if e.get("seg") == seg and not e.get("ok", True):
                failed.update(str(n).split("#")[0] for n in e.get("failed_nodes", []))
        return sorted(failed)

    def _reports(self, folder: Path, wait: bool) -> list[ch.RankReport]:
        end = time.time() + (RANK_WAIT_S + self.cfg.health.exit_grace_s + procs.TERM_WAIT_S if wait else 5.0)
        while True:
            files = sorted(folder.glob("r*.json"))
            if len(files) >= self.dist.world_size or time.time() > end:
                break
            time.sleep(0.25)
        out = []
        for f in files:
            try:
                d = json.loads(f.read_text())
                out.append(ch.RankReport(int(d["rank"]), str(d["host"]), int(d["rc"]), float(d["t_end"]),
                                         bool(d.get("stopped", False))))
            except (ValueError, KeyError):
                continue
        return out

    def _usable_nodes(self) -> int | None:
        if self.executor != "slurm":
            return None
        from kit.jobs import slurmctl

        return len(slurmctl.partition_nodes(self.cfg.slurm.partition)) or None

    def _prune_ranks(self, seg: str, keep: int = 4) -> None:
        root = self.rd.slurm / ch.RANKS_DIR
        dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for p in dirs[:-keep]:
            if p.name != seg:
                shutil.rmtree(p, ignore_errors=True)

    def _act(self, d: ch.Decision) -> str:
        if d.action == "end":
            return d.reason
        if self.executor != "slurm":
            time.sleep(d.delay_s)
            return "continue"
        from kit.jobs import slurmctl
        from kit.jobs.submit import resubmit

        if d.action == "requeue":
            with self._ledger(f"{self.job_id}_{self.restarts}") as led:
                led.emit("chain_requeued", job_id=self.job_id, reason=d.reason, how="requeue")
                try:
                    slurmctl.requeue(self.job_id)
                except slurmctl.SlurmError as e:
                    state = slurmctl.job_state(self.job_id)
                    if state not in ("RUNNING", "COMPLETING", ""):
                        # Slurm is requeueing it already (preemption with PreemptMode=REQUEUE): a new
                        # job now would make two.
                        led.alert("info", f"scontrol requeue refused ({e}); Slurm is requeueing job "
                                          f"{self.job_id} itself ({state})")
                        return f"requeued by Slurm ({state})"
                    led.alert("warning", f"scontrol requeue failed ({e}); submitting a new job instead")
                else:
                    led.close()
                    # Like submitit: leave without a result file, so the requeued job is not seen as done.
                    sys.exit(-1)
        new_id = resubmit(self.rd, self.cfg, delay_s=d.delay_s, after=self.job_id)
        with self._ledger(f"{self.job_id}_{self.restarts}") as led:
            led.emit("chain_requeued", job_id=new_id, reason=d.reason, how="resubmit", delay_s=d.delay_s,
                     previous_job_id=self.job_id)
        return f"resubmitted as {new_id}"


def handler_state(pid: int, sig: int) -> str:
    """How process ``pid`` treats ``sig``: "caught", "ignored", "default", or "gone" (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "gone"
    masks = dict(line.split(":", 1) for line in text.splitlines() if line.startswith(("SigCgt", "SigIgn")))
    bit = 1 << (sig - 1)
    if int(masks.get("SigCgt", "0").strip(), 16) & bit:
        return "caught"
    if int(masks.get("SigIgn", "0").strip(), 16) & bit:
        return "ignored"
    return "default"


def _gpus() -> tuple[list[str], str]:
    """GPU names and driver version on this node via NVML; ([], "") on CPU nodes."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVML absent on CPU nodes is normal: no GPUs, never a crash of the driver
        return [], ""
    try:
        n = pynvml.nvmlDeviceGetCount()
        names = [str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(n)]
        return names, str(pynvml.nvmlSystemGetDriverVersion())
    finally:
        pynvml.nvmlShutdown()
