"""bench/switches: the control-switch check on a slow filesystem: every step vs trainer.control_check_s.

Rank 0 looks for an operator's stop or save-now in ``<run>/control/``. On a login node's laptop
disk a directory listing costs microseconds; on a loaded Lustre/GPFS/NFS metadata server it is a
round trip of milliseconds, on the training thread. Here the run's control/ folder is served through
a FUSE passthrough (libfuse 3 through mfusepy, kernel caches off) that adds ``--latency`` seconds to
every metadata operation (lookup, getattr, readdir, create, unlink): an honest slow filesystem, the
kernel's real FUSE round trip included.

Measured in ONE process, on ONE real DeepSpeed engine (the tiny recipe, world size 1: the shortest
step, the worst case for a fixed per-step cost), side by side:
1. one look alone: RunDir.pending_switches() through the slow mount and on the local disk beneath it;
2. the trainer's own steps (Trainer.step_once) in ABBA blocks, looking every step
   (control_check_s = 0, the old behaviour) against the SwitchWatcher at ``--every`` seconds (the
   default 1 s): the ratio of step times with its 95% interval (bench/_stats.py), and the looks made;
3. promptness: an operator's save-now made at random moments through the mount while the watcher
   runs; the time until the trainer sees it and until its control_ack, against the bound (every_s
   plus one step).
Results and the machine's load: bench/results/switches.json.

    python bench/switches.py [--latency 0.005] [--every 1.0] [--blocks 10] [--steps 25]

Needs /dev/fuse, fusermount3 (Debian: fuse3) and mfusepy (pip); without them it says so and stops.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _stats
import genrun

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "switches.json"


# ------------------------------------------------------------------------------------- the slow mount


def serve(source: str, mount: str, latency: float) -> None:
    """A FUSE passthrough of ``source`` at ``mount``; metadata operations sleep ``latency`` first."""
    import mfusepy as fuse

    class Slow(fuse.Operations):  # type: ignore[misc]
        use_ns = True

        def _p(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def _slow(self) -> None:
            time.sleep(latency)

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            self._slow()
            try:
                st = os.lstat(self._p(path))
            except FileNotFoundError:
                raise fuse.FuseOSError(errno.ENOENT) from None
            return {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime_ns",
                                                "st_mtime_ns", "st_ctime_ns")} | {
                "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

        def readdir(self, path: str, fh: Any) -> list[str]:
            self._slow()
            return [".", "..", *os.listdir(self._p(path))]

        def access(self, path: str, mode: int) -> int:
            self._slow()
            return 0 if os.access(self._p(path), mode) else -errno.EACCES

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            self._slow()
            return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

        def open(self, path: str, flags: int) -> int:
            self._slow()
            return os.open(self._p(path), flags)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: Any = None) -> None:
            os.truncate(self._p(path), length)

        def flush(self, path: str, fh: int) -> None:
            return None

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        def unlink(self, path: str) -> None:
            self._slow()
            os.unlink(self._p(path))

        def rename(self, old: str, new: str) -> None:
            self._slow()
            os.rename(self._p(old), self._p(new))

        def utimens(self, path: str, times: Any = None) -> None:
            os.utime(self._p(path), ns=times)

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._p(path), mode)

        def statfs(self, path: str) -> dict[str, Any]:
            sv = os.statvfs(self._p(path))
            return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                                "f_files", "f_flag", "f_frsize", "f_namemax")}

    # No kernel caching: every lookup and listing goes to the (slow) server, like NFS with actimeo=0
    # (what a control folder needs: a cached "no stop file" would be a stale answer).
    fuse.FUSE(Slow(), mount, foreground=True, nothreads=False, attr_timeout=0.0, entry_timeout=0.0,
              negative_timeout=0.0)


class SlowMount:
    """Mounts ``folder`` (moved aside as its own backing store) through :func:`serve`; unmounts on exit."""

    def __init__(self, folder: Path, latency: float) -> None:
        self.folder, self.latency = folder, latency
        self.backing = folder.with_name(f".{folder.name}-backing")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SlowMount:
        self.folder.rename(self.backing)
        self.folder.mkdir()
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.backing), str(self.folder),
                                      str(self.latency)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.folder):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else ""
                raise SystemExit(f"the FUSE mount did not come up: {err}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount3", "-u", str(self.folder)], check=False, capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fuse_missing() -> str:
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy ({e}): pip install mfusepy"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse"
    if subprocess.run(["which", "fusermount3"], capture_output=True).returncode != 0:
        return "fusermount3: apt-get install fuse3"
    return ""


# ---------------------------------------------------------------------------------------- measuring


def build(runs: Path) -> Any:
    """The tiny recipe's trainer on one in-process rank, health parts off (this bench is about control/)."""
    from kit import dist
    from kit.config import load_recipe
    from kit.launch import create_run
    from kit.trainer import Trainer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [
        f'run.runs_dir="{runs}"', 'run.name="switches"', "trainer.max_steps=1000000", "trainer.nproc=1",
        "checkpoint.interval_steps=1000000", "optim.warmup_steps=2", "health.enabled=false",
        "health.watchdog=false", "health.straggler_interval=0", 'spikes.policy="log"'])
    rd = create_run(cfg, log=lambda *a: None)
    env = dist.from_environ()
    dist.init(env)
    tr = Trainer(cfg, rd, env, seg="bench")
    tr.setup()
    tr.begin_loop()
    return tr


