"""Fast checks of the contracts every other part builds on."""

from __future__ import annotations

import subprocess
import sys


def test_importing_kit_does_not_import_heavy_parts() -> None:
    # DESIGN.md: importing kit must not import DeepSpeed, Textual or Slurm tooling.
    code = (
        "import sys, kit, kit.config, kit.ledger, kit.rundir, kit.checkpoint, kit.data, kit.tools.cli; "
        "bad = [m for m in ('deepspeed', 'textual', 'submitit', 'torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kit_help_lists_verbs() -> None:
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("validate", "demo", "submit", "monitor", "convert", "spikes", "doctor"):
        assert verb in out.stdout
