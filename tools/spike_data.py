"""What a spike's batches held: documents, sources, languages, snippets, and what was odd in them.

Every step event says ``consumed`` (samples before the step) and ``samples`` (the global batch),
so the step's samples are ``range(consumed, consumed + samples)``; kit.data.MixtureDataset (a pure
function of the seed and the sample index) says which source window each one is, which documents
it overlaps and where those came from; the run's tokenizer decodes it.

"Odd" is measured against the run's usual data: the same statistics over a fixed random sample of
the samples the run consumed. A sample is flagged for repetition (repeated 4-grams of tokens),
length (its main document's length, log scale), language (a script other than its source's usual
one) or encoding (control characters, U+FFFD replacement characters).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kit.data import META, TOKENIZER, MixtureDataset, load_tokenizer
from kit.errors import KitError

BASELINE = 256  # samples drawn from the run's consumed range to define "usual"
SNIPPETS = 12  # decoded snippets per spike (the most unusual samples first)
MAX_SAMPLES = 2048  # samples inspected per spike (an even subset of bigger batches)
SNIPPET_CHARS = 160
Z_FLAG = 4.0  # robust z-score above the usual that flags a sample
REPEAT_FLOOR = 0.5  # ...and never under half the 4-grams repeated (formulaic text repeats a lot)
SCRIPTS = ((0x0000, 0x024F, "Latin"), (0x0370, 0x03FF, "Greek"), (0x0400, 0x052F, "Cyrillic"),
           (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"), (0x0900, 0x097F, "Devanagari"),
           (0x3040, 0x30FF, "Kana"), (0x4E00, 0x9FFF, "Han"), (0xAC00, 0xD7AF, "Hangul"))


def script_of(ch: str) -> str:
    o = ord(ch)
    for lo, hi, name in SCRIPTS:
        if lo <= o <= hi:
            return name
    return "Other"


@dataclass
class SampleStats:
    index: int
    source: str
    docs: list[int]
    main_doc: int
    doc_tokens: int
    repetition: float  # share of repeated token 4-grams
    control: float  # share of control characters (other than newline and tab)
    replacement: float  # share of U+FFFD
    script: str  # dominant script of the letters
    text: str


def _stats(ds: MixtureDataset, tok: Any, i: int) -> SampleStats:
    ref = ds.ref(i)
    s = ds._source_index(ref.source)
    ids = np.asarray(ds.tokens[s][ref.start:ref.start + ds.seq], dtype=np.int64)
    grams = [tuple(ids[j:j + 4]) for j in range(len(ids) - 3)]
    rep = 1 - len(set(grams)) / len(grams) if grams else 0.0
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    n = max(1, len(text))
    control = sum(1 for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t\r") / n
    letters = Counter(script_of(c) for c in text if c.isalpha())
    docs = ds.docs[s]
    overlaps = [(min(ref.start + ds.seq, int(docs[d + 1])) - max(ref.start, int(docs[d])), d) for d in ref.docs]
    main = max(overlaps)[1] if overlaps else -1
    length = int(docs[main + 1] - docs[main]) if main >= 0 else 0
    return SampleStats(i, ref.source, list(ref.docs), main, length, rep, control, text.count("\ufffd") / n,
                       letters.most_common(1)[0][0] if letters else "none", text)


def _robust(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    med = float(np.median(a))
    return med, float(1.4826 * np.median(np.abs(a - med))) or 1e-3


class DataInspector:
    """Opened once per report; inspects the batches of spike steps against the run's usual data."""

    def __init__(self, ds: MixtureDataset, tok: Any, consumed_max: int, seed: int) -> None:
        self.ds = ds
        self.tok = tok
        self.langs = {s["name"]: s.get("language", "") for s in ds.sources}
        self.p = {s["name"]: float(s["p"]) for s in ds.sources}
        rng = np.random.default_rng([seed, 8])
        picks = rng.integers(0, max(consumed_max, 1), size=BASELINE)
        self.base = [_stats(ds, tok, int(i)) for i in picks]
        self.rep = _robust([b.repetition for b in self.base])
        self.len = _robust([math.log(max(b.doc_tokens, 1)) for b in self.base])
        by_src: dict[str, Counter[str]] = {}
        for b in self.base:
            by_src.setdefault(b.source, Counter())[b.script] += 1
        self.usual_script = {k: c.most_common(1)[0][0] for k, c in by_src.items()}
        self._origins: dict[str, list[str]] = {}

    @classmethod
    def open(cls, run_dir: Path) -> DataInspector | None:
        """The run's prepared data and tokenizer (None when they are gone: the report says so)."""
        from kit.rundir import RunDir
        from kit.tools.spike_ledger import read_ledger

        rd = RunDir(run_dir)
        try:
            cfg = rd.load_config()
        except KitError:
            return None
        data_dir = Path(cfg.data.prepared) if cfg.data.prepared else rd.data
        if not (data_dir / META).exists() or not (data_dir / TOKENIZER).exists():
            return None
        try:
            ds = MixtureDataset(data_dir, cfg.run.seed, cfg.model.seq_length)
            tok = load_tokenizer(data_dir / TOKENIZER)
        except KitError:
            return None
        led = read_ledger(run_dir)
        last = led.detail(led.timeline.take(np.arange(len(led.timeline))[-1:]))
        consumed = sum(int(e.get("consumed", 0)) + int(e.get("samples", 0)) for e in last)
        return cls(ds, tok, consumed, cfg.run.seed)

    def origin(self, source: str, doc: int) -> str:
        if source not in self._origins:
            try:
                self._origins[source] = self.ds.origins(source)
            except OSError:
                self._origins[source] = []
        o = self._origins[source]
        return o[doc] if 0 <= doc < len(o) else ""

    def summary(self) -> dict[str, Any]:
        return {"sources": [{"name": k, "language": self.langs[k], "p": self.p[k]} for k in self.p],
                "baseline_samples": len(self.base),
                "usual": {"repetition_median": self.rep[0], "doc_tokens_median": math.exp(self.len[0]),
                          "scripts": self.usual_script}}

    def flags(self, st: SampleStats) -> list[str]:
        out = []
        if st.repetition > max(self.rep[0] + Z_FLAG * self.rep[1], REPEAT_FLOOR):
            out.append(f"repetition {st.repetition:.0%} of 4-grams repeated (usual {self.rep[0]:.0%})")
        z = (math.log(max(st.doc_tokens, 1)) - self.len[0]) / self.len[1]
        if abs(z) > Z_FLAG:
            out.append(f"length: document of {st.doc_tokens} tokens (usual {math.exp(self.len[0]):.0f})")
        usual = self.usual_script.get(st.source)
        if usual and st.script not in (usual, "none"):
            out.append(f"language: {st.script} script in a {usual} source ({st.source}, "
                       f"{self.langs.get(st.source) or '?'})")
        if st.control > 0.01:
            out.append(f"encoding: {st.control:.0%} control characters")
        if st.replacement > 0.01:
            out.append(f"encoding: {st.replacement:.0%} U+FFFD replacement characters")
        return out

    def inspect(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        """The spike steps' batches: mix vs usual, documents, flagged samples with snippets."""
        ids = [i for s in steps for i in range(s["consumed"], s["consumed"] + s["samples"])]
        total = len(ids)
        if total > MAX_SAMPLES:  # big global batches: an even subset keeps the report to seconds
            ids = [ids[k * total // MAX_SAMPLES] for k in range(MAX_SAMPLES)]
        samples = [_stats(self.ds, self.tok, i) for i in ids]
        if not samples:
            return {"samples": 0, "note": "no step events with consumed/samples for these steps"}
        n = len(samples)
        count = Counter(s.source for s in samples)
        mix = [{"source": k, "language": self.langs.get(k, ""), "share": count.get(k, 0) / n,
                "usual": self.p.get(k, 0.0), "ratio": (count.get(k, 0) / n) / self.p[k] if self.p.get(k) else None}
               for k in self.p]
        flagged = [(s, self.flags(s)) for s in samples]
        docs: dict[tuple[str, int], dict[str, Any]] = {}
        for s, f in flagged:
            d = docs.setdefault((s.source, s.main_doc), {
                "source": s.source, "language": self.langs.get(s.source, ""), "doc": s.main_doc,
                "origin": self.origin(s.source, s.main_doc), "tokens": s.doc_tokens, "samples": 0, "flags": set(),
                "snippet": _printable(s.text)[:SNIPPET_CHARS // 2]})
            d["samples"] += 1
            d["flags"].update(x.split(":")[0].split(" ")[0] for x in f)
        ranked = sorted(flagged, key=lambda sf: (-len(sf[1]), -sf[0].repetition, sf[0].index))
        return {
            "samples": n, "samples_in_steps": total, "steps": [s["step"] for s in steps],
            "sample_range": [steps[0]["consumed"], steps[-1]["consumed"] + steps[-1]["samples"]],
            "mix": mix,
            "flagged_samples": sum(1 for _, f in flagged if f),
            "documents": sorted(({**d, "flags": sorted(d["flags"])} for d in docs.values()),
                                key=lambda d: (-len(d["flags"]), -d["samples"], d["source"], d["doc"])),
            "snippets": [{"index": s.index, "source": s.source, "doc": s.main_doc,
                          "origin": self.origin(s.source, s.main_doc), "flags": f,
                          "text": _printable(s.text)[:SNIPPET_CHARS]} for s, f in ranked[:SNIPPETS]],
        }


def _printable(text: str) -> str:
    """Control characters shown as escapes, so the report shows encoding junk instead of eating it."""
    return "".join(c if c in "\t" or unicodedata.category(c) != "Cc" else
                   ("⏎" if c == "\n" else f"\\x{ord(c):02x}") for c in text)