def look_cost(rd: Any, n: int = 40) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        rd.pending_switches()
    return (time.perf_counter() - t0) / n


def blocks(tr: Any, every: float, n_blocks: int, steps: int) -> dict[str, Any]:
    from kit.rundir import SwitchWatcher

    times: dict[str, list[float]] = {"a": [], "b": []}
    looks = {"a": 0, "b": 0}
    inside = {"a": 0.0, "b": 0.0}  # seconds spent in the check itself (direct accounting)
    for mode in _stats.order(n_blocks):
        watcher = SwitchWatcher(tr.rd, 0.0 if mode == "a" else every)

        def timed(w: Any = watcher, m: str = mode) -> frozenset[str]:
            t = time.perf_counter()
            try:
                return w.poll()  # type: ignore[no-any-return]
            finally:
                inside[m] += time.perf_counter() - t

        tr.switches = type("Timed", (), {"poll": staticmethod(timed)})()
        t0 = time.perf_counter()
        for _ in range(steps):
            assert tr.step_once() == "", "the benchmark must not end the segment"
        times[mode].append((time.perf_counter() - t0) / steps)
        looks[mode] += watcher.looks
    r = _stats.paired_ratio(times["a"], times["b"])
    n = n_blocks * steps
    return {**r, "looks_every_step": looks["a"], "looks_watcher": looks["b"], "steps_per_mode": n,
            "check_s_per_step_every_step": inside["a"] / n, "check_s_per_step_watcher": inside["b"] / n,
            "block_s": {k: [round(x, 6) for x in v] for k, v in times.items()}}


