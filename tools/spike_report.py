"""The postmortem as files: report.md with PNG plots (matplotlib, Agg) and spikes.json.

The JSON is the analysis of tools/postmortem.analyse as it is; the Markdown says the same for a
person, one section per spike, and links the plots written beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def actions(sp: dict[str, Any]) -> str:
    return ", ".join(sp["actions"]) if sp["actions"] else "none (found offline)"


def table(rows: list[list[str]], head: list[str]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def summary_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for sp in res["spikes"]:
        steps = str(sp["start"]) if sp["start"] == sp["end"] else f"{sp['start']}-{sp['end']}"
        size = f"+{sp['size']:.0%}" if sp.get("size") is not None else "–"
        rb = "; ".join(f"to {r['to_step']}, skipped samples {r['skip_start']}-{r['skip_end'] - 1}"
                       for r in sp["rollbacks"] if r.get("skip_end") is not None)
        rows.append([steps, fmt(sp["peak_loss"]), fmt(sp["baseline"]), size, str(sp["duration"]),
                     fmt(sp["score"], ".1f"), ", ".join(sp["metrics"]), actions(sp), sp["found_by"], rb or "–",
                     verdict(sp.get("validation") or {})])
    return rows


SUMMARY_HEAD = ["steps", "peak loss", "expected", "size", "duration", "score", "on", "action", "found", "rollback",
                "validation"]


def verdict(v: dict[str, Any]) -> str:
    """One word or a few for a spike's validation verdict (tools.postmortem.validation_around)."""
    if v.get("verdict") == "damaged":
        worst = v["damaged"][:3]
        return "damaged: " + ", ".join(f"{n} {v['sources'][n]['rise']:+.0%}" for n in worst) + \
            (" ..." if len(v["damaged"]) > 3 else "")
    return str(v.get("verdict") or "–")


