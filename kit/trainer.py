"""One training segment: a BLOOM model inside a DeepSpeed engine, from resume to save-and-exit.

The loop's invariants (what makes months of chained allocations lose nothing):
- Every decision that changes control flow (stop, save now, signal, deadline, non-finite loss) is
  taken collectively: each rank contributes a flag to ONE all-reduce per step that also carries the
  loss, so all ranks save and leave at the same step boundary. Rank 0 alone deciding is the bug that
  hangs a job.
- A checkpoint is DeepSpeed's engine save + per-rank RNG + a manifest written last (kit.checkpoint).
- Data position is the number of samples consumed; the sampler is a pure function of it (kit.data).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit import checkpoint as ck
from kit import envvars, exitcodes
from kit import spikes as sp
from kit.config import RunConfig
from kit.data import MixtureDataset, prepare, rank_micro_indices, wait_for_meta
from kit.diskfull import DiskFullError
from kit.dist import DistEnv
from kit.engine import build_engine
from kit.errors import ConfigError
from kit.evaluation import Evaluator, Placement
from kit.faults import fault_active, fault_point
from kit.health import JobHealth
from kit.ledger import LedgerWriter, NullLedger, hostname, writer_name
from kit.metrics import MetricSink
from kit.model import peak_tflops, step_flops
from kit.parallel.layout import layout_of
from kit.progress import StepLines
from kit.rollback import RollbackPolicy
from kit.rundir import SAVE_NOW, STOP, RunDir, SwitchWatcher
from kit.saver import Saver

if TYPE_CHECKING:
    import torch

    from kit.parallel.mesh import Mesh
    from kit.parallel.stepper import Stepper

# Positions in the per-step all-reduce vector. GNORM/G_UNAPPLIED: rank 0's grad norm of the previous
# step and whether DeepSpeed skipped its update (kit.spikes judges them one step late, on every rank).
# F_CKPT_FAILED: some rank's background checkpoint writer failed (kit.asyncsave): every rank then waits for
# the save at this boundary, where the failure is raised on every rank alike (a full disk: disk_full).
LOSS, NONFINITE, F_STOP, F_SAVE, F_SIGNAL, F_DEADLINE, GNORM, G_UNAPPLIED, F_CKPT_FAILED, NFLAGS = range(10)


def slurm_deadline() -> float | None:
    """The end of this allocation, when the chain tells us (KIT_DEADLINE, Unix seconds)."""
    v = os.environ.get(envvars.DEADLINE)
    return float(v) if v else None


@dataclass
class SegmentState:
    step: int = 0
    consumed: int = 0
    resumed_from: str = ""
    step_times: list[float] = field(default_factory=list)
    signalled: str = ""


class Trainer:
    """Assembles the parts in ``setup()`` and runs the loop in ``run()``; returns an exit reason.

    The parts: the engine (kit.engine), the data (kit.data), saving and resuming (kit.saver), the
    rollback policy (kit.rollback), health (kit.health), spikes (kit.spikes), metrics (kit.metrics)."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, env: DistEnv, seg: str = "",
                 stop_after_steps: int = 0, setup_watchdog: Any = None) -> None:
        self.cfg = cfg
        self.rd = run_dir
        self.env = env
        self.seg = seg or os.environ.get(envvars.SEGMENT, "local")
        self.stop_after_steps = stop_after_steps or cfg.trainer.stop_after_steps
        self.state = SegmentState()
        self.ledger: LedgerWriter | NullLedger = (
            LedgerWriter(run_dir.path, writer_name("train", env.rank), seg=self.seg) if env.is_main else NullLedger()
        )
        # The layout (kit.parallel): tensor x pipeline x data; a replica's ranks share its micro-batches.
        cfg.check_layout(env.world_size, f"this segment ({env.world_size} ranks)")
        self.world = env.world_size
        self.layout = layout_of(cfg, self.world)
        self.dp = self.layout.data
        self.global_batch = cfg.batch.micro_batch_size * cfg.batch.grad_accum * self.dp
        self.deadline = self._deadline()
        self.engine: Any = None
        self.mesh: Mesh | None = None
        self.stepper: Stepper | None = None
        self.data: MixtureDataset | None = None
        self.sink: MetricSink | None = None
        # Loss spikes (kit.spikes): same detector state on every rank, fed all-reduced values only.
        self.guard = sp.SpikeGuard(cfg.spikes, self.ledger)
        self.spike_check = sp.StepCheck()
        self.saver = Saver(cfg, run_dir, env, self.ledger, self.seg, self.layout, log=self._log)
        self.rollback = RollbackPolicy(cfg, run_dir, env, self.ledger, self.guard, self.saver, log=self._log)
        self._optim: Any = None
        self._sched: Any = None
        self._last_gn: tuple[float, bool] = (-1.0, True)  # rank 0: previous step's grad norm (-1: unknown), applied
        self._consumed_at: dict[int, int] = {}  # step -> samples consumed before it (last few steps)
        self.switches = SwitchWatcher(run_dir, cfg.trainer.control_check_s)  # rank 0's look at control/
        self.health: JobHealth | None = None  # kit.health: node sampler, hang watchdog, straggler timings
        self._setup_watchdog = setup_watchdog  # kit.watchdog.for_setup: watching since before the rendezvous
        self.evaluator: Evaluator | None = None  # kit.evaluation: validation on held-out data
        # Start-up phases (Unix times at the end of each), for the goodput account: segment_started carries
        # them, segment_first_step closes the start-up (restart cost = failure -> first completed step).
        self.startup: dict[str, float] = {"process": _process_start(), "trainer": time.time()}
        self.lines: StepLines | None = None  # rank 0's live step lines (trainer.progress_s)
        self._end_fields: dict[str, Any] = {}  # extra fields of segment_ended (disk_full: the nodes to blame)

    # ------------------------------------------------------------------------------------ setup
    def _deadline(self) -> float | None:
        ends = [d for d in (slurm_deadline(),) if d]
        if self.cfg.trainer.deadline:
            ends.append(datetime.fromisoformat(self.cfg.trainer.deadline).timestamp())
        return min(ends) if ends else None

    def setup(self) -> None:
        import torch

        cfg, env = self.cfg, self.env
        torch.set_num_threads(cfg.trainer.threads)
        data_dir = Path(cfg.data.prepared) if cfg.data.prepared else self.rd.data
        if env.is_main:
            meta = prepare(cfg, data_dir, log=self._log)
            self.ledger.emit("data_ready", sources=[s["name"] for s in meta["sources"]],
                             tokens=sum(s["tokens"] for s in meta["sources"]))
        else:
            with wait_for_meta(data_dir):
                pass
        self.data = MixtureDataset(data_dir, cfg.run.seed, cfg.model.seq_length)
        self.startup["data"] = time.time()
        built = build_engine(cfg, self.world, env.rank)
        self.engine, self._optim, self._sched = built.engine, built.optimizer, built.scheduler
        self.mesh, self.stepper = built.mesh, built.stepper
        self.saver.engine = self.engine
        self.startup["engine"] = time.time()
        resumed = self.saver.resume()
        self.state.step, self.state.consumed, self.state.resumed_from = resumed.step, resumed.consumed, resumed.tag
        self._setup_spikes()
        self.startup["resumed"] = time.time()
        if env.is_main:
            self.sink = MetricSink(self.ledger, self.rd.tensorboard, purge_step=self.state.step + 1)
            self.ledger.emit("segment_started", world_size=self.world, layout=self.layout.to_dict(),
                             step=self.state.step, resumed_from=self.state.resumed_from, host=hostname(),
                             pid=os.getpid(),
                             max_steps=cfg.trainer.max_steps, global_batch=self.global_batch,
                             job_id=os.environ.get("SLURM_JOB_ID", ""),
                             restarts=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                             versions=_versions(), startup={k: round(v, 3) for k, v in self.startup.items()})
            tokens = self.global_batch * cfg.model.seq_length
            self.lines = StepLines(cfg.trainer.progress_s, cfg.trainer.max_steps, tokens,
                                   out=lambda line: print(line, flush=True))
        tag = self.state.resumed_from  # the evaluation schedule and alert state continue from the checkpoint
        kept = ck.load(self.rd.checkpoints, tag).manifest.kit.extra.get("eval") if tag else None
        self.evaluator = Evaluator.build(cfg, data_dir, self.engine, Placement.of(self.mesh, env.rank, self.world),
                                         self.ledger, lambda: self.sink, self._log, kept, phase=self._long_phase)
        self._install_signals()
        # Health (kit.health, docs/health.md): sampler on local rank 0, watchdog per rank, straggler timer.
        self.health = JobHealth.start(cfg, self.rd, env, self.seg, self.engine, self.ledger, self._setup_watchdog)
        self._setup_watchdog = None

    def _install_signals(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.state.signalled = signal.Signals(signum).name

        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, handler)

    # ------------------------------------------------------------------------------------- loop
    def run(self) -> str:
        """Train until done or told to stop; returns the reason (see kit.exitcodes.REASONS)."""
        st = self.state
        self.begin_loop()
        reason = "done"
        try:
            while st.step < self.cfg.trainer.max_steps:
                reason = self.step_once()
                if reason:
                    break
            reason = reason or "done"
            if reason != "give_up" and not self.saver.saved_at(st.step):  # never checkpoint a state given up on
                self.save(reason, blocking=True)  # the segment ends: nothing to overlap the write with
            self.wait_for_saves()  # a save still being written completes before the segment ends
        except DiskFullError as e:  # every rank raises it together (kit.diskfull): end the segment, named
            reason = self._disk_full(e)
        if reason == "stop":
            self._ack(STOP)
        self._finish(reason)
        return reason

    def begin_loop(self) -> None:
        """What the loop computes once per segment (FLOPs per step, the accelerator's peak)."""
        self._start_step = self.state.step
        self._flops = step_flops(self.cfg.model, self.cfg.data.vocab_size, self.global_batch)
        self._model_flops = step_flops(self.cfg.model, self.cfg.data.vocab_size, self.global_batch, recompute=False)
        self._peak = peak_tflops(self.cfg.trainer.peak_tflops)

    def step_once(self) -> str:
        """One optimizer step with everything the kit does around it (metrics, health, spikes,
        control, checkpoints). Returns "" to go on, or why the segment ends."""
        cfg, st = self.cfg, self.state
        self._skip_data()
        t0 = time.perf_counter()
        lr = float(self.engine.get_lr()[0])  # the rate this step uses (DeepSpeed steps the scheduler after)
        vec = self._train_step()
        st.step += 1
        st.consumed += self.global_batch
        dt = time.perf_counter() - t0
        st.step_times = ([*st.step_times, dt])[-50:]
        if self.health:  # heartbeat, non-finite record; straggler all_gather every health.straggler_interval
            self.health.after_step(st.step, dt, vec[NONFINITE])
        loss = vec[LOSS] / (self.dp * cfg.batch.grad_accum)
        fault_point("step.after", st.step, self.env.rank)
        if self.env.is_main and (st.step % cfg.trainer.log_interval == 0 or self.guard.note):
            self._emit_step(loss, lr, vec[NONFINITE] > 0, dt, self._flops, self._model_flops, self._peak)
        if self.env.is_main:
            self._progress(loss)
        if vec[F_CKPT_FAILED] > 0:
            self.wait_for_saves()  # raises the failed save's error on every rank (DiskFullError: disk_full)
        if self.spike_check.give_up is not None:
            return self._give_up(self.spike_check.give_up.why)
        if self.spike_check.decisions and self.env.is_main:
            self.rollback.pin_around(self.spike_check.decisions[0].verdict.step)
        if self.spike_check.rollback is not None:
            if self.health:  # a reload is not a step: the hang watchdog's ceiling applies
                self.health.long_phase("rollback")
            return "" if self._rollback(self.spike_check.rollback) else "give_up"
        if self.evaluator:  # validation every eval.interval_steps, before this step's save (kit.evaluation)
            self.evaluator.after_step(st.step, dt, hurry=vec[F_SIGNAL] > 0 or vec[F_DEADLINE] > 0)
        if vec[F_STOP] > 0:
            return "stop"
        if vec[F_SIGNAL] > 0:
            return "signal"
        if vec[F_DEADLINE] > 0:
            return "deadline"
        if self.stop_after_steps and st.step - self._start_step >= self.stop_after_steps:
            return "segment_limit"
        if st.step >= cfg.trainer.max_steps:
            return "done"
        if vec[F_SAVE] > 0 or st.step % cfg.checkpoint.interval_steps == 0:
            self.save("save-now" if vec[F_SAVE] > 0 else "interval")
            if vec[F_SAVE] > 0:
                self._ack(SAVE_NOW)
        return ""

    def _progress(self, loss: float) -> None:
        """Rank 0: the segment's first completed step (ledger), and the live step line when one is due."""
        st = self.state
        if "first_step" not in self.startup:
            now = self.startup["first_step"] = time.time()
            self.ledger.emit("segment_first_step", step=st.step, startup_s=round(now - self.startup["process"], 3),
                             setup_s=round(now - self.startup["trainer"], 3))
        if self.lines is not None:
            self.lines.step(st.step, loss, last=st.step >= self.cfg.trainer.max_steps)

    def _train_step(self) -> list[float]:
        """Forward/backward over the micro-batches (kit.parallel.stepper, at any layout), then the one
        all-reduce of the step and the update, which the spike policy may refuse on every rank."""
        import torch

        cfg, st, eng, rank = self.cfg, self.state, self.engine, self.env.rank
        assert self.data is not None and self.mesh is not None and self.stepper is not None
        data, micro, ga, replica = self.data, cfg.batch.micro_batch_size, cfg.batch.grad_accum, self.mesh.coords.data

        def batches() -> Iterator[torch.Tensor]:  # this replica's micro-batches, read only where used
            for m in range(ga):
                idx = rank_micro_indices(st.consumed, micro, self.dp, replica, m)
                yield torch.from_numpy(data.batch(idx)).to(eng.device)

        out: list[list[float]] = []

        def before_update(loss_sum: torch.Tensor | None, update: Callable[[], None]) -> None:
            out.append(self._all_reduce(loss_sum))
            self.spike_check = self._check_spikes(out[0])
            self._update(update)

        self.stepper.step(batches(), ga, before_update, poison=fault_active("loss.nan", st.step + 1, rank))
        return out[0]

    def _all_reduce(self, loss_sum: torch.Tensor | None) -> list[float]:
        """The step's one all-reduce: the loss (one rank per replica adds its micro-batch losses: the
        last pipeline stage's first tensor rank), non-finite losses, and the control flags."""
        import torch
        import torch.distributed as dist

        assert self.mesh is not None
        st, eng = self.state, self.engine
        flags = [0.0] * NFLAGS  # host-side flags; loss and non-finite are filled in on the device
        flags[F_SIGNAL] = 1.0 if st.signalled else 0.0
        flags[F_CKPT_FAILED] = 1.0 if self.saver.failed() else 0.0
        if self.env.is_main:
            switches = self.switches.poll()
            flags[F_STOP] = 1.0 if STOP in switches else 0.0
            flags[F_SAVE] = 1.0 if SAVE_NOW in switches else 0.0
            flags[F_DEADLINE] = 1.0 if self._near_deadline() else 0.0
            flags[GNORM], flags[G_UNAPPLIED] = self._last_gn[0], 0.0 if self._last_gn[1] else 1.0
        vec = torch.tensor(flags, dtype=torch.float64, device=eng.device)
        if loss_sum is not None:  # summed on the device: this .tolist() is the step's one host sync
            if self.mesh.reports_loss:
                vec[LOSS] = loss_sum
            vec[NONFINITE] = (~torch.isfinite(loss_sum)).double()
        if self.world > 1:
            dist.all_reduce(vec)
        out: list[float] = vec.tolist()
        return out

    def _update(self, update: Callable[[], None]) -> None:
        """The boundary optimizer step, or (spike policy ``skip``) the same step with the optimizer's
        and the schedule's ``step`` held, on every rank alike (kit.spikes.hold_update)."""
        eng = self.engine
        if self.spike_check.skip_update:
            with sp.hold_update(self._optim, self._sched):
                update()
            if getattr(eng, "_step_applied", True):  # DeepSpeed counts the updates it skips itself
                eng.skipped_steps += 1
        else:
            update()
        if self.env.is_main:
            gn = eng.get_global_grad_norm()
            self._last_gn = (float(gn) if gn is not None else -1.0,
                             bool(getattr(eng, "_step_applied", True)) and not self.spike_check.skip_update)

    # ------------------------------------------------------------------------------------ spikes
    def _setup_spikes(self) -> None:
        """Skip ranges (control file, rank 0 reads, all get) and the detector state of the resumed
        checkpoint, so that a restart keeps both."""
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.env.is_main:
            try:
                box = [sp.SkipRanges.load(self.rd.control / sp.SKIP_FILE).to_list()]
            except ConfigError as e:  # a hand-edited file gone wrong: every rank stops with the message
                box = [f"!{e}"]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise ConfigError(box[0][1:])
        self.guard.skips.merge(box[0])
        if self.state.resumed_from:
            self.guard.restore(ck.load(self.rd.checkpoints, self.state.resumed_from).manifest.kit.extra)

    def _skip_data(self) -> None:
        """Jump over skip ranges before a step; remember where each step starts in the data."""
        st = self.state
        nxt = self.guard.skips.advance(st.consumed)
        if nxt != st.consumed:
            self._log(f"skipping samples [{st.consumed}, {nxt}) (skip ranges)")
            self.ledger.emit("data_skipped", step=st.step + 1, start=st.consumed, end=nxt)
            st.consumed = nxt
        self._consumed_at[st.step + 1] = st.consumed
        self._consumed_at.pop(st.step - 3, None)

    def _check_spikes(self, vec: list[float]) -> sp.StepCheck:
        st = self.state
        step = st.step + 1
        loss = vec[LOSS] / (self.dp * self.cfg.batch.grad_accum)
        ctx = {"loss": loss, "consumed": st.consumed, "samples": self.global_batch,
               "lr": float(self.engine.get_lr()[0])}
        gn = vec[GNORM] if not vec[GNORM] < 0 else None  # NaN is not < 0: a non-finite norm is judged
        return self.guard.check(step, loss, step - 1, gn, vec[G_UNAPPLIED] == 0, ctx)

    def _rollback(self, d: sp.Decision) -> bool:
        """Reload the newest complete checkpoint at least spikes.rollback_steps before the spike, then
        skip spikes.skip_batches batches from the spike on (kit.rollback). False = nothing to load."""
        st, spike = self.state, d.verdict.step
        tag, note = self.rollback.choose(spike)
        if tag is None:
            self._give_up(f"loss spike at step {spike} ({d.why}) and no complete checkpoint before it to roll back to")
            return False
        back = self.rollback.roll_back(d, tag, note, st.step, st.consumed, self._consumed_at, self.global_batch)
        st.step, st.consumed = back.step, back.consumed
        self._last_gn = (-1.0, True)  # the previous step's grad norm is of the abandoned timeline
        if self.sink is not None:  # replayed steps replace the old points in TensorBoard (purge_step)
            self.sink.close()
            self.sink = MetricSink(self.ledger, self.rd.tensorboard, purge_step=back.step + 1)
        return True

    def _long_phase(self, what: str) -> None:
        if self.health:  # not a step (an evaluation): the hang watchdog's ceiling applies until the next step
            self.health.long_phase(what)

    def _give_up(self, why: str) -> str:
        self._log(f"giving up: {why}")
        self.ledger.alert("critical", f"training stopped: {why}; inspect with `kit spikes {self.rd.path}`",
                          step=self.state.step)
        return "give_up"

    def _disk_full(self, e: DiskFullError) -> str:
        """A save found its filesystem full: say so (not a crash, no node blamed unless its own disk
        was the full one) and end the segment; the previous checkpoint stays the newest complete one."""
        latest = ck.find_resume(self.rd.checkpoints)[0] if self.env.is_main else None
        self._log(str(e))
        self.ledger.alert("critical", f"{e}. The newest complete checkpoint is still "
                          f"{latest.tag if latest else 'none'}; the segment ended with DISK_FULL "
                          f"({exitcodes.DISK_FULL}). Free space there (fewer checkpoint.keep_last, move old "
                          "checkpoints away), then resume (`kit submit` or `kit train` again)",
                          step=self.state.step, nodes=e.nodes, free_bytes=min(f.free_bytes for f in e.failures))
        self._end_fields = {"suspect_nodes": e.nodes}
        return "disk_full"

    def _near_deadline(self) -> bool:
        if self.deadline is None:
            return False
        step_t = max(self.state.step_times[-10:], default=0.0)
        margin = self.cfg.trainer.stop_margin_s + 2 * step_t + self.saver.deadline_reserve_s(step_t)
        return time.time() + margin >= self.deadline

    def _emit_step(self, loss: float, lr: float, nonfinite: bool, dt: float, flops: float, model_flops: float,
                   peak: float) -> None:
        assert self.sink is not None
        eng, st, seq = self.engine, self.state, self.cfg.model.seq_length
        gn = eng.get_global_grad_norm()
        gn = float(gn) if gn is not None else None
        tflops = flops / (dt * self.world * 1e12)  # per GPU: every rank of every dimension
        self.sink.step(st.step, {
            "loss": loss,
            "grad_norm": gn,
            "lr": lr,
            "consumed": st.consumed - self.global_batch,
            "samples": self.global_batch,
            "tokens": self.global_batch * seq,
            "step_time": round(dt, 6),
            "tokens_per_s": self.global_batch * seq / dt,
            "samples_per_s": self.global_batch / dt,
            "tflops": tflops,
            "mfu": (model_flops / (dt * self.world * 1e12)) / peak if peak else None,
            "nonfinite": nonfinite,
            **self.guard.note,
        })

    # ------------------------------------------------------------------------------ checkpoints
    def save(self, why: str, blocking: bool = False) -> None:
        """Collective save (kit.saver): every rank writes its part; rank 0 commits with the manifest."""
        if self.health:  # a save is not a step: the hang watchdog's ceiling applies until the next step
            self.health.long_phase("save")
        ev = {"eval": self.evaluator.state()} if self.evaluator else {}
        self.saver.save(self.state.step, self.state.consumed, why, {**self.guard.manifest_state(), **ev}, blocking)

    def wait_for_saves(self) -> None:
        """Collective: the asynchronous save in flight, if any, is complete (rank 0: committed)."""
        if self.saver.pending is not None and self.health:
            self.health.long_phase("save")
        self.saver.wait()

    # ------------------------------------------------------------------------------------- end
    def _ack(self, switch: str) -> None:
        if self.env.is_main:
            text = self.rd.consume(switch)
            self.ledger.emit("control_ack", switch=switch, step=self.state.step, note=text or "")

    def _finish(self, reason: str) -> None:
        if self.health:  # stop the watchdog before anything slow; the sampler writes its last sample
            self.health.stop()
            self.health = None
        if self.env.is_main:
            self.ledger.emit("segment_ended", reason=reason, step=self.state.step,
                             exit_code=exitcodes.REASONS.get(reason, 1), signal=self.state.signalled,
                             **self._end_fields)
        self.close()

    def close(self) -> None:
        """Release what the segment holds, however it ended (idempotent): the watchdog and sampler,
        TensorBoard's queued events, the ledger. Why here: the rank process then ends without
        interpreter finalization (kit.segment.exit_now), so nothing may rely on it."""
        if self.health:
            self.health.stop()
            self.health = None
        # A save in flight (ending on an error): a bounded wait, said in the ledger if lost. Half the driver's
        # exit grace: a peer that died mid-save never sends its record, and past the grace the driver kills
        # this rank before it could say the save was lost.
        self.saver.close(timeout_s=max(5.0, 0.5 * self.cfg.health.exit_grace_s))
        if self.sink:
            self.sink.close()
            self.sink = None
        self.ledger.close()

    def _log(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[kit r{self.env.rank}] {msg}", flush=True)


def _process_start() -> float:
    """When this rank's process started (the launcher's start-up: interpreter, imports, rendezvous)."""
    import psutil

    return float(psutil.Process().create_time())


def _versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    v = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        v["cuda"] = str(torch.version.cuda)
        v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return v
