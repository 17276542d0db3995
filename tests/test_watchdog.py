"""The hang watchdog (kit.watchdog): bound, stack dumps, suspects, and a real blocked rank in a 2-rank run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kit import exitcodes
from kit import watchdog as wd
from kit.config import HealthSection
from kit.ledger import hostname, read_all
from kit.stragglers import RankInfo


def _ranks(n: int) -> list[RankInfo]:
    return [RankInfo(r, f"node{r // 2}", r % 2, r % 2, 1000 + r) for r in range(n)]


def test_bound_follows_recent_steps_within_floor_and_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(wd.time, "monotonic", lambda: now[0])
    w = wd.Watchdog("/nonexistent", HealthSection(hang_floor_s=5, hang_ceiling_s=60, hang_factor=10), 0,
                    _ranks(1), "s", "x", last_resort=False)
    assert w.bound() == 60, "the ceiling applies before any step is known"

    def steps(n: int, dt: float) -> None:
        for _ in range(n):
            now[0] += dt
            w.beat(w.step + 1)

    steps(1, 30.0)  # the first step (after setup) is not a step time
    assert w.bound() == 60
    steps(3, 2.0)
    assert w.bound() == 20.0  # 10 x median 2 s
    steps(10, 0.1)
    assert w.bound() == 5.0  # the floor
    steps(20, 100.0)
    assert w.bound() == 60.0  # the ceiling
    steps(40, 1.0)
    w.long_phase("save")
    assert w.bound() == 60.0, "a save gets the ceiling"
    now[0] += 55.0
    w.beat(w.step + 1)  # the step after the save: its 55 s interval is not a step time
    assert w.bound() == 10.0


def test_fire_dumps_stacks_reports_and_exits_with_hang(tmp_path: Path) -> None:
    """One rank in-process: the thread fires, dumps this test's own stack, reports, calls exit(HANG)."""
    codes: list[int] = []
    cfg = HealthSection(hang_floor_s=0.3, hang_ceiling_s=0.6, hang_factor=2, hang_grace_s=1)
    w = wd.Watchdog(tmp_path, cfg, 0, [RankInfo(0, hostname(), 0, -1, 1)], "seg1", "stamp",
                    exit_fn=codes.append, poll_s=0.02, last_resort=False).start()
    for step in range(1, 6):
        time.sleep(0.01)
        w.beat(step)
    t0 = time.monotonic()
    while not codes and time.monotonic() - t0 < 10:
        time.sleep(0.01)  # this test's main thread "hangs" here
    w.stop()
    assert codes == [exitcodes.HANG]
    folder = tmp_path / "stacks" / "seg1-stamp"
    text = (folder / "r00000.txt").read_text()
    header = json.loads(text.splitlines()[0])
    assert header["step"] == 5 and header["stalled_s"] >= header["bound_s"] == 0.3
    assert "test_fire_dumps_stacks_reports_and_exits_with_hang" in text
    frames = wd.read_dumps(folder)[0]["frames"]
    assert any(f == "test_fire_dumps_stacks_reports_and_exits_with_hang" for _, _, f in frames)
    report = json.loads((folder / wd.REPORT).read_text())
    assert report["suspect_ranks"] == [] and "same stack" in report["why"]
    hang = read_all(tmp_path, {"hang"})
    ended = read_all(tmp_path, {"segment_ended"})
    assert hang[0]["bound_s"] == 0.3 and hang[0]["stacks"] == "stacks/seg1-stamp" and hang[0]["seg"] == "seg1"
    assert ended[0]["reason"] == "hang" and ended[0]["exit_code"] == exitcodes.HANG
    assert read_all(tmp_path, {"alert"})[0]["severity"] == "critical"


def test_a_rank_reports_when_rank0_never_dumps(tmp_path: Path) -> None:
    codes: list[int] = []
    cfg = HealthSection(hang_grace_s=0.2)
    w = wd.Watchdog(tmp_path, cfg, 1, _ranks(2), "s", "x", exit_fn=codes.append, last_resort=False)
    w.beat(9)
    report = w.fire(12.0, 10.0)
    assert codes == [exitcodes.HANG]
    assert report["reporter"] == 1 and report["suspect_ranks"] == [0] and report["missing_ranks"] == [0]
    assert report["suspect_nodes"] == ["node0"]
    assert (tmp_path / "ledger" / "watchdog-r1.jsonl").exists()


