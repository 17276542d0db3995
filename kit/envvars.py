"""Every ``KIT_*`` environment variable the kit reads or sets, named once.

Why a module: these variables are a contract between processes that do not share code paths (the
chain's driver sets them, the trainer's ranks read them; the tests and images set others), and a
misspelt name fails silently. Use the constants, never the string.
"""

from __future__ import annotations

import os

# Set by the chain's driver (kit.jobs.driver) or the local launcher for each rank of a segment.
SEGMENT = "KIT_SEGMENT"
"""Segment id (``<job id>_<restart>`` under Slurm, ``local-...`` locally): the ``seg`` of ledger events."""
DEADLINE = "KIT_DEADLINE"
"""Unix time the allocation ends (from squeue): the trainer saves and leaves before it."""
NODES = "KIT_NODES"
"""Comma-separated node names in rank order: the setup watchdog's rank -> node table."""

# Chosen by the operator or the tests.
EXECUTOR = "KIT_EXECUTOR"
"""Force submitit's executor ("local" or "slurm") for ``kit submit`` (tests run local chains)."""
FAULTS = "KIT_FAULTS"
"""Test-only fault injection at named points (kit.faults); production never sets it."""
FAULTS_SEGMENTS = "KIT_FAULTS_SEGMENTS"
"""Test-only: inject KIT_FAULTS only into these chain segments (comma-separated indices)."""
FAULTS_GATE = "KIT_FAULTS_GATE"
"""Test-only: the folder where ``=wait`` fault points say they are reached and wait for the test's go."""
REQUIRE_REAL = "KIT_REQUIRE_REAL"
"""CI: a test needing Slurm or DeepSpeed that cannot find them fails instead of skipping."""
LEDGER_STRICT = "KIT_LEDGER_STRICT"
"""Tests: a ledger writer raises on a field that does not conform to the schema (production writes null)."""

# Set inside the Apptainer images (containers/*.def) and by their build.
IMAGE_TARGET = "KIT_IMAGE_TARGET"
"""The image's target in containers/pins.toml (a100, h100): the preflight checks the pins against it."""
COMMIT = "KIT_COMMIT"
"""The kit commit an image was built from (recorded in the image's labels)."""
SRC = "KIT_SRC"
"""Build argument: where the image build finds kit's source."""


def get(name: str, default: str = "") -> str:
    """The value of one of the names above (empty when unset)."""
    return os.environ.get(name, default)