def write_report(res: dict[str, Any], out: Path) -> list[Path]:
    """Write report.md, spikes.json and the plots into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "spikes.json"]
    files[0].write_text(json.dumps(res, indent=1, default=str))
    import matplotlib

    matplotlib.use("Agg")
    lines = [f"# Loss spikes: {res['run']}", "",
             f"{len(res['spikes'])} spike(s) in {res['steps_logged']} logged steps; {res['rollbacks']} rollback(s). "
             f"Detector: window {res['detector']['window']}, threshold {res['detector']['threshold']}, "
             f"min rise {res['detector']['min_rise']:.0%}, policy **{res['detector']['policy']}**.", ""]
    if res.get("bad_lines"):
        lines += [f"{res['bad_lines']} unreadable ledger line(s) were left out.", ""]
    if "curve" in res:
        files.append(_overview(res, out / "overview.png"))
        lines += ["![loss over the run](overview.png)", ""]
    lines += [*table(summary_rows(res), SUMMARY_HEAD), ""]
    data = res.get("data") or {}
    if data.get("note"):
        lines += [f"Data: {data['note']}.", ""]
    for sp in res["spikes"]:
        lines += _section(sp, out, files)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    files.append(out / "report.md")
    return files


def _section(sp: dict[str, Any], out: Path, files: list[Path]) -> list[str]:
    name = f"spike_{sp['start']:07d}"
    lines = [f"## Step {sp['start']}" + (f"-{sp['end']}" if sp["end"] != sp["start"] else ""), "",
             f"Peak loss {fmt(sp['peak_loss'])} at step {sp['peak_step']} against an expected {fmt(sp['baseline'])} "
             f"(robust score {fmt(sp['score'], '.1f')}), on {', '.join(sp['metrics'])}; back to normal after "
             f"{sp['duration']} step(s). Policy: {actions(sp)}.", ""]
    for r in sp["rollbacks"]:
        lines += [f"- Rolled back from step {r['from_step']} to checkpoint `{r['tag']}` (step {r['to_step']}); "
                  f"samples {r['skip_start']}-{fmt(r['skip_end'] - 1 if r.get('skip_end') else None)} skipped. "
                  f"Reason: {r.get('why', '')}."]
    ctx = sp["context"]
    files.append(_around(sp, out / f"{name}.png"))
    lines += ["", f"![around step {sp['start']}]({name}.png)", ""]
    lines += _validation(sp, out, name, files)
    h = ctx["health"]
    if h.get("samples"):
        gpu = "; ".join(f"{k} {fmt(v['min'])}-{fmt(v['max'])} (run median {fmt(v['run_median'])})"
                        for k, v in h["gpu"].items()) or "no GPU metrics (NVML absent)"
        host = "; ".join(f"{k} max {fmt(v['max'])}" for k, v in h["host"].items())
        lines += [f"Health ({h['samples']} samples, nodes {', '.join(h['nodes'])}): {gpu}. Host: {host}."
                  + (f" Throttling: {', '.join(h['throttle_reasons'])}." if h["throttle_reasons"] else ""), ""]
    else:
        lines += [f"Health: {h.get('note', 'none')}.", ""]
    if ctx["alerts"]:
        lines += ["Alerts in this time span:", ""]
        lines += [*(f"- {a['severity']}: {a['message']}" for a in ctx["alerts"]), ""]
    b = sp.get("batches")
    if not b or not b.get("samples"):
        return lines + ([f"Data: {b['note']}.", ""] if b and b.get("note") else [])
    files.append(_mix(b, out / f"{name}_mix.png"))
    lines += [f"### The data of steps {', '.join(map(str, b['steps']))} (samples {b['sample_range'][0]}-"
              f"{b['sample_range'][1] - 1}): {b['flagged_samples']} of {b['samples']} samples unusual"
              + (f" (an even subset of {b['samples_in_steps']})" if b["samples_in_steps"] > b["samples"] else ""), "",
              f"![mix]({name}_mix.png)", ""]
    lines += table([[m["source"], m["language"] or "–", f"{m['share']:.1%}", f"{m['usual']:.1%}",
                     fmt(m["ratio"], ".2f")] for m in b["mix"]],
                   ["source", "language", "in the spike", "usual", "ratio"])
    lines += ["", "Documents (unusual first):", ""]
    lines += table([[d["source"], str(d["doc"]), d["origin"] or "–", str(d["tokens"]), str(d["samples"]),
                     ", ".join(d["flags"]) or "–", f"`{d['snippet'][:48]}`"] for d in b["documents"][:15]],
                   ["source", "doc", "origin", "tokens", "samples", "unusual", "snippet"])
    lines += ["", "Snippets:", ""]
    for s in b["snippets"]:
        lines += [f"- sample {s['index']}, {s['source']} doc {s['doc']} ({s['origin'] or '?'})"
                  + (f": **{'; '.join(s['flags'])}**" if s["flags"] else ""), f"  `{s['text'][:120]}`"]
    return [*lines, ""]


def _validation(sp: dict[str, Any], out: Path, name: str, files: list[Path]) -> list[str]:
    """The validation loss per source before and after the spike: healed, or lasting damage."""
    v = sp.get("validation") or {}
    if not v.get("sources"):
        return [f"Validation: {v.get('note', 'none')}.", ""]
    after = ", ".join(map(str, v["after_steps"]))
    lines = [f"Validation (eval events): {verdict(v)}. Loss per source at step {v['before_step']} (before the spike) "
             f"and at step(s) {after}; a source whose latest loss is more than {v['margin']:.0%} above its loss "
             "before did lasting damage.", ""]
    head = ["source", f"step {v['before_step']}", *(f"step {s}" for s in v["after_steps"]), "peak rise", "now",
            "verdict"]
    rows = [[n, fmt(x["before"]), *(fmt(a) for a in x["after"]), f"{x['peak_rise']:+.1%}", f"{x['rise']:+.1%}",
             x["verdict"]] for n, x in sorted(v["sources"].items(), key=lambda kv: -kv[1]["rise"])]
    files.append(_validation_plot(sp, v, out / f"{name}_val.png"))
    return [*lines, *table(rows, head), "", f"![validation around step {sp['start']}]({name}_val.png)", ""]


def _validation_plot(sp: dict[str, Any], v: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    steps = [v["before_step"], *v["after_steps"]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for n, x in sorted(v["sources"].items()):
        ys = [x["before"], *x["after"]]
        hot = x["verdict"] == "damaged"
        ax.plot(steps, [y if y is not None else float("nan") for y in ys], "o-" if hot else ".-",
                lw=1.6 if hot else 0.8, label=n if hot else None, color=None if hot else "grey")
    ax.axvspan(sp["start"] - 0.5, sp["end"] + 0.5, color="red", alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"validation around step {sp['start']}: {verdict(v)}", fontsize=9)
    if v.get("damaged"):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _overview(res: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.plot(res["curve"]["step"], [v if v is not None else float("nan") for v in res["curve"]["loss"]], lw=0.8)
    for sp in res["spikes"]:
        ax.axvline(sp["start"], color="red" if sp["actions"] else "orange", alpha=0.5, lw=1)
        if sp.get("peak_loss") is not None:
            ax.plot([sp["peak_step"]], [sp["peak_loss"]], "rx")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss (final timeline); red: spikes acted on, orange: found offline")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _around(sp: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = sp["context"]["steps"]
    keys = [("loss", "loss"), ("grad_norm", "grad norm"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 7), sharex=True)
    for ax, (k, label) in zip(axes, keys, strict=True):
        kept = [(r["step"], r[k]) for r in rows if not r["abandoned"] and r.get(k) is not None]
        gone = [(r["step"], r[k]) for r in rows if r["abandoned"] and r.get(k) is not None]
        if kept:
            ax.plot(*zip(*kept, strict=True), ".-", lw=1, ms=3, label="kept")
        if gone:
            ax.plot(*zip(*gone, strict=True), "x", color="grey", label="abandoned by rollback")
            ax.legend(fontsize=7)
        ax.axvspan(sp["start"] - 0.5, sp["end"] + 0.5, color="red", alpha=0.15)
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"around step {sp['start']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _mix(b: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    names = [m["source"] for m in b["mix"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2), 3))
    ax.bar(x - 0.2, [m["usual"] for m in b["mix"]], 0.4, label="usual mix")
    ax.bar(x + 0.2, [m["share"] for m in b["mix"]], 0.4, label="spike batches")
    ax.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set_ylabel("share of samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