def _dump(rank: int, frames: list[tuple[str, str]]) -> dict[str, Any]:
    return {"rank": rank, "frames": [(f, 1, fn) for f, fn in frames]}


WAITING = [("/x/torch/distributed/distributed_c10d.py", "all_reduce"), ("/k/trainer.py", "_train_step")]
STUCK = [("/k/faults.py", "fault_point"), ("/k/trainer.py", "run")]
LOADER = [("/k/data.py", "batch"), ("/k/trainer.py", "_train_step")]


def test_suspects_are_the_ranks_the_others_wait_for() -> None:
    ranks = _ranks(4)
    r = wd.analyse({0: _dump(0, WAITING), 1: _dump(1, WAITING), 2: _dump(2, WAITING), 3: _dump(3, STUCK)}, ranks)
    assert r["suspect_ranks"] == [3] and r["suspect_nodes"] == ["node1"] and "collective" in r["why"]
    groups = {tuple(g["ranks"]): g for g in r["groups"]}
    assert groups[(0, 1, 2)]["in_collective"] and groups[(3,)]["top"] == "fault_point (faults.py:1)"
    # two against two: the collective decides, not the count
    r = wd.analyse({0: _dump(0, STUCK), 1: _dump(1, WAITING), 2: _dump(2, STUCK), 3: _dump(3, WAITING)}, ranks)
    assert r["suspect_ranks"] == [0, 2] and r["suspect_nodes"] == ["node0", "node1"]


def test_missing_dumps_majority_and_no_suspect() -> None:
    ranks = _ranks(4)
    r = wd.analyse({0: _dump(0, WAITING), 1: _dump(1, WAITING), 3: _dump(3, WAITING)}, ranks)
    assert r["suspect_ranks"] == [2] and r["missing_ranks"] == [2] and "no stack dump" in r["why"]
    r = wd.analyse({i: _dump(i, WAITING) for i in range(4)}, ranks)
    assert r["suspect_ranks"] == [] and r["suspect_nodes"] == []
    r = wd.analyse({0: _dump(0, LOADER), 1: _dump(1, LOADER), 2: _dump(2, LOADER), 3: _dump(3, STUCK)}, ranks)
    assert r["suspect_ranks"] == [3] and "majority" in r["why"]
    r = wd.analyse({0: _dump(0, LOADER), 1: _dump(1, LOADER), 2: _dump(2, STUCK), 3: _dump(3, STUCK)}, ranks)
    assert r["suspect_ranks"] == [] and "without a clear odd one out" in r["why"]


