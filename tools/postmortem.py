"""The spike postmortem: which spikes, how big, what the policy did, and what was around them.

Sources, in order of authority:
- the live detector's ``spike`` events and the ``rollback``/``data_skipped`` events (what happened);
- an offline pass of the same detector over the final loss and grad-norm curves (kit.spikes'
  rule, vectorised with numpy), which also finds spikes of runs that never flagged them live;
- the step events around each spike (loss, grad norm, lr, throughput; abandoned steps of a
  rollback stay visible as their own series), health samples and alerts in the same time span;
- the data: every step's sample ids are ``range(consumed, consumed + samples)`` of the step event,
  and kit.data.MixtureDataset maps them to sources and documents (tools/spike_data.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kit.config import SpikesSection
from kit.errors import KitError
from kit.ledger.scan import bulk_read
from kit.spikes import LOCAL, PRED_VAR, SQRT2, TRIM, TRIM_STD, predict
from kit.tools.spike_ledger import Ledger, Steps, read_ledger

STRIDE = 16  # the offline pass computes the window statistics every STRIDE steps, then exactly near spikes
MARGIN = 0.7  # ...exactly for every step whose approximate rise is above MARGIN x the bar
GAP = 3  # flagged steps closer than this belong to one episode


# ------------------------------------------------------------------------------------------ detection


@dataclass
class Series:
    """Offline verdicts for one metric: arrays aligned with ``steps``."""

    steps: np.ndarray
    values: np.ndarray
    spike: np.ndarray  # bool
    pred: np.ndarray  # predicted value (NaN where not judged)
    score: np.ndarray


def _window_stats(x: np.ndarray, rows: np.ndarray, w: int, clamp: bool) -> tuple[np.ndarray, np.ndarray]:
    """kit.spikes.predict for the windows ``x[r:r+w]`` (predicting x[r+w]), rows at a time (the same
    arithmetic up to the summation order of the deviation)."""
    from numpy.lib.stride_tricks import sliding_window_view

    view = sliding_window_view(x[:-1], w)
    preds = np.empty(len(rows))
    sigmas = np.empty(len(rows))
    loc = min(w, LOCAL)
    dist = np.arange(loc, 0, -1, dtype=np.float64)
    k = (w - 1) // 2
    cut = int(TRIM * (w - 1))
    for a in range(0, len(rows), 32768):
        r = rows[a:a + 32768]
        X = np.asarray(view[r])
        D = np.partition(np.diff(X, axis=1), (cut, k, w - 2 - cut), axis=1)  # enough order for both
        m = D[:, k]
        slope = np.minimum(m, 0.0) if clamp else m
        P = X[:, w - loc:] + slope[:, None] * dist
        preds[a:a + 32768] = np.partition(P, loc // 2, axis=1)[:, loc // 2]
        sigmas[a:a + 32768] = D[:, cut:w - 1 - cut].std(axis=1) / TRIM_STD / SQRT2 * PRED_VAR[loc]
    return preds, sigmas


def detect(steps: np.ndarray, values: np.ndarray, cfg: SpikesSection, clamp: bool) -> Series:
    """kit.spikes.SeriesDetector over a whole series at once (finite values; non-finite = spikes)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    v = values[finite]
    x = np.log(np.maximum(v, 1e-12))
    n, w = len(x), cfg.window
    floor = math.log1p(cfg.min_rise)
    start = max(cfg.warmup_steps, 4)
    pred = np.full(n, np.nan)
    sigma = np.full(n, np.nan)
    for t in range(start, min(w, n)):  # windows still filling up: as the online detector, one by one
        pred[t], sigma[t] = predict(list(x[:t]), clamp)
    if n > w:
        t_all = np.arange(max(w, start), n)
        rows = t_all - w
        grid = rows[::STRIDE]
        gp, gs = _window_stats(x, grid, w, clamp)
        idx = np.minimum((rows - rows[0]) // STRIDE, len(grid) - 1)
        ap, asg = gp[idx], gs[idx]
        rise = x[t_all] - ap
        near = rise > MARGIN * np.maximum(cfg.threshold * asg, floor)
        pred[t_all], sigma[t_all] = ap, asg
        pred[t_all[::STRIDE]], sigma[t_all[::STRIDE]] = gp, gs  # the grid rows are exact already
        exact = t_all[near & ((rows - rows[0]) % STRIDE != 0)]
        if len(exact):
            pred[exact], sigma[exact] = _window_stats(x, exact - w, w, clamp)
    rise = x - pred
    with np.errstate(invalid="ignore", divide="ignore"):
        spike = rise > np.maximum(cfg.threshold * sigma, floor)
        score = np.where(sigma > 0, rise / sigma, np.where(rise > 0, np.inf, 0.0))
    out_spike = np.ones(len(values), dtype=bool)  # non-finite values are spikes
    out_pred = np.full(len(values), np.nan)
    out_score = np.full(len(values), np.nan)
    out_spike[finite], out_pred[finite], out_score[finite] = spike, np.exp(pred), score
    return Series(steps, values, out_spike, out_pred, out_score)


# ------------------------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    start: int
    end: int
    peak_step: int
    peak_loss: float
    baseline: float  # the predicted loss at the start (what it would have been)
    size: float  # peak / baseline - 1
    duration: int  # steps from the start until the loss is back within min_rise of the baseline
    metrics: list[str] = field(default_factory=list)  # loss, grad_norm, non-finite
    actions: list[str] = field(default_factory=list)  # what the live policy did (empty: offline only)
    found_by: str = "live"  # live, offline, both
    score: float = 0.0
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[list[int]] = field(default_factory=list)  # sample ranges skipped because of it
    steps: list[dict[str, Any]] = field(default_factory=list)  # consumed/samples of the spike steps

    def to_json(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def episodes(led: Ledger, cfg: SpikesSection) -> list[Episode]:
    """Live spike events and offline detections, grouped into episodes."""
    final = led.timeline.final()
    loss = detect(final["step"], final["loss"], cfg, clamp=True)
    gn = detect(final["step"], final["grad_norm"], cfg, clamp=False) if np.isfinite(final["grad_norm"]).any() else None
    hits: dict[int, dict[str, Any]] = {}
    for e in led.kind("spike"):
        h = hits.setdefault(int(e["step"]), {"metrics": set(), "actions": set(), "live": True, "offline": False,
                                             "events": []})
        h["metrics"].add("non-finite" if e.get("nonfinite") else str(e.get("metric", "loss")))
        h["actions"].add(str(e.get("action", "")))
        h["live"] = True
        h["events"].append(e)
    for series, name in ((loss, "loss"), (gn, "grad_norm")):
        if series is None:
            continue
        for i in np.flatnonzero(series.spike):
            h = hits.setdefault(int(series.steps[i]), {"metrics": set(), "actions": set(), "live": False,
                                                       "offline": True, "events": []})
            h["offline"] = True
            h["metrics"].add(name if np.isfinite(series.values[i]) else "non-finite")
    out: list[Episode] = []
    group: list[int] = []
    for step in sorted(hits):
        if group and step - group[-1] > GAP:
            out.append(_episode(group, hits, final, loss, led, cfg))
            group = []
        group.append(step)
    if group:
        out.append(_episode(group, hits, final, loss, led, cfg))
    return out


def _episode(group: list[int], hits: dict[int, dict[str, Any]], final: Steps, loss: Series, led: Ledger,
             cfg: SpikesSection) -> Episode:
    events = [e for s in group for e in hits[s]["events"]]
    live_loss = [(int(e["step"]), float(e["value"] if e.get("metric") == "loss" else e.get("loss") or math.nan),
                  float(e.get("median") or math.nan), float(e.get("score") or 0.0)) for e in events]
    offline = [(int(loss.steps[i]), float(loss.values[i]), float(loss.pred[i]), float(loss.score[i]))
               for i in np.flatnonzero((loss.steps >= group[0]) & (loss.steps <= group[-1]) & loss.spike)]
    cands = [c for c in live_loss + offline if math.isfinite(c[1])] or live_loss + offline
    peak = max(cands, key=lambda c: c[1] if math.isfinite(c[1]) else -1.0) if cands else (group[0], math.nan,
                                                                                         math.nan, 0.0)
    base = next((c[2] for c in sorted(cands) if math.isfinite(c[2])), math.nan)
    found = {hits[s]["live"] for s in group}, {hits[s]["offline"] for s in group}
    by = "both" if True in found[0] and True in found[1] else ("live" if True in found[0] else "offline")
    ep = Episode(start=group[0], end=group[-1], peak_step=peak[0], peak_loss=peak[1], baseline=base,
                 size=peak[1] / base - 1 if base and math.isfinite(base) else math.nan,
                 duration=_duration(final, group[0], base, cfg), found_by=by,
                 metrics=sorted(set().union(*(hits[s]["metrics"] for s in group))),
                 actions=sorted(a for a in set().union(*(hits[s]["actions"] for s in group)) if a),
                 score=max((c[3] for c in cands if math.isfinite(c[3])), default=0.0))
    ep.rollbacks = [{k: e.get(k) for k in ("from_step", "to_step", "tag", "skip_start", "skip_end", "rollbacks",
                                            "why", "t")} for e in led.kind("rollback")
                    if group[0] <= int(e.get("spike_step", e["from_step"])) <= group[-1]]
    ep.skipped = [[r["skip_start"], r["skip_end"]] for r in ep.rollbacks if r.get("skip_start") is not None]
    ep.steps = _spike_steps(group, events, led)
    return ep


def _duration(final: Steps, start: int, base: float, cfg: SpikesSection) -> int:
    if not math.isfinite(base):
        return 1
    s, v = final["step"], final["loss"]
    after = np.flatnonzero((s > start) & (s <= start + cfg.window))
    back = [int(s[i]) for i in after if np.isfinite(v[i]) and v[i] <= base * (1 + cfg.min_rise)]
    return (back[0] - start) if back else int(min(cfg.window, (s[after[-1]] - start + 1) if len(after) else 1))


def _spike_steps(group: list[int], events: list[dict[str, Any]], led: Ledger) -> list[dict[str, Any]]:
    """Where each spike step read its data: from the live events, else the earliest step event (the
    one the spike happened in, before any rollback replayed the step)."""
    out: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.get("consumed") is not None:
            out[int(e["step"])] = {"step": int(e["step"]), "consumed": int(e["consumed"]),
                                   "samples": int(e["samples"])}
    s = led.timeline["step"]
    for step in range(group[0], group[-1] + 1):
        if step in out:
            continue
        rows = np.flatnonzero(s == step)
        if len(rows):
            (e,) = led.detail(led.timeline.take(rows[:1]))
            if isinstance(e.get("consumed"), int) and isinstance(e.get("samples"), int):
                out[step] = {"step": step, "consumed": e["consumed"], "samples": e["samples"]}
    return [out[k] for k in sorted(out)]


# ------------------------------------------------------------------------------------------- context


def context(led: Ledger, ep: Episode, span: int) -> dict[str, Any]:
    """Metrics and health around an episode: every step event in [start - span, end + span], in
    the order written (abandoned steps of a rollback marked), health samples and alerts by time."""
    near = led.timeline.around(ep.start - span, ep.end + span)
    rb_times = sorted(float(r["t"]) for r in ep.rollbacks if r.get("t"))
    rows = []
    for i, e in enumerate(led.detail(near)):
        t = float(near["t"][i])
        row: dict[str, Any] = {"step": int(near["step"][i]), "t": t, "loss": _clean(float(near["loss"][i])),
                               "grad_norm": _clean(float(near["grad_norm"][i])),
                               "timeline": sum(t > rt for rt in rb_times)}
        for k in ("lr", "tokens_per_s", "step_time"):
            v = e.get(k)
            row[k] = _clean(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        rows.append(row)
    for r in rows:  # a step of an earlier timeline replayed later was abandoned by the rollback
        r["abandoned"] = any(o["step"] == r["step"] and o["timeline"] > r["timeline"] for o in rows)
    times = [r["t"] for r in rows if r["t"]]
    t0, t1 = (min(times) - 60, max(times) + 60) if times else (0.0, 0.0)
    health = led.health(t0, t1)  # fetched by time from the index: the rest of the health history stays on disk
    alerts = [{k: e.get(k) for k in ("t", "severity", "message", "step")} for e in led.kind("alert")
              if t0 <= e["t"] <= t1]
    medians = led.health_medians(GPU_KEYS) if health else {}
    return {"steps": rows, "health": summarise_health(health, medians, led.has_health), "alerts": alerts}


GPU_KEYS = ("temp_c", "power_w", "sm_clock_mhz", "util_pct", "mem_used_gib")


def gpu_values(events: list[dict[str, Any]], key: str) -> list[float]:
    """Every GPU's ``key`` in some health samples (numbers only)."""
    out = []
    for e in events:
        for g in e.get("gpus") or []:
            v = g.get(key) if isinstance(g, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(float(v))
    return out


def summarise_health(window: list[dict[str, Any]], medians: dict[str, float | None],
                     any_in_run: bool = True) -> dict[str, Any]:
    """Per GPU metric: max in the window vs the run's median (``medians``: over an evenly spaced sample
    of the run's health events, Ledger.health_medians); throttle reasons seen; host memory/CPU."""
    if not window:
        return {"samples": 0, "note": "no health samples in this time span" + (
            "" if any_in_run else " (none in the whole run: NVML absent or health.enabled = false)")}
    gpu = {}
    for key in GPU_KEYS:
        w = gpu_values(window, key)
        if w:
            gpu[key] = {"min": min(w), "max": max(w), "run_median": medians.get(key)}
    throttles = sorted({r for e in window for g in e.get("gpus") or [] for r in g.get("throttle_reasons") or []})
    host = {}
    for key in ("cpu_pct", "mem_pct", "load1"):
        w = [float(e["host"][key]) for e in window if isinstance(e.get("host"), dict)
             and isinstance(e["host"].get(key), (int, float))]
        if w:
            host[key] = {"max": max(w)}
    return {"samples": len(window), "gpu": gpu, "throttle_reasons": throttles, "host": host,
            "nodes": sorted({str(e.get("node")) for e in window})}


# ------------------------------------------------------------------------------------------- the whole


def spikes_config(run_dir: Path) -> SpikesSection:
    from kit.rundir import RunDir

    try:
        return RunDir(run_dir).load_config().spikes
    except KitError:  # a postmortem of a run without (or with a damaged) run.toml works with the defaults
        return SpikesSection()


def analyse(run_dir: str | Path, step: int | None = None, span: int = 20, data: bool = True,
            max_data_steps: int = 4) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-able data."""
    with bulk_read():  # a whole run's columns and thousands of parsed events (kit.ledger.scan.bulk_read)
        return _analyse(Path(run_dir), step, span, data, max_data_steps)


def _analyse(run_dir: Path, step: int | None, span: int, data: bool, max_data_steps: int) -> dict[str, Any]:
    cfg = spikes_config(run_dir)
    led = read_ledger(run_dir)
    eps = episodes(led, cfg)
    if step is not None:
        eps = [min(eps, key=lambda e: 0 if e.start <= step <= e.end else min(abs(e.start - step), abs(e.end - step)))] \
            if eps else []
    out: dict[str, Any] = {"run": str(run_dir), "steps_logged": len(led.timeline), "bad_lines": led.bad_lines,
                           "detector": {"window": cfg.window, "threshold": cfg.threshold,
                                        "warmup_steps": cfg.warmup_steps, "min_rise": cfg.min_rise,
                                        "policy": cfg.policy},
                           "rollbacks": len(led.kind("rollback")),
                           "skipped_ranges": [[e["start"], e["end"]] for e in led.kind("data_skipped")],
                           "spikes": []}
    inspector = None
    if data and eps:
        from kit.tools.spike_data import DataInspector

        inspector = DataInspector.open(run_dir)
        out["data"] = inspector.summary() if inspector else {"note": "prepared data not found: no batch analysis"}
    for ep in eps:
        item = ep.to_json() | {"context": context(led, ep, span)}
        if inspector is not None:
            item["batches"] = inspector.inspect(ep.steps[:max_data_steps])
        out["spikes"].append(item)
    if step is None:
        final = led.timeline.final()
        out["curve"] = {"step": final["step"][:: max(1, len(final) // 4000)].tolist(),
                        "loss": [_clean(float(v)) for v in final["loss"][:: max(1, len(final) // 4000)]]}
    return out
