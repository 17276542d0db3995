"""Visible progress (kit.progress): the trainer's live step lines and the CLI's rich bars, on real data
preparation (this machine's gettext catalogues) rendered by a real rich console into a buffer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kit.progress import PREFIX, Bars, StepLines, duration


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_step_lines_first_then_every_interval_then_the_last() -> None:
    clock, out = Clock(), []
    lines = StepLines(10.0, max_steps=100, tokens_per_step=1000, out=out.append, clock=clock)
    assert lines.step(41, 5.25) is not None  # the segment's first step (a resume at 40): said at once
    assert out[0] == f"{PREFIX}41/100 | loss 5.2500 | - tok/s | - s/step | ETA ?"
    for step in range(42, 50):  # 0.5 s a step: nothing for 10 s
        clock.t += 0.5
        assert lines.step(step, 5.0) is None
    for step in range(50, 62):
        clock.t += 0.5
        lines.step(step, 4.5)
    # 20 steps since the first line, 10 s: 0.5 s/step, 2000 tok/s; 40 steps to go = 20 s
    assert out[1] == f"{PREFIX}61/100 | loss 4.5000 | 2,000 tok/s | 0.5 s/step | ETA 20s"
    clock.t += 1.0
    lines.step(100, 4.0, last=True)
    assert out[2].startswith(f"{PREFIX}100/100 | loss 4.0000") and out[2].endswith("ETA 0s") and lines.lines == 3
    assert StepLines(0.0, 10, 10, out=out.append).step(1, 1.0) is None  # progress_s = 0: off


def test_durations_read_well() -> None:
    assert [duration(x) for x in (5, 125, 7300, None, float("inf"))] == ["5s", "2m05s", "2h01m", "?", "?"]


def test_bars_show_bytes_with_a_rate_and_items_with_theirs() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=140, force_terminal=True, color_system=None)
    with Bars(console=console) as bars:
        t = bars.task("uploading", 4 * 2**20, unit="bytes")
        t.advance(2 * 2**20)
        n = bars.task("reading sources", 6, unit="sources")
        n.advance(3)
        with bars.phase("training a tokenizer"):
            pass
    text = buf.getvalue()
    assert "uploading" in text and "2.1/4.2 MB" in text and "reading sources" in text and "3/6" in text
    assert "training a tokenizer" in text
    quiet = Bars(enabled=False)
    with quiet:
        quiet.task("x", 1).advance(1)  # a no-op, not an error


@pytest.mark.slow
def test_data_preparation_shows_its_phases(tmp_path: Path, tiny_cfg: Any) -> None:
    from kit.data import prepare

    cfg = tiny_cfg("bars")
    buf = io.StringIO()
    with Bars(console=Console(file=buf, width=160, force_terminal=True, color_system=None)) as bars:
        meta = prepare(cfg, tmp_path / "data", log=lambda m: None, bars=bars)
    text = buf.getvalue()
    total = sum(s["bytes"] for s in meta["sources"])
    assert f"{len(cfg.data.sources)}/{len(cfg.data.sources)}" in text  # every source read
    assert f"training a {cfg.data.vocab_size}-token BPE on {total / 1e6:.1f} MB" in text
    assert "tokenizing" in text and "100%" in text