def test_main_thread_frames_are_found_among_threads(tmp_path: Path) -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="other")
    t.start()
    try:
        wd.dump_stacks(tmp_path, {"rank": 0, "main_thread": f"0x{threading.main_thread().ident:016x}"})
    finally:
        stop.set()
        t.join()
    text = (tmp_path / "r00000.txt").read_text()
    assert text.count("Thread 0x") + text.count("Current thread 0x") >= 2
    frames = wd.read_dumps(tmp_path)[0]["frames"]
    assert frames[0][2] == "dump_stacks" and "wait" not in [f for _, _, f in frames]


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.timeout(300)  # should the watchdog fail, its last resort ends the ranks at 1.5 x 60 + 2 x 10 s
def test_blocked_rank_is_caught_stacks_dumped_segment_ends_with_hang_then_resumes(
        deepspeed_ok: None, tiny_cfg: Any, capfd: pytest.CaptureFixture[str]) -> None:
    """A real 2-rank DeepSpeed run; rank 1 blocks forever after step 5 (kit.faults). Rank 0 waits in the
    step's all-reduce. The watchdog must fire within its bound, leave both stacks in the run directory,
    name rank 1 and this node, and end both ranks with HANG. A resubmission then resumes the run."""
    from kit.launch import create_run, run_local_segment

    cfg = tiny_cfg("hang", **{"health.hang_floor_s": 2.0, "health.hang_ceiling_s": 60.0, "health.hang_factor": 5.0,
                              "health.hang_grace_s": 10.0, "health.period_s": 0.5})
    rd = create_run(cfg, log=lambda *a: None)
    t0 = time.monotonic()
    out = run_local_segment(rd, cfg, seg="s1", extra_env={"KIT_FAULTS": "step.after@5:rank1=hang"})
    wall = time.monotonic() - t0
    logs = capfd.readouterr()
    assert logs.err.count(f"exitcode  : {exitcodes.HANG}") == 2, logs.err[-3000:]  # both ranks (torchrun's summary)
    [hang] = [e for e in read_all(rd.path, {"hang"}) if e["seg"] == "s1"]
    # the bound came from the step times (5 x median, at least the 2 s floor), not the 60 s ceiling
    assert hang["step"] == 5 and 2.0 <= hang["bound_s"] < 60.0
    assert hang["bound_s"] <= hang["stalled_s"] < hang["bound_s"] + 10.0, "fired within its bound (+ a poll)"
    assert wall < hang["bound_s"] + 120, "ended by the watchdog, not by a timeout"
    assert hang["suspect_ranks"] == [1] and hang["suspect_nodes"] == [hostname()]
    folder = rd.path / hang["stacks"]
    assert sorted(p.name for p in folder.glob("r*.txt")) == ["r00000.txt", "r00001.txt"]
    assert "fault_point" in (folder / "r00001.txt").read_text()
    assert "all_reduce" in (folder / "r00000.txt").read_text()
    ended = [e for e in read_all(rd.path, {"segment_ended"}) if e["seg"] == "s1"]
    assert [(e["reason"], e["exit_code"]) for e in ended] == [("hang", exitcodes.HANG)]
    alert = [a for a in read_all(rd.path, {"alert"}) if a["seg"] == "s1" and a["severity"] == "critical"]
    assert "suspect ranks 1" in alert[0]["message"] and hostname() in alert[0]["message"]
    assert out.step == 5
    # what the chain does next: resubmit; the segment resumes from the last checkpoint (step 4) and finishes
    again = run_local_segment(rd, cfg, seg="s2", quiet=True)
    assert (again.reason, again.step) == ("done", cfg.trainer.max_steps)
    loaded = [e for e in read_all(rd.path, {"ckpt_loaded"}) if e["seg"] == "s2"]
    assert loaded[0]["step"] == 4


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.timeout(300)
def test_a_rank_stuck_in_setup_ends_the_segment_with_hang(
        deepspeed_ok: None, tiny_cfg: Any, capfd: pytest.CaptureFixture[str]) -> None:
    """A real 2-rank run; rank 1 blocks in setup, before DeepSpeed's initialisation, so rank 0 waits in
    the engine's first collective and no step ever completes. The setup watchdog (started before the
    rendezvous) must fire at health.setup_timeout_s, name rank 1, and end both ranks with HANG.
    Bounds for a busy machine: 45 s of setup (rank 0 must be in DeepSpeed's initialisation when it
    fires), a generous allowance for the watchdog's poll, and the clean segment after it gets an
    amended bound (its setup is not what is tested; its handover to the step watchdog is)."""
    from kit.amend import amend_overrides
    from kit.launch import create_run, run_local_segment

    bound = 45.0
    cfg = tiny_cfg("setuphang", **{"health.setup_timeout_s": bound, "health.hang_grace_s": 10.0,
                                   "health.hang_floor_s": 2.0, "health.hang_ceiling_s": 600.0})
    rd = create_run(cfg, log=lambda *a: None)
    t0 = time.monotonic()
    out = run_local_segment(rd, cfg, seg="s1", extra_env={"KIT_FAULTS": "setup.before_engine:rank1=hang"})
    wall = time.monotonic() - t0
    logs = capfd.readouterr()
    # The first rank to exit with HANG makes torchrun SIGTERM the other (a CI run saw it reach rank 1 before
    # rank 1's own HANG exit): at least one HANG exit in torchrun's summary; both ranks' stacks below.
    assert logs.err.count(f"exitcode  : {exitcodes.HANG}") >= 1, logs.err[-3000:]
    assert out.reason == "hang"
    [hang] = [e for e in read_all(rd.path, {"hang"}) if e["seg"] == "s1"]
    assert hang["phase"] == "setup" and hang["bound_s"] == bound and hang["step"] == -1
    assert bound <= hang["stalled_s"] < bound + 30.0, "fired at its bound (+ a poll on a busy machine)"
    assert wall < 600, "ended by the setup watchdog, not by the 600 s step ceiling or a timeout"
    assert hang["suspect_ranks"] == [1] and hang["suspect_nodes"] == [hostname()]
    folder = rd.path / hang["stacks"]
    assert sorted(p.name for p in folder.glob("r*.txt")) == ["r00000.txt", "r00001.txt"]
    assert "fault_point" in (folder / "r00001.txt").read_text()
    assert "initialize" in (folder / "r00000.txt").read_text()
    alert = [a for a in read_all(rd.path, {"alert"}) if a["seg"] == "s1" and a["severity"] == "critical"]
    assert "setup did not finish" in alert[0]["message"] and "suspect ranks 1" in alert[0]["message"]
    assert not read_all(rd.path, {"segment_started"}), "setup never finished"
    # without the fault, the same run sets up and trains (the setup watchdog hands over to the step one)
    amend_overrides(rd, ["health.setup_timeout_s=900", "health.hang_floor_s=300"], who="test",
                    reason="a busy machine's setup", log=lambda m: None)
    again = run_local_segment(rd, rd.load_config(), seg="s2", quiet=True)
    assert (again.reason, again.step) == ("done", cfg.trainer.max_steps)
    assert not [e for e in read_all(rd.path, {"hang"}) if e["seg"] == "s2"]


