"""The chain's policy and its command lines, without a cluster (fast).

Real parts: the recipe loader, the run directory, the ledger. Apptainer cannot be installed here,
so its command line is checked as text against a golden file (regenerate it with
``KIT_UPDATE_GOLDEN=1 pytest tests/test_chain_units.py -k golden`` and review the diff).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest

from kit import exitcodes
from kit.config import RunConfig
from kit.errors import ConfigError, DataError
from kit.jobs import chain as ch
from tests.conftest import ROOT, tiny_overrides

GOLDEN = Path(__file__).with_name("test_chain_command.golden")


def _cfg(tmp: Path, **extra: Any) -> RunConfig:
    from kit.config import load_recipe

    return load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp / "runs", "u", **extra))


def _rec(outcome: str, before: int = 0, after: int = 0, reason: str = "", implicated: tuple[str, ...] = ()) \
        -> ch.SegmentRecord:
    return ch.SegmentRecord(seg="1_0", job_id="1", outcome=outcome, reason=reason, ckpt_before=before,
                            ckpt_after=after, implicated=list(implicated))


def _run(cfg: Any, state: ch.ChainState, rec: ch.SegmentRecord, usable: int | None = 8) -> ch.Decision:
    state.segments.append(rec)
    return ch.decide(cfg, state, rec, usable)


def test_clean_boundary_requeues_and_finished_ends(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    st = ch.ChainState()
    assert _run(cfg, st, _rec(ch.CLEAN, 0, 20, "signal")) == ch.Decision("requeue", "signal")
    d = _run(cfg, st, _rec(ch.FINISHED, 20, 60, "done"))
    assert (d.action, d.reason, d.alert) == ("end", "done", "")
    d = _run(cfg, st, _rec(ch.FINISHED, 20, 20, "give_up"))
    assert d.action == "end" and d.severity == "critical"


def test_crash_backoff_doubles_and_excludes_implicated_nodes(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"chain.backoff_s": 10.0, "chain.crash_loop_limit": 5})
    st = ch.ChainState()
    d1 = _run(cfg, st, _rec(ch.CRASH, 0, 4, "exit status 1", ("n3",)))
    d2 = _run(cfg, st, _rec(ch.CRASH, 4, 6, "exit status 1", ("n3", "n5")))
    assert (d1.action, d1.delay_s, d1.exclude) == ("resubmit", 10.0, ("n3",))
    assert (d2.delay_s, d2.exclude) == (20.0, ("n5",)), "n3 is already excluded"
    assert st.excluded_nodes == ["n3", "n5"]
    d3 = _run(cfg, st, _rec(ch.CLEAN, 6, 9, "deadline"))
    assert d3.action == "requeue" and st.consecutive_crashes == 0
    d4 = _run(cfg, st, _rec(ch.CRASH, 9, 10, "x"))
    assert d4.delay_s == 10.0, "backoff restarts after a clean segment"


def test_crash_loop_ends_the_chain_with_an_alert(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"chain.crash_loop_limit": 3})
    st = ch.ChainState()
    assert _run(cfg, st, _rec(ch.CRASH, 4, 4)).action == "resubmit"
    assert _run(cfg, st, _rec(ch.HANG, 4, 4)).action == "resubmit"
    d = _run(cfg, st, _rec(ch.CRASH, 4, 4, "exit status 1"))
    assert (d.action, d.reason, d.severity) == ("end", "crash_loop", "critical")
    assert "3 segments in a row" in d.alert


def test_preflight_excludes_without_backoff_and_never_the_last_nodes(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"slurm.nodes": 2})
    st = ch.ChainState()
    d = _run(cfg, st, _rec(ch.PREFLIGHT, 4, 4, implicated=("a",)), usable=3)
    assert (d.action, d.delay_s, d.exclude) == ("resubmit", 0.0, ("a",))
    d = _run(cfg, st, _rec(ch.CRASH, 4, 6, implicated=("b",)), usable=3)
    assert d.exclude == () and st.suspect_nodes == ["b"], "2 nodes needed, only 2 left: keep b, as a suspect"


def test_a_preflight_failed_on_every_node_backs_off_then_ends(tmp_path: Path) -> None:
    """No node to blame (the doctor's shared failures, a full filesystem): no exclusion, a retry after
    a doubling delay instead of at once, and the crash-loop limit ends the chain."""
    cfg = _cfg(tmp_path, **{"chain.backoff_s": 10.0, "chain.crash_loop_limit": 3})
    st = ch.ChainState()
    delays = [_run(cfg, st, _rec(ch.PREFLIGHT, 4, 4, "preflight")).delay_s for _ in range(2)]
    assert delays == [10.0, 20.0] and st.excluded_nodes == []
    d = _run(cfg, st, _rec(ch.PREFLIGHT, 4, 4, "preflight"))
    assert (d.action, d.reason, d.severity) == ("end", "crash_loop", "critical")


def test_a_full_disk_ends_the_chain_without_blaming_a_node(tmp_path: Path) -> None:
    """disk_full (kit.exitcodes.DISK_FULL) is its own outcome: a full shared filesystem ends the chain
    with a critical alert and excludes nothing (the old code called it a crash, blamed the node and
    resubmitted); only nodes whose own disk filled (kit.diskfull.local_nodes) are excluded."""
    assert ch.classify("disk_full", exitcodes.DISK_FULL) == ch.DISK_FULL
    assert ch.classify("", exitcodes.DISK_FULL) == ch.DISK_FULL
    cfg = _cfg(tmp_path)
    st = ch.ChainState()
    d = _run(cfg, st, _rec(ch.DISK_FULL, 4, 4, "disk_full"))
    assert (d.action, d.reason, d.severity) == ("end", "disk_full", "critical")
    assert "disk full" in d.alert and "step 4" in d.alert and st.excluded_nodes == [] and not d.exclude
    st = ch.ChainState()
    d = _run(cfg, st, _rec(ch.DISK_FULL, 4, 6, "disk_full", ("n2",)))
    assert (d.action, d.exclude, d.delay_s) == ("resubmit", ("n2",), 0.0) and st.excluded_nodes == ["n2"]
    st = ch.ChainState()
    d = _run(cfg, st, _rec(ch.DISK_FULL, 4, 6, "disk_full", ("n2",)), usable=1)
    assert d.action == "end" and st.excluded_nodes == [], "the only node is never excluded"


def test_limits_end_the_chain(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"chain.max_segments": 2, "chain.deadline": "2030-01-01T00:00:00"})
    st = ch.ChainState()
    assert _run(cfg, st, _rec(ch.CLEAN, 0, 2)).action == "requeue"
    d = _run(cfg, st, _rec(ch.CLEAN, 2, 4))
    assert (d.action, d.reason) == ("end", "max_segments")
    cfg = _cfg(tmp_path, **{"chain.deadline": "2020-01-01T00:00:00"})
    assert ch.decide(cfg, ch.ChainState(), _rec(ch.CLEAN, 0, 2)).reason == "chain_deadline"


def test_classify_and_blame() -> None:
    assert ch.classify("signal", exitcodes.REQUEUE) == ch.CLEAN
    assert ch.classify("stop", 0) == ch.FINISHED
    assert ch.classify("", exitcodes.PREFLIGHT) == ch.PREFLIGHT
    assert ch.classify("", exitcodes.HANG) == ch.HANG
    assert ch.classify("", 1) == ch.CRASH
    reports = [ch.RankReport(0, "a", 1, 10.0), ch.RankReport(1, "a", 1, 9.0), ch.RankReport(2, "b", -9, 11.0),
               ch.RankReport(3, "b", 1, 10.5)]
    assert ch.implicated_nodes(reports, 4, ["a", "b"]) == ["b"], "the SIGKILLed rank's node"
    assert ch.implicated_nodes(reports[:2], 2, ["a"]) == ["a"], "else the first to fail"
    assert ch.implicated_nodes(reports[:3], 4, ["a", "b"]) == ["b"], "rank 3 never reported: its node"
    # A hang: the usual rule would blame b (above); the watchdog's stack comparison named a.
    assert ch.implicated_nodes(reports, 4, ["a", "b"], hang_suspects=["a"]) == ["a"]
    assert ch.implicated_nodes(reports[:2], 2, ["a"], hang_suspects=[]) == ["a"], "no suspects: usual rule"
    # rank 1 (node b) SIGKILLed; rank 0 (node a) waited on it until its driver stopped it (-9 too): the
    # driver's own kill is no evidence against node a (a CI run excluded the healthy node before this)
    waited = [ch.RankReport(0, "a", -9, 70.0, stopped=True), ch.RankReport(1, "b", -9, 10.0)]
    assert ch.implicated_nodes(waited, 2, ["a", "b"]) == ["b"]
    assert ch.implicated_nodes([ch.RankReport(0, "a", 1, 70.0, stopped=True), ch.RankReport(1, "b", 1, 10.0)],
                               2, ["a", "b"]) == ["b"], "the first to fail on its own"


def test_state_roundtrip_and_torn_file(tmp_path: Path) -> None:
    from kit.rundir import RunDir

    rd = RunDir(tmp_path / "r")
    st = ch.ChainState(job_id="7", state=ch.RUNNING, segments=[_rec(ch.CRASH, 0, 4, "x", ("n1",))])
    ch.save_state(rd, st)
    assert ch.load_state(rd) == st
    ch.chain_path(rd).write_text('{"job_id": "7", "segm')
    assert ch.load_state(rd) == ch.ChainState(), "a torn file reads as no chain"
    assert not list(rd.slurm.glob("chain.json.bad-*")), "readers (kit status, the monitor) never change it"
    assert ch.load_state(rd, repair=True) == ch.ChainState()
    assert list(rd.slurm.glob("chain.json.bad-*")), "the chain's writers keep the torn one aside"
    # a record edited by hand: what has the right type is kept, the rest takes its default
    ch.chain_path(rd).write_text(json.dumps({"job_id": 7, "state": "running", "segments": [
        {"seg": "7_0", "job_id": "7", "start": "yesterday", "nodes": ["n1", 3]}, "junk", {"job_id": "x"}],
        "excluded_nodes": ["n9"], "consecutive_crashes": True}))
    got = ch.load_state(rd)
    assert (got.job_id, got.state, got.excluded_nodes, got.consecutive_crashes) == ("", "running", ["n9"], 0)
    assert [(r.seg, r.start, r.nodes) for r in got.segments] == [("7_0", 0.0, [])]


def test_signal_lead_and_time_limit_checks(tmp_path: Path) -> None:
    from kit.jobs.submit import check_time_limit

    cfg = _cfg(tmp_path, **{"slurm.time_limit": "20:00:00"})
    limit, lead = check_time_limit(cfg)
    assert limit == 72000 and 60 <= lead < 600
    assert ch.limit_seconds("1-00:00:00") == 86400 and ch.limit_seconds("90") == 5400
    with pytest.raises(ConfigError, match="too short for one step plus one save"):
        check_time_limit(_cfg(tmp_path, **{"slurm.time_limit": "00:00:20"}))
    with pytest.raises(ConfigError, match=r"slurm\.time_limit"):
        ch.limit_seconds("soon")


def test_bad_input_leaves_no_run_directory(tmp_path: Path) -> None:
    from kit.jobs.submit import submit

    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
             ({"container.image": str(tmp_path / "missing.sif")}, ConfigError, "container.image"),
             ({"slurm.time_limit": "00:00:20"}, ConfigError, "too short"),
             ({"container.binds": [str(tmp_path / "nope")]}, ConfigError, "container.binds")]
    for extra, err, text in cases:
        cfg = _cfg(tmp_path, **extra)
        with pytest.raises(err, match=text):
            submit(cfg, log=lambda m: None)
        assert not cfg.run_dir.exists()
    cfg = _cfg(tmp_path)
    cfg.data.sources[0].path = str(tmp_path / "no-such-corpus")
    with pytest.raises(DataError, match=r"data.sources\[fr\].path"):
        submit(cfg, log=lambda m: None)
    assert not cfg.run_dir.exists()


def test_slurm_parameters_carry_the_recipe(tmp_path: Path) -> None:
    from kit.jobs.submit import slurm_parameters, test_only_args

    cfg = _cfg(tmp_path, **{"slurm.nodes": 48, "slurm.gpus_per_node": 8, "slurm.partition": "gpu_p5",
                            "slurm.account": "six@a100", "slurm.qos": "qos_gpu-gc", "slurm.reservation": "bloom",
                            "slurm.time_limit": "20:00:00", "slurm.exclude": ["jz1"], "slurm.mem_gb": 400})
    cfg.slurm.sbatch_args = {"constraint": "a100"}
    cfg.slurm.srun_args = ["--cpu-bind=none"]
    p = slurm_parameters(cfg, ch.ChainState(excluded_nodes=["jz9"]), 300, delay_s=61, after="42")
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], p["timeout_min"]) == (48, 8, 8, 1200)
    assert p["slurm_exclude"] == "jz1,jz9" and p["slurm_signal_delay_s"] == 300
    extra = p["slurm_additional_parameters"]
    assert extra["begin"] == "now+61" and extra["dependency"] == "afterany:42,singleton"
    assert extra["reservation"] == "bloom" and extra["constraint"] == "a100" and extra["requeue"] is True
    assert p["slurm_srun_args"] == ["--kill-on-bad-exit=1", "--cpu-bind=none"]
    args = test_only_args(p)
    assert "--partition=gpu_p5" in args and "--account=six@a100" in args and "--constraint=a100" in args
    assert not any(a.startswith("--begin") or a.startswith("--dependency") for a in args)


def test_segment_command_golden(tmp_path: Path) -> None:
    """The Apptainer command line of a segment, pinned as text (Apptainer cannot run here)."""
    from kit.config import load_recipe
    from kit.jobs.command import segment_command

    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [
        'run.runs_dir="/lustre/runs"', 'run.name="bloom"', "slurm.gpus_per_node=8",
        'container.image="/lustre/images/kit-h100.sif"',
        'container.binds=["/lustre/scratch", "/dev/infiniband", "/lustre/runs:/lustre/runs:rw"]',
        'data.prepared="/lustre/data/bloom"'])
    cmd = segment_command(cfg, Path("/lustre/runs/bloom"), "1234_2")
    host = segment_command(load_recipe(ROOT / "jobs" / "tiny.toml", ['run.runs_dir="/r"']), Path("/r/tiny"), "9_0",
                           python="python3")
    text = shlex.join(cmd) + "\n" + shlex.join(host) + "\n"
    if os.environ.get("KIT_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), ("segment command changed; if intended, regenerate with "
                                        "KIT_UPDATE_GOLDEN=1 pytest tests/test_chain_units.py -k golden")


def test_status_and_finish_estimate(tmp_path: Path) -> None:
    from kit.jobs.status import gather, render
    from kit.ledger import LedgerWriter
    from kit.rundir import RunDir

    cfg = _cfg(tmp_path, **{"trainer.max_steps": 1000, "slurm.time_limit": "01:00:00", "chain.signal_lead_s": 120})
    rd = RunDir(cfg.run_dir)
    rd.create(cfg)
    with LedgerWriter(rd.path, "train-r0", seg="5_1") as led:
        for s in range(1, 101):
            led.emit("step", step=s, loss=5.0, step_time=9.0)
    st0 = ch.ChainState(job_id="5", state=ch.ENDED, end_reason="stop", executor="local",
                        segments=[_rec(ch.CLEAN, 0, 100, "signal")])
    ch.save_state(rd, st0)
    st = gather(rd, now=1_800_000_000.0, use_slurm=False)
    assert (st["step"], st["to_go"], st["chain"]["state"], st["phase"]) == (100, 900, "ended", "stopped")
    assert st["finish"]["eta_s"] == 0.0 and st["finish"]["note"] == "done"
    st0.state, st0.end_reason = ch.QUEUED, ""
    ch.save_state(rd, st0)
    st = gather(rd, now=1_800_000_000.0, use_slurm=False)
    fe = st["finish"]
    # 900 steps x 9 s = 8100 s of compute; useful per allocation 3600 - 60 start-up - 120 lead = 3420 s
    assert fe["compute_s"] == 8100 and fe["allocations_to_go"] == 3
    text = render(st)
    assert "step 100/1000" in text and "finish     ~" in text and "clean" in text


@pytest.mark.slurm
def test_slurm_refusals_before_anything_is_queued(tmp_path: Path, slurm: None) -> None:
    """Real sbatch --test-only: a partition Slurm does not know, an unknown sbatch option, a
    reservation that does not exist: one clear error, no run directory, nothing in the queue."""
    from kit.jobs import slurmctl
    from kit.jobs.submit import submit

    cases: list[tuple[str, Any, str]] = [("partition", "no-such-partition", "invalid partition"),
                                         ("sbatch_args", {"no-such-option": 1}, "unrecognized option"),
                                         ("reservation", "no-such-resv", "reservation")]
    for key, value, text in cases:
        cfg = _cfg(tmp_path)
        setattr(cfg.slurm, key, value)
        with pytest.raises(slurmctl.SlurmError, match=text) as e:
            submit(cfg, log=lambda m: None)
        assert "Slurm refuses this job" in str(e.value) and "[slurm]" in str(e.value)
        assert not cfg.run_dir.exists()
    assert slurmctl.squeue(name="kit-u") == [], "nothing was queued"


def test_tail_events_reads_only_the_end_of_big_ledgers(tmp_path: Path) -> None:
    from kit.ledger import LedgerWriter
    from kit.rundir import RunDir

    rd = RunDir(tmp_path / "r")
    with LedgerWriter(rd.path, "train-r0") as led:
        for s in range(1, 3001):
            led.emit("step", step=s, loss=1.0, step_time=0.5 if s < 2990 else 2.0)
        led.emit("ckpt_saved", step=3000, tag="step_0003000", bytes=1, seconds=7.5)
    with open(rd.ledger / "train-r0.jsonl", "ab") as f:
        f.write(b'{"v":1,"kind":"step","st')  # a torn last line, as a live writer leaves it
    events = ch.tail_events(rd, {"step", "ckpt_saved"}, max_bytes=20_000)
    assert 100 < len(events) < 400 and events[-1]["kind"] == "ckpt_saved"
    assert events[0]["step"] > 2000, "only the tail was read"
    assert ch.measured_times(rd) == (2.0, 7.5)
