"""What ``kit eval`` shows: the per-source table, greedy samples to read, and the validation curves.

The curves come from the ledger's ``eval`` events; for a step evaluated more than once (a rollback
replayed it, or ``kit eval --record`` scored it again) the latest event wins, as for step events.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kit.data import EOS_ID
from kit.errors import KitError
from kit.evaluation import EVAL_KIND, EvalSet
from kit.ledger import read_all
from kit.rundir import RunDir

LIVE = ("live", "stream", "checkpoint", "export")


def history(events: list[dict[str, Any]], by: tuple[str, ...] = LIVE) -> dict[str, dict[int, float]]:
    """source -> {step: validation loss} from ``eval`` events (time order; the latest wins)."""
    out: dict[str, dict[int, float]] = {}
    for e in events:
        step, sources = e.get("step"), e.get("sources")
        if e.get("kind", EVAL_KIND) != EVAL_KIND or e.get("by", "live") not in by:
            continue
        if isinstance(step, bool) or not isinstance(step, int) or not isinstance(sources, dict):
            continue
        for name, v in sources.items():
            loss = v.get("loss") if isinstance(v, dict) else None
            if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                out.setdefault(str(name), {})[step] = float(loss)
    return out


def generate_samples(model: Any, es: EvalSet, tok: Any, per_source: int, new_tokens: int,
                     prompt_tokens: int) -> dict[str, list[dict[str, str]]]:
    """Greedy continuations of the first ``prompt_tokens`` of a few held-out sequences per source:
    deterministic (argmax), short, decoded for a person to read."""
    import torch
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=EOS_ID, pad_token_id=3,
                           use_cache=True)
    out: dict[str, list[dict[str, str]]] = {}
    for src in es.sources:
        rows = []
        for w in src.windows[:per_source]:
            prompt = torch.from_numpy(w[:prompt_tokens].copy()).unsqueeze(0)
            with torch.no_grad():
                ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
            rows.append({"prompt": tok.decode(prompt[0].tolist()),
                         "continuation": tok.decode(ids[0, prompt.shape[1]:].tolist())})
        out[src.name] = rows
    return out


def print_result(res: dict[str, Any]) -> None:
    """The per-source table (with the live evaluation beside it) and the samples."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    live = res.get("live") or {}
    title = f"{res['kind']} {res['tag'] or res['target']} (step {res['step']}, {res['dtype']}) on {res['data']}"
    table = Table(title=title)
    for col in ("source", "language", "loss", "ppl", "tokens", "live loss", "diff"):
        table.add_column(col, justify="left" if col in ("source", "language") else "right")
    for name, v in res["sources"].items():
        lv = live.get("sources", {}).get(name)
        diff = "-" if lv is None else ("identical" if lv == v["loss"] else f"{abs(lv - v['loss']):.2e}")
        table.add_row(name, v["language"] or "-", f"{v['loss']:.4f}", f"{v['ppl']:.4g}", f"{v['tokens']:,}",
                      "-" if lv is None else f"{lv:.4f}", diff)
    table.add_row("all", "", f"{res['loss']:.4f}", f"{res['ppl']:.4g}", f"{res['tokens']:,}", "", "", style="bold")
    console.print(table)
    if res.get("live") is None and res["data"] == "held-out":
        console.print(f"no live evaluation of step {res['step']} in the ledger to compare with", style="dim")
    for note in res.get("notes", []):
        console.print(f"not evaluated: {note}", style="yellow")
    for name, rows in (res.get("samples") or {}).items():
        for r in rows:
            console.print(f"[bold]{name}[/]: [dim]{_one_line(r['prompt'])}[/] {_one_line(r['continuation'])}",
                          highlight=False, markup=True)
    if res.get("plot"):
        console.print(f"plot: {res['plot']}")
    console.print(f"scored in {res['seconds']:.1f}s", style="dim")


def _one_line(text: str, limit: int = 200) -> str:
    from rich.markup import escape

    return escape(" ".join(text.split())[:limit])


def plot_history(rd: RunDir, path: Path, mark: int | None = None) -> Path:
    """Per-source validation loss over the run's steps (PNG); ``mark``: the step just scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = history(read_all(rd.path, {EVAL_KIND}))
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, points in sorted(hist.items()):
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], ".-", lw=1, ms=3, label=name)
    if mark is not None:
        ax.axvline(mark, color="grey", lw=0.8, ls="--")
    if not hist:
        ax.text(0.5, 0.5, "no evaluations in the ledger yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, ncol=max(1, math.ceil(len(hist) / 8)))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"validation loss per source: {rd.path.name}")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    except OSError as e:
        raise KitError(f"cannot write --plot {path}: {e.strerror or e}; choose another file") from None
    finally:
        plt.close(fig)
    return path
