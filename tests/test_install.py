"""A container-style install: kit built as a wheel and installed into a fresh environment (not
editable), as the Apptainer images install it. The shipped recipes must be found as package data, every
module must be in the wheel, and the embedded default must run end to end from another folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def source_modules() -> list[str]:
    """Every module of the source tree, as its import name (package-dir mapping of pyproject.toml)."""
    roots = {"kit": "kit", "jobs": "kit.jobs", "monitor": "kit.monitor", "tools": "kit.tools",
             "containers": "kit.containers"}
    out = []
    for folder, name in roots.items():
        for p in sorted((ROOT / folder).rglob("*.py")):
            rel = p.relative_to(ROOT / folder).with_suffix("")
            parts = [x for x in rel.parts if x != "__init__"]
            if "__main__" not in parts:
                out.append(".".join([name, *parts]))
    return out


def test_a_wheel_install_runs_the_demo_and_finds_its_recipes(tmp_path: Path, deepspeed_ok: None) -> None:
    # Built from a copy of the checkout's files (tracked and new, not ignored): an in-tree build/ folder
    # left by an earlier build must not leak stale files into the wheel.
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("kit-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", purelib], capture_output=True, text=True,
                               check=True).stdout.strip())
    # The dependencies come from this environment (no download); kit itself only from the wheel.
    (site / "_deps.pth").write_text("".join(f"{p}\n" for p in sys.path if p.endswith("site-packages")))
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONNOUSERSITE"] = "1"
    py = str(venv / "bin" / "python")

    def kit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([py, "-m", "kit.tools.cli", *args], capture_output=True, text=True, cwd=work, env=env,
                              timeout=timeout)

    where = subprocess.run([py, "-c", "import kit, kit.jobs; print(kit.__file__); print(kit.jobs.__file__)"],
                           capture_output=True, text=True, cwd=work, env=env, check=True).stdout
    assert str(ROOT) not in where and str(site) in where, f"kit must come from the wheel, not the checkout: {where}"
    missing = subprocess.run([py, "-c", "import importlib.util, sys\nbad = []\nfor m in sys.argv[1:]:\n"
                              "    try:\n        importlib.util.find_spec(m) or bad.append(m)\n"
                              "    except ImportError:\n        bad.append(m)\nprint(' '.join(bad))",
                              *source_modules()], capture_output=True, text=True, cwd=work, env=env, check=True)
    assert not missing.stdout.strip(), f"modules not in the wheel (pyproject.toml packages): {missing.stdout}"
    ok = kit("validate", "tiny.toml")
    assert ok.returncode == 0 and "is valid" in ok.stdout, ok.stderr
    demo = kit("demo", "--runs-dir", str(work / "runs"), "--name", "w", "--steps", "12")
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    assert (work / "runs" / "w" / "checkpoints" / "latest").read_text() == "step_0000012"