def test_setup_ranks_and_stamp_from_the_environment() -> None:
    """Before any collective: every rank of one launch names the same stack folder, and nodes come
    from KIT_NODES (rank r on node r // ranks-per-node)."""
    env = {"TORCHELASTIC_RUN_ID": "abcdef123456", "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3",
           "MASTER_PORT": "29511"}
    assert wd.setup_stamp(env) == "setup-abcdef12-42-3-29511"
    ranks = wd.setup_ranks(5, 8, 4, {"KIT_NODES": "gpu1,gpu2"})
    assert [r.host for r in ranks] == ["gpu1"] * 4 + ["gpu2"] * 4
    assert [r.local_rank for r in ranks] == [0, 1, 2, 3] * 2
    assert ranks[5].pid > 0 and ranks[4].pid == 0
    alone = wd.setup_ranks(1, 2, 2, {})
    assert [r.host for r in alone] == [hostname(), hostname()]
    unknown = wd.setup_ranks(0, 4, 2, {})
    assert [r.host for r in unknown] == [hostname(), hostname(), "?", "?"]
    # hosts the table did not know come from the dumps' headers
    dumps = {0: {"host": hostname(), "frames": [("x/torch/distributed/c.py", 1, "all_reduce")]},
             2: {"host": "gpu7", "frames": [("kit/faults.py", 1, "fault_point")]},
             1: {"host": hostname(), "frames": [("x/torch/distributed/c.py", 1, "all_reduce")]},
             3: {"host": "gpu7", "frames": [("x/torch/distributed/c.py", 1, "all_reduce")]}}
    report = wd.analyse(dumps, unknown)
    assert report["suspect_ranks"] == [2] and report["suspect_nodes"] == ["gpu7"]


GIL_HOG = """
import re, sys, time
from kit.config import HealthSection
from kit.stragglers import RankInfo
from kit.watchdog import Watchdog
cfg = HealthSection(hang_floor_s=0.2, hang_ceiling_s=0.4, hang_grace_s=0.2)
w = Watchdog(sys.argv[1], cfg, 0, [RankInfo(0, "n", 0, -1, 1)], "s", "x", poll_s=0.05).start()
w.beat(1)
time.sleep(0.3)  # let the watchdog thread arm the C-level timer
print("hogging", flush=True)
re.match(r"(a+)+$", "a" * 64 + "b")  # catastrophic backtracking: C code that never releases the GIL
print("unreachable", flush=True)
"""


def test_a_hang_holding_the_gil_is_still_dumped_and_ended(tmp_path: Path) -> None:
    """The watchdog thread cannot run while C code holds the GIL; faulthandler's C timer (the last
    resort, 1.5 x ceiling + 2 x grace = 1 s here) must still dump the stacks and end the process."""
    import subprocess
    import sys

    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", GIL_HOG, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "hogging" in p.stdout and "unreachable" not in p.stdout
    assert "Timeout (0:00:01)!" in p.stderr and "in <module>" in p.stderr, p.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "stacks").exists(), "the Python-level watchdog could not have run"


# ------------------------------------------------------------------------------------------ at a layout


