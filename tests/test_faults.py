"""kit.faults' ``=wait`` gate: a real process stops at the fault point, says so, and goes on only when
the test releases it (the tests that order a trainer, a stream and a kill by events rely on it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from kit import faults

CHILD = ("import sys\nfrom kit.faults import fault_point\n"
         "for step in (1, 2, 3):\n    fault_point('test.point', step, 1)\n    print(step, flush=True)\n")


def test_a_wait_fault_holds_the_process_until_the_test_releases_it(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    env = dict(os.environ, KIT_FAULTS="test.point@2:rank1=wait", KIT_FAULTS_GATE=str(gate))
    proc = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "1"  # step 1 is not gated
        end = time.monotonic() + 120
        while faults.reached(gate, "test.point", 2) != [1]:
            assert proc.poll() is None and time.monotonic() < end, "the process never reached the gate"
            time.sleep(0.05)
        assert proc.poll() is None, "it waits at the gate"
        assert faults.reached(gate, "test.point", 3) == []
        faults.release(gate, "test.point", 2)
        assert proc.stdout.read().split() == ["2", "3"] and proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_wait_fault_without_a_gate_folder_says_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KIT_FAULTS_GATE"}
    env["KIT_FAULTS"] = "test.point@1=wait"
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs KIT_FAULTS_GATE" in proc.stderr
