"""The fast paths of whole-run reads give the answers of the plain ones (issue 16's performance work).

Each shortcut taken to read a million-step run in a fraction of a second is checked here against the
simple code it replaces, on generated input (hypothesis) as well as hand-picked edge cases:

- the reader judges nested fields from the line's bytes (kit.ledger.reader.shallow) instead of walking
  every value: it must keep and drop exactly what the walk keeps and drops;
- Curves.load (columns, a stride found by halving) must build what the (steps x metrics) matrix built;
- latest_wins (a stable sort) must pick what "the last event of each step" picks;
- a scan's step records come with the file each row came from (Scan.step_file), merged in time order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kit.ledger import LedgerWriter, ReadStats, parse_line
from kit.ledger.reader import coerce, shallow
from kit.ledger.scan import latest_wins, scan, surviving
from kit.ledger.schema import MAX_DEPTH, MAX_STR
from kit.run.series import Curves

# ------------------------------------------------------------------------------- shallow lines

_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=False, allow_infinity=False),
                     st.text(alphabet=st.sampled_from('ab[]{}"\\:,é \n'), max_size=12))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=3), inner, max_size=4)),
                     max_leaves=40)


def _exact(raw: bytes) -> tuple[Any, ReadStats]:
    """The reader's answer without the byte-level shortcut (every nested value walked)."""
    stats = ReadStats()
    return coerce(json.loads(raw), stats), stats


def _fast(raw: bytes) -> tuple[Any, ReadStats]:
    stats = ReadStats()
    return parse_line(raw, stats), stats


def _nest(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gpus=_json, host=_json, checks=_json, extra=_json)
def test_nested_fields_judged_from_bytes_match_the_walk(gpus: Any, host: Any, checks: Any, extra: Any) -> None:
    for event in ({"v": 2, "t": 1.0, "kind": "health", "node": "n1", "gpus": gpus, "host": host},
                  {"v": 2, "t": 1.0, "kind": "doctor", "ok": True, "checks": checks, "node_scores": extra},
                  {"v": 2, "t": 1.0, "kind": "future_kind", "x": gpus, "y": extra}):
        raw = json.dumps(event).encode()
        (fast, fs), (exact, es) = _fast(raw), _exact(raw)
        assert fast == exact and (fs.coerced, fs.invalid_events) == (es.coerced, es.invalid_events)


def test_edge_cases_of_the_byte_level_judgement() -> None:
    cases = [
        _nest(MAX_DEPTH, 1), _nest(MAX_DEPTH + 1, 1), _nest(MAX_DEPTH + 1, []), _nest(MAX_DEPTH + 2, []),
        [{"a": "[[[[[[[[[[[[[[[[[[[["}], ['\\"]]]]]]]]]]]]]]]]]]'], [2**63 - 1], [2**63], [-(2**63)], [-(2**63) - 1],
        [1234567890123456789.5], ["x" * MAX_STR], ["x" * (MAX_STR + 1)], [{"k": math.pi, "s": "a\\"}],
    ]
    for value in cases:
        raw = json.dumps({"v": 2, "t": 1.0, "kind": "health", "node": "n", "gpus": value}).encode()
        (fast, fs), (exact, es) = _fast(raw), _exact(raw)
        assert fast == exact and fs.coerced == es.coerced, value
    assert shallow(b'{"a":[[1]]}') and not shallow(json.dumps({"a": _nest(MAX_DEPTH + 1, 1)}).encode())
    assert not shallow(b'{"a":"\\""}')  # escaped quotes: not judged from bytes


# ------------------------------------------------------------------------------------ curves