def test_hang_suspects_are_named_by_their_coordinates(tmp_path: Path) -> None:
    """At TP2 x PP2 x DP2 (8 ranks, 4 a node) the rank table carries each rank's (tensor, pipeline, data);
    the hang event, hang.json and the alert name the suspect's node and coordinates."""
    from kit.parallel.layout import Layout, placed

    lay = Layout(tensor=2, pipeline=2, data=2)
    ranks = placed([RankInfo(r, f"node{r // 4}", r % 4, r % 4, 1000 + r) for r in range(8)], lay)
    assert ranks[6].coords is not None and ranks[6].coords.to_dict() == {"tensor": 0, "pipeline": 1, "data": 1}
    assert placed(ranks[:3], lay) == ranks[:3]  # not the layout's world: left as it is
    dumps = {r: _dump(r, STUCK if r == 6 else WAITING) for r in range(8)}
    r = wd.analyse(dumps, ranks)
    assert r["suspect_coords"] == [{"rank": 6, "node": "node1", "tensor": 0, "pipeline": 1, "data": 1}]
    codes: list[int] = []
    w = wd.Watchdog(tmp_path, HealthSection(hang_grace_s=0.2), 6, ranks, "s", "x", exit_fn=codes.append,
                    last_resort=False)
    report = w.fire(12.0, 10.0)  # only rank 6 dumps: the 7 missing ranks are the suspects
    assert codes == [exitcodes.HANG] and len(report["suspect_coords"]) == 7
    (hang,) = read_all(tmp_path, {"hang"})
    assert {"rank": 0, "node": "node0", "tensor": 0, "pipeline": 0, "data": 0} in hang["suspect_coords"]
    (alert,) = read_all(tmp_path, {"alert"})
    assert "0 (node0; tensor 0, pipeline 0, data 0)" in alert["message"]
    assert alert["suspect_coords"] == hang["suspect_coords"]


def test_setup_ranks_are_placed_when_the_layout_divides_the_world(tmp_path: Path) -> None:
    w = wd.for_setup(tmp_path, HealthSection(), 3, 4, 4, "s", layout=(2, 2))
    assert w is not None
    w.stop()
    assert [str(r.coords) for r in w.ranks][3] == "tensor 1, pipeline 1, data 0"
    w = wd.for_setup(tmp_path, HealthSection(), 0, 3, 3, "s", layout=(2, 1))  # 3 ranks cannot be TP2
    assert w is not None
    w.stop()
    assert all(r.coords is None for r in w.ranks)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.timeout(600)
def test_a_hang_at_tp2_pp2_names_the_stuck_ranks_coordinates(deepspeed_ok: None, tiny_cfg: Any,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    """A real 4-rank DeepSpeed run at TP2 x PP2 (AutoTP + PipelineModule on gloo); rank 3, the second
    tensor rank of the last stage, blocks after step 3. The hang event and its alert name rank 3, this
    node and (tensor 1, pipeline 1, data 0)."""
    from kit.launch import create_run, run_local_segment

    cfg = tiny_cfg("hanglayout", **{"parallel.tensor": 2, "parallel.pipeline": 2, "trainer.nproc": 4,
                                    "slurm.tasks_per_node": 4, "deepspeed.zero_stage": 1, "batch.grad_accum": 2,
                                    "health.hang_floor_s": 3.0, "health.hang_ceiling_s": 30.0,
                                    "health.hang_factor": 5.0, "health.hang_grace_s": 15.0})
    rd = create_run(cfg, log=lambda *a: None)
    out = run_local_segment(rd, cfg, seg="s1", extra_env={"KIT_FAULTS": "step.after@3:rank3=hang"})
    logs = capfd.readouterr()
    assert out.reason == "hang", logs.err[-3000:]
    [hang] = [e for e in read_all(rd.path, {"hang"}) if e["seg"] == "s1"]
    assert hang["suspect_ranks"] == [3], hang
    assert hang["suspect_coords"] == [{"rank": 3, "node": hostname(), "tensor": 1, "pipeline": 1, "data": 0}]
    alert = [a for a in read_all(rd.path, {"alert"}) if a["seg"] == "s1" and a["severity"] == "critical"]
    assert f"suspect ranks 3 ({hostname()}; tensor 1, pipeline 1, data 0)" in alert[0]["message"]
    from kit.run.summary import collect

    summary, _ = collect(rd.path, use_slurm=False)  # `kit status` and the monitor show the layout it ran at
    assert summary.layout is not None and summary.layout["label"] == "TP2 x PP2 x DP1"
