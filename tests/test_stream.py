"""`kit stream` following a live run of real DeepSpeed ranks, killed mid-way and restarted.

The first stream process is SIGKILLed by a kit fault point right after it uploaded step 4 (before
its remote verification and state update); the restarted one must resume that upload without
sending a file again, ship the rest, convert them, apply remote keep-every-N and local keep-last
retention, and never delete a local checkpoint before its remote copy verified. The destination is
file:// (the S3 path of the same upload code is tested in test_upload.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kit.ledger import read_all
from kit.tools.remote import verify_url

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]


def wait_until(cond: Callable[[], bool], what: str, bound_s: float) -> None:
    """Wait for an event (a generous bound: it only says how long to wait before calling it lost)."""
    end = time.monotonic() + bound_s
    while not cond():
        assert time.monotonic() < end, f"not seen within {bound_s} s: {what}"
        time.sleep(0.1)


def stream_cmd(run: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kit.tools.cli", "stream", str(run), "--to", url, "--poll", "0.3", "--exit-when-done",
            "--keep-every", "4", "--keep-last", "1", *extra]


def test_stream_live_run_restart_retention(tiny_cfg: Any, tmp_path: Path) -> None:
    from kit.launch import create_run, run_local_segment

    cfg = tiny_cfg("live", **{"deepspeed.zero_stage": 2})  # 8 steps, checkpoints at 2, 4, 6, 8
    rd = create_run(cfg, log=lambda *a: None)
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    env = dict(os.environ, KIT_FAULTS="stream.after_upload@4")
    first = subprocess.Popen(stream_cmd(rd.path, url), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        out = run_local_segment(rd, cfg, quiet=True)
        assert out.reason == "done"
        assert first.wait(timeout=120) == -9  # killed after uploading step 4, before verifying it
    finally:
        if first.poll() is None:
            first.kill()
    state = json.loads((rd.exports / "stream.json").read_text())
    assert state["done"]["step_0000002"]["remote_verified"] is True
    assert not state["done"].get("step_0000004", {}).get("remote_verified")

    second = subprocess.run(stream_cmd(rd.path, url, "--convert"), capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, KIT_FAULTS=""))
    assert second.returncode == 0, second.stderr[-2000:]

    events = [e for e in read_all(rd.path) if e["src"] == "stream"]
    uploads = [e for e in events if e["kind"] == "ckpt_uploaded" and e.get("what") == "checkpoint"]
    step4 = [e for e in uploads if e["tag"] == "step_0000004"]
    assert len(step4) == 2 and step4[1]["sent"] == 0 and step4[1]["skipped"] == step4[0]["sent"]  # resumed
    assert sorted({e["tag"] for e in uploads}) == [f"step_000000{s}" for s in (2, 4, 6, 8)]

    # remote retention: multiples of 4 (and the newest) stay, verified; 2 and 6 are gone
    for step in (4, 8):
        manifest, problems = verify_url(f"{url}/checkpoints/step_000000{step}")
        assert manifest is not None and problems == []
    assert not (remote / "checkpoints" / "step_0000002").exists()
    assert not (remote / "checkpoints" / "step_0000006").exists()
    assert {e["tag"] for e in events if e["kind"] == "ckpt_deleted" and e["where"] == "remote"} == {
        "step_0000002", "step_0000006"}
    # exports of the checkpoints shipped after the restart, verified remotely, local copies removed
    for step in (4, 6, 8):
        _, problems = verify_url(f"{url}/hf/step_000000{step}")
        assert problems == []
    assert not list(rd.exports.glob("*-hf"))

    # local retention: only the newest stays, and nothing was deleted before its remote copy verified
    assert sorted(p.name for p in rd.checkpoints.glob("step_*")) == ["step_0000008"]
    for i, e in enumerate(events):
        if e["kind"] == "ckpt_deleted" and e["where"] == "local":
            assert any(v["kind"] == "ckpt_verified" and v["tag"] == e["tag"] and v["where"] == "remote" and v["ok"]
                       for v in events[:i]), e["tag"]

    # a third pass has nothing to do and keeps everything as it is
    again = subprocess.run(stream_cmd(rd.path, url, "--once"), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "shipped 0 checkpoint(s)" in again.stdout


def test_the_trainer_keeps_what_a_lagging_stream_has_not_shipped_within_its_bound(tiny_cfg: Any,
                                                                                   tmp_path: Path) -> None:
    """A real run with checkpoint.keep_last = 1 and a stream that stalls right after its first upload
    (a kit fault point that waits for the test's go), so the run saves steps 4, 6 and 8 while nothing
    after step 2 is shipped. The stream's hold (checkpoint.stream_hold_max = 1) makes the trainer keep
    one unshipped checkpoint (step 4) beyond keep_last; the other (6) is deleted, and the trainer says
    so in an alert. Ordered by events, not speed: the trainer waits after step 3 (past step 2's save)
    until the stream has uploaded step 2, and the stream waits there until the run has ended."""
    from kit import checkpoint as ck
    from kit import faults
    from kit.launch import create_run, run_local_segment

    cfg = tiny_cfg("held", **{"checkpoint.keep_last": 1, "checkpoint.stream_hold_max": 1})
    rd = create_run(cfg, log=lambda *a: None)
    url = f"file://{tmp_path / 'remote'}"
    gate = tmp_path / "gate"
    stream = subprocess.Popen(stream_cmd(rd.path, url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=dict(os.environ, KIT_FAULTS="stream.after_upload@2=wait", KIT_FAULTS_GATE=str(gate)))
    result: dict[str, Any] = {}

    def train() -> None:
        result["out"] = run_local_segment(rd, cfg, quiet=True, extra_env={
            "KIT_FAULTS": "step.after@3=wait", "KIT_FAULTS_GATE": str(gate)})

    runner = threading.Thread(target=train)
    runner.start()
    try:
        wait_until(lambda: faults.reached(gate, "stream.after_upload", 2) or stream.poll() is not None,
                   "the stream uploaded step 2", 600)
        assert stream.poll() is None, stream.stderr.read().decode()[-3000:] if stream.stderr else ""
        wait_until(lambda: faults.reached(gate, "step.after", 3) or not runner.is_alive(),
                   "the trainer finished step 3 (after saving step 2)", 600)
        faults.release(gate, "step.after", 3)  # the stream is stuck after step 2: the run goes on to the end
        runner.join(timeout=900)
        assert not runner.is_alive(), "the run did not end"
        assert result["out"].reason == "done", result["out"]
        faults.release(gate, "stream.after_upload", 2)  # the stream catches up after the run has ended
        assert stream.wait(timeout=300) == 0
    finally:
        faults.release(gate, "step.after", 3)
        faults.release(gate, "stream.after_upload", 2)
        runner.join(timeout=900)
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    events = read_all(rd.path)
    saved8 = next(e["t"] for e in events if e["kind"] == "ckpt_saved" and e["step"] == 8)
    uploads = {e["tag"]: e["t"] for e in events if e["kind"] == "ckpt_uploaded" and e.get("what") == "checkpoint"}
    assert saved8 < uploads["step_0000004"], "the stream was behind when the run saved its last checkpoint"
    assert sorted(uploads) == ["step_0000002", "step_0000004", "step_0000008"]  # 4 held; 6 lost to the bound
    by_trainer = {e["tag"] for e in events if e["kind"] == "ckpt_deleted" and e["src"] != "stream"}
    assert "step_0000006" in by_trainer and "step_0000004" not in by_trainer
    [alert] = [e for e in events if e["kind"] == "alert" and "before `kit stream` shipped" in e["message"]]
    assert alert["tags"] == ["step_0000006"] and "stream_hold_max = 1" in alert["message"]
    assert not (rd.checkpoints / ck.HOLDS / "stream.json").exists(), "the stream released its hold on exit"


def test_a_second_stream_on_the_same_run_is_refused(tmp_path: Path) -> None:
    """Two streams would race on the same uploads and share one ledger file: the second refuses."""
    import subprocess
    import sys
    import time

    from kit.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    (rd.path / "run.toml").write_text("")
    first = subprocess.Popen([sys.executable, "-m", "kit.tools.cli", "stream", str(rd.path),
                              "--to", str(tmp_path / "dst"), "--poll", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = rd.exports / "stream.lock"
        for _ in range(200):
            if lock.exists() and lock.read_text().startswith("pid"):
                break
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "kit.tools.cli", "stream", str(rd.path), "--to",
                                 str(tmp_path / "dst"), "--once"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"another `kit stream` is already following {rd.path} (pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
    again = subprocess.run([sys.executable, "-m", "kit.tools.cli", "stream", str(rd.path),
                            "--to", str(tmp_path / "dst"), "--once"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # the lock died with its process