def _plain_load(c: Curves, steps: np.ndarray, t: np.ndarray, values: np.ndarray) -> None:
    """Curves.load as it was: a (steps x metrics) matrix, the stride doubled from 1 while np.unique
    finds too many buckets."""
    n = len(steps)
    ok = np.isfinite(values)
    stride = 1
    while len(np.unique(steps // stride)) > c.capacity:
        stride *= 2
    c.stride = stride
    keys = steps // stride
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], n] - 1
    c.keys, c.first, c.last = keys[starts].tolist(), steps[starts].tolist(), steps[ends].tolist()
    c.t = t[ends].tolist()
    c.sums = np.add.reduceat(np.where(ok, values, 0.0), starts, axis=0).tolist()
    c.counts = np.add.reduceat(ok.astype(np.int64), starts, axis=0).tolist()
    c.mins = np.minimum.reduceat(np.where(ok, values, np.inf), starts, axis=0).tolist()
    k = c.recent.maxlen or 0
    for step, tt, row in zip(steps[-k:].tolist(), t[-k:].tolist(), np.where(ok, values, np.nan)[-k:].tolist(),
                             strict=True):
        c.recent.append((step, tt, [None if v != v else v for v in row]))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=-30, max_value=40),
                          st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
                          st.one_of(st.none(), st.floats(min_value=-1e6, max_value=1e6))), min_size=1, max_size=400),
       st.sampled_from([2, 3, 8, 64, 256]))  # 256: more than 64 buckets with N/A (the masked path)
def test_loading_columns_builds_what_the_matrix_built(rows: list[tuple[int, float | None, float | None]],
                                                      capacity: int) -> None:
    """A timeline with replays (a negative or zero increment goes back: a resume or a rollback), loaded
    with the surviving rows as ``keep``, against the old code on the surviving rows copied out."""
    steps = np.cumsum([r[0] for r in rows]).astype(np.float64)
    values = np.array([[np.nan if x is None else x for x in r[1:]] for r in rows], dtype=np.float64)
    t = np.arange(len(rows)) * 2.0
    keep = surviving(steps)
    loaded, plain = Curves(["a", "b"], capacity=capacity, recent=50), Curves(["a", "b"], capacity=capacity, recent=50)
    loaded.load(steps, t, values, keep)
    _plain_load(plain, steps[keep].astype(np.int64), t[keep], values[keep])
    assert (loaded.stride, loaded.keys) == (plain.stride, plain.keys)
    assert (loaded.first, loaded.last, loaded.t) == (plain.first, plain.last, plain.t)
    assert (loaded.counts, loaded.mins) == (plain.counts, plain.mins)
    assert np.allclose(loaded.sums, plain.sums, rtol=1e-12, atol=0)  # the same values, summed in another order
    assert list(loaded.recent) == list(plain.recent)
    folded = Curves(["a", "b"], capacity=capacity, recent=50)  # and folding step by step ends on the same points
    for step, tt, row in zip(steps.tolist(), t.tolist(), values.tolist(), strict=True):
        folded.add(int(step), tt, [v if math.isfinite(v) else None for v in row])
    assert list(folded.recent) == list(loaded.recent) and folded.last_step == loaded.last_step


# ------------------------------------------------------------------------------- latest wins


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=30), max_size=200))
def test_latest_wins_is_the_last_event_of_each_step(timeline: list[int]) -> None:
    step = np.array(timeline, dtype=np.float64)
    last = {s: i for i, s in enumerate(timeline)}
    assert latest_wins(step).tolist() == [last[s] for s in sorted(last)]


# ------------------------------------------------------------------------------- step files


def test_scan_rows_know_their_file_and_merge_by_time(tmp_path: Path) -> None:
    """Two writers of step events (an old rank-0 file and a new one): rows in time order, each row's
    file number names the file its line is in, and step_detail reads it back by row number."""
    t = 1_700_000_000.0
    with LedgerWriter(tmp_path, "train-r0") as a, LedgerWriter(tmp_path, "train-r1") as b:
        for i in range(1, 41):
            (a if i % 3 else b).emit("step", step=i, loss=1.0 / i, t=t + i)
    s = scan(tmp_path)
    assert s.steps["step"].astype(int).tolist() == list(range(1, 41))
    names = [s.files[f] for f in s.step_file.tolist()]
    assert names == [("train-r0.jsonl" if i % 3 else "train-r1.jsonl") for i in range(1, 41)]
    detail = s.step_detail(np.arange(40))
    assert [e["step"] for e in detail] == list(range(1, 41)) and [e["src"] for e in detail][:3] == [
        "train-r0", "train-r0", "train-r1"]
    assert same_steps(s, scan(tmp_path, use_index=False))


def same_steps(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a.step_file, b.step_file)) and all(
        np.array_equal(a.steps[n], b.steps[n], equal_nan=True) for n in a.steps.dtype.names)