def promptness(tr: Any, every: float, requests: int) -> dict[str, Any]:
    """Save-nows made at random moments; when the trainer saw each, and when it acknowledged it."""
    from kit.ledger import read_all
    from kit.rundir import SAVE_NOW, SwitchWatcher

    rng = random.Random(0)
    tr.switches = SwitchWatcher(tr.rd, every)
    seen: list[float] = []
    real_poll = tr.switches.poll

    def poll() -> frozenset[str]:
        got: frozenset[str] = real_poll()
        if SAVE_NOW in got:
            seen.append(time.monotonic())
        return got

    tr.switches.poll = poll  # type: ignore[method-assign]
    made: list[float] = []
    steps: list[float] = []

    def make() -> None:
        made.append(time.monotonic())  # before the request: the latency measured is, if anything, too long
        tr.rd.request(SAVE_NOW, "bench")

    for i in range(requests):
        wait = rng.uniform(0.1, 2.5 * every)
        timer = threading.Timer(wait, make)
        timer.start()
        deadline = time.monotonic() + wait + 60
        while len(seen) <= i:
            t0 = time.perf_counter()
            assert tr.step_once() == ""
            steps.append(time.perf_counter() - t0)
            if time.monotonic() > deadline:
                raise SystemExit("a save-now was not seen within a minute")
        timer.join()
    acks = [e for e in read_all(tr.rd.path, {"control_ack"}) if e["switch"] == SAVE_NOW]
    lat = [s - m for m, s in zip(made, seen, strict=True)]
    step = statistics.median(steps)
    return {"requests": requests, "acks": len(acks), "seen_after_s": [round(x, 4) for x in lat],
            "max_s": max(lat), "median_s": statistics.median(lat), "median_step_s": step,
            "bound_s": every + max(steps), "within_bound": max(lat) <= every + max(steps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.005, help="seconds added to every metadata operation")
    p.add_argument("--every", type=float, default=1.0,
                   help="the watcher's trainer.control_check_s (the default 10 s; 1 s here keeps the run short)")
    p.add_argument("--blocks", type=int, default=10, help="ABBA pairs of blocks")
    p.add_argument("--steps", type=int, default=25, help="steps per block")
    p.add_argument("--requests", type=int, default=5, help="save-nows for the promptness check")
    p.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve(a.serve[0], a.serve[1], float(a.serve[2]))
        return 0
    missing = fuse_missing()
    if missing:
        print(f"bench/switches needs FUSE: missing {missing}", file=sys.stderr)
        return 1
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kit-bench-switches-") as tmp:
        tr = build(Path(tmp) / "runs")
        local = look_cost(tr.rd)
        with SlowMount(tr.rd.control, a.latency):
            slow = look_cost(tr.rd)
            for _ in range(5):  # warm-up
                tr.step_once()
            ab = blocks(tr, a.every, a.blocks, a.steps)
            prompt = promptness(tr, a.every, a.requests)
        tr._finish("done")
    per_step_pct = 100 * slow / ab["median_b"]
    print(f"one look at control/: {slow * 1e3:.2f} ms through the slow mount ({a.latency * 1e3:g} ms per metadata "
          f"operation) vs {local * 1e6:.1f} us on the local disk beneath it")
    print(f"tiny model, 1 rank: step {ab['median_b'] * 1e3:.1f} ms; looking every step costs {per_step_pct:.1f}% of it")
    each, watched = ab["check_s_per_step_every_step"], ab["check_s_per_step_watcher"]
    print(f"time in the check per step (direct): every step {each * 1e3:.2f} ms = {100 * each / ab['median_a']:.2f}% "
          f"of a step; watcher {watched * 1e3:.3f} ms = {100 * watched / ab['median_b']:.3f}%; at the real run's "
          f"~2 s steps, looking every step would cost {100 * slow / 2.0:.2f}%")
    print(_stats.describe(ab, f"watcher (every {a.every:g} s) vs every step: step time"))
    print(f"looks: {ab['looks_every_step']} every step vs {ab['looks_watcher']} with the watcher over "
          f"{ab['steps_per_mode']} steps each")
    print(f"promptness: {prompt['acks']}/{prompt['requests']} save-nows acknowledged; seen after median "
          f"{prompt['median_s']:.2f} s, max {prompt['max_s']:.2f} s (bound: every_s + one step = "
          f"{prompt['bound_s']:.2f} s: {'within' if prompt['within_bound'] else 'OVER'})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **genrun.machine(load),
        "filesystem": f"FUSE passthrough (mfusepy, libfuse 3), +{a.latency} s per metadata operation, no caches",
        "look_s_slow": slow, "look_s_local": local, "every_step_cost_pct": per_step_pct, "every_s": a.every,
        "ab": ab, "promptness": prompt}, indent=1) + "\n")
    print(f"saved {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
