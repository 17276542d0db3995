"""Training data: sources -> byte-level BPE -> memory-mapped token shards -> a resumable mixture.

Why this shape:
- Shards are prepared once per run (``<run>/data``) by one process, before or at the first segment,
  and only read afterwards: every segment and rank memory-maps the same files.
- The sampler is a pure function of (seed, global sample index). A resumed run that knows how many
  samples were consumed reads exactly the batches an uninterrupted run would, and the postmortem can
  recompute which documents any step saw from the ledger's ``consumed`` field alone.

Layout of ``<run>/data``::

    tokenizer.json           the run's tokenizer (trained here or copied from data.tokenizer)
    <source>.tokens.bin      uint16/uint32 token ids, documents separated by </s>
    <source>.docs.npy        int64 start offset of each document (plus the total at the end)
    <source>.origins.json    where each document came from (file, and item within it)
    meta.json                written last: sources, sizes, weights, dtype; its presence = ready
"""

from __future__ import annotations

import contextlib
import fcntl
import gettext
import glob
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kit.config import DataSection, RunConfig, SourceSection
from kit.errors import DataError
from kit.fsio import atomic_write
from kit.progress import NO_BARS, Bars

META = "meta.json"
TOKENIZER = "tokenizer.json"
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # BLOOM's order: unk=0, bos=1, eos=2, pad=3
EOS_ID = 2
BLOCK = 4096  # samples per mixture block: exact source proportions within every block


# ------------------------------------------------------------------------------------------ reading


@dataclass(slots=True)
class Document:
    text: str
    origin: str  # "path" or "path#item"


def iter_documents(src: SourceSection) -> Iterator[Document]:
    """Documents of one source; raises DataError on a missing path or a file of the wrong format."""
    files = _files(src)
    budget = src.max_bytes or None
    for path in files:
        for doc in _read_file(src, path):
            if not doc.text.strip():
                continue
            yield doc
            if budget is not None:
                budget -= len(doc.text.encode())
                if budget <= 0:
                    return


def _files(src: SourceSection) -> list[str]:
    where = f"data.sources[{src.name}].path"
    if src.format == "gettext":
        root = Path(src.path)
        if not root.is_dir():
            raise DataError(f"{where}: {root} is not a folder of locales (e.g. /usr/share/locale)")
        langs = src.languages or sorted(p.name for p in root.iterdir() if p.is_dir())
        files = [str(p) for lang in langs for p in sorted((root / lang / "LC_MESSAGES").glob("*.mo"))]
        if not files:
            raise DataError(f"{where}: no .mo catalogues under {root} for languages {langs}; install some "
                            "locales or point the source at other text")
        return files
    if any(c in src.path for c in "*?["):
        files = sorted(glob.glob(src.path, recursive=True))
    elif Path(src.path).is_dir():
        files = sorted(str(p) for p in Path(src.path).rglob("*") if p.is_file())
    else:
        files = [src.path]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise DataError(f"{where}: nothing found at {src.path}; check the path (relative paths are "
                        "relative to where you run kit, or to the recipe file)")
    return files


def _read_file(src: SourceSection, path: str) -> Iterator[Document]:
    where = f"data.sources[{src.name}] ({path})"
    try:
        if src.format == "text":
            text = Path(path).read_text(encoding="utf-8")
            for i, para in enumerate(text.split("\n\n")):
                yield Document(para.strip(), f"{path}#{i}")
        elif src.format == "jsonl":
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: line {i + 1} is not JSON ({e.msg}); format = \"jsonl\" "
                                        "expects one JSON object per line") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise DataError(f"{where}: line {i + 1} has no string \"text\" field")
                    yield Document(obj["text"], f"{path}#{i}")
        elif src.format == "parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path, columns=["text"])
            except Exception as e:  # pyarrow raises several types for a bad file
                raise DataError(f"{where}: not a Parquet file with a \"text\" column ({e})") from None
            for i, text in enumerate(table.column("text").to_pylist()):
                if isinstance(text, str):
                    yield Document(text, f"{path}#{i}")
        elif src.format == "gettext":
            with open(path, "rb") as f:
                try:
                    cat = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
                except (OSError, UnicodeDecodeError):
                    return  # a broken catalogue of the OS: skip it, it is not the run's data
            texts = [v for k, v in cat.items() if k and isinstance(v, str) and v.strip()]
            yield Document("\n".join(texts), path)
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text; convert it, or use format = \"parquet\"/\"jsonl\"") from None
    except OSError as e:
        raise DataError(f"{where}: cannot read ({e.strerror})") from None


# --------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Any:
    """A byte-level BPE (what BLOOM uses) trained with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise DataError(f"{path}: not a tokenizers tokenizer.json ({e})") from None


# ------------------------------------------------------------------------------------------ prepare


def prepare(cfg: RunConfig, data_dir: str | Path, log: Any = print, bars: Bars = NO_BARS) -> dict[str, Any]:
    """Tokenize every source into ``data_dir`` once; safe to call from many processes at once.

    One process takes a lock and builds into a temporary folder, then moves the files in and writes
    meta.json last; the others wait for it. A prepared folder is reused as it is. ``bars``: progress
    bars for the CLI (kit.progress: sources read, the tokenizer's training, bytes tokenized).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    meta_path = data_dir / META
    if meta_path.exists():
        return check_meta(cfg.data, json.loads(meta_path.read_text()), data_dir)
    with open(data_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if meta_path.exists():
            return check_meta(cfg.data, json.loads(meta_path.read_text()), data_dir)
        tmp = data_dir / f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            meta = _build(cfg, tmp, log, bars)
            for p in tmp.iterdir():
                os.replace(p, data_dir / p.name)
            _atomic_write(meta_path, json.dumps(meta, indent=1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return meta


def _build(cfg: RunConfig, out: Path, log: Any, bars: Bars = NO_BARS) -> dict[str, Any]:
    t0 = time.time()
    docs: dict[str, list[Document]] = {}
    nbytes: dict[str, int] = {}
    reading = bars.task("reading sources", len(cfg.data.sources), unit="sources")
    for src in cfg.data.sources:
        docs[src.name] = list(iter_documents(src))
        if not docs[src.name]:
            raise DataError(f"data.sources[{src.name}]: no non-empty documents in {src.path}")
        nbytes[src.name] = sum(len(d.text.encode()) for d in docs[src.name])
        reading.advance(1)
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
        if tok.get_vocab_size() > cfg.data.vocab_size:
            raise DataError(f"data.tokenizer has {tok.get_vocab_size()} tokens but data.vocab_size is "
                            f"{cfg.data.vocab_size}; set data.vocab_size >= {tok.get_vocab_size()}")
    else:
        with bars.phase(f"training a {cfg.data.vocab_size}-token BPE on {sum(nbytes.values()) / 1e6:.1f} MB"):
            tok = train_tokenizer((d.text for ds in docs.values() for d in ds), cfg.data.vocab_size)
    tok.save(str(out / TOKENIZER))
    dtype = np.uint16 if cfg.data.vocab_size <= 65535 else np.uint32
    sources: list[dict[str, Any]] = []
    tokenizing = bars.task("tokenizing", sum(nbytes.values()), unit="bytes")
    for src in cfg.data.sources:
        encs = tok.encode_batch([d.text for d in docs[src.name]])
        tokenizing.advance(nbytes[src.name])
        lengths = np.array([len(e.ids) + 1 for e in encs], dtype=np.int64)
        offsets = np.zeros(len(encs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.empty(int(offsets[-1]), dtype=dtype)
        for e, start in zip(encs, offsets[:-1], strict=True):
            n = len(e.ids)
            tokens[start : start + n] = e.ids
            tokens[start + n] = EOS_ID
        tokens.tofile(out / f"{src.name}.tokens.bin")
        np.save(out / f"{src.name}.docs.npy", offsets)
        (out / f"{src.name}.origins.json").write_text(json.dumps([d.origin for d in docs[src.name]]))
        windows = (len(tokens) - 1) // cfg.model.seq_length
        if windows < 1:
            raise DataError(f"data.sources[{src.name}] has {len(tokens)} tokens, fewer than one sample of "
                            f"model.seq_length={cfg.model.seq_length}; add data or shorten the sequence")
        sources.append({"name": src.name, "language": src.language, "format": src.format,
                        "documents": len(encs), "tokens": len(tokens), "windows": windows,
                        "bytes": nbytes[src.name], "weight": src.weight})
    weights = mixture_weights([s["tokens"] for s in sources], [s["weight"] for s in sources], cfg.data.alpha)
    for s, w in zip(sources, weights, strict=True):
        s["p"] = w
    log(f"data: {len(sources)} sources, {sum(s['tokens'] for s in sources):,} tokens, "
        f"vocab {tok.get_vocab_size()}, prepared in {time.time() - t0:.1f}s")
    return {"version": 1, "seq_length": cfg.model.seq_length, "vocab_size": cfg.data.vocab_size,
            "dtype": np.dtype(dtype).name, "sources": sources, "created": time.time()}


def mixture_weights(sizes: list[int], weights: list[float], alpha: float) -> list[float]:
    """Explicit weights where given; else size ** alpha (BigScience-style smoothing). Normalised."""
    raw = [w if w > 0 else float(n) ** alpha for n, w in zip(sizes, weights, strict=True)]
    total = sum(raw)
    return [r / total for r in raw]


def check_meta(data: DataSection, meta: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    names = [s["name"] for s in meta["sources"]]
    want = [s.name for s in data.sources]
    if names != want:
        raise DataError(f"{data_dir} was prepared for sources {names}, the recipe has {want}; "
                        "use a new run name or set data.prepared to another folder")
    return meta


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, text)


# ------------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True, slots=True)
class SampleRef:
    """Where global sample ``index`` comes from: a window of one source's token stream."""

    index: int
    source: str
    window: int
    start: int  # token offset in the source's stream
    docs: tuple[int, ...]  # documents the window overlaps


class MixtureDataset:
    """Deterministic mixture over the prepared sources, addressed by global sample index.

    Within every block of BLOCK samples each source appears exactly round(p * BLOCK) times
    (largest remainder), in a seeded order; within a source, windows are visited in a seeded
    permutation per epoch. So sample i is a pure function of (seed, i): no state to save beyond
    the number of samples consumed.
    """

    def __init__(self, data_dir: str | Path, seed: int, seq_length: int) -> None:
        data_dir = Path(data_dir)
        meta_path = data_dir / META
        if not meta_path.exists():
            raise DataError(f"{data_dir} holds no prepared data ({META} missing); run the segment again "
                            "to prepare it, or check data.prepared")
        self.meta = json.loads(meta_path.read_text())
        if self.meta["seq_length"] != seq_length:
            raise DataError(f"{data_dir} was prepared for seq_length {self.meta['seq_length']}, "
                            f"not {seq_length}")
        self.dir = data_dir
        self.seed = seed
        self.seq = seq_length
        self.sources = self.meta["sources"]
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = [np.memmap(data_dir / f"{s['name']}.tokens.bin", dtype=dtype, mode="r")
                       for s in self.sources]
        self.docs = [np.load(data_dir / f"{s['name']}.docs.npy", mmap_mode="r") for s in self.sources]
        self.counts = _largest_remainder([s["p"] for s in self.sources], BLOCK)
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _block_order(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._block is None or self._block[0] != b:
            order = np.repeat(np.arange(len(self.sources)), self.counts)
            np.random.default_rng([self.seed, 7, b]).shuffle(order)
            # rank[j] = how many samples of order[j]'s source precede j within the block
            rank = np.zeros(BLOCK, dtype=np.int64)
            seen = np.zeros(len(self.sources), dtype=np.int64)
            for j, s in enumerate(order):
                rank[j] = seen[s]
                seen[s] += 1
            self._block = (b, order, rank)
        return self._block[1], self._block[2]

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        p = self._perms.get(key)
        if p is None:
            if len(self._perms) > 4 * len(self.sources):
                self._perms.clear()
            p = np.random.default_rng([self.seed, 11, s, epoch]).permutation(self.sources[s]["windows"])
            self._perms[key] = p
        return p

    def ref(self, i: int) -> SampleRef:
        b, j = divmod(i, BLOCK)
        order, rank = self._block_order(b)
        s = int(order[j])
        k = b * int(self.counts[s]) + int(rank[j])
        epoch, r = divmod(k, self.sources[s]["windows"])
        w = int(self._perm(s, epoch)[r])
        start = w * self.seq
        docs = self.docs[s]
        first = int(np.searchsorted(docs, start, side="right")) - 1
        last = int(np.searchsorted(docs, start + self.seq, side="left")) - 1
        return SampleRef(i, self.sources[s]["name"], w, start, tuple(range(first, max(first, last) + 1)))

    def sample(self, i: int) -> np.ndarray:
        ref = self.ref(i)
        s = self._source_index(ref.source)
        return np.asarray(self.tokens[s][ref.start : ref.start + self.seq], dtype=np.int64)

    def batch(self, indices: range | list[int]) -> np.ndarray:
        return np.stack([self.sample(i) for i in indices])

    def _source_index(self, name: str) -> int:
        for k, s in enumerate(self.sources):
            if s["name"] == name:
                return k
        raise KeyError(name)

    def origins(self, source: str) -> list[str]:
        return json.loads((self.dir / f"{source}.origins.json").read_text())


def _largest_remainder(p: list[float], total: int) -> np.ndarray:
    exact = np.array(p) * total
    counts = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[k] += 1
    return counts


def step_indices(consumed: int, global_batch: int) -> range:
    """Global sample indices of the optimizer step that starts after ``consumed`` samples."""
    return range(consumed, consumed + global_batch)


def rank_micro_indices(consumed: int, micro: int, dp: int, rank: int, m: int) -> range:
    """Indices for ``rank``'s micro-step ``m`` of the step starting at ``consumed``."""
    start = consumed + (m * dp + rank) * micro
    return range(start, start + micro)


@contextlib.contextmanager
def wait_for_meta(data_dir: Path, timeout_s: float = 3600) -> Iterator[None]:
    """Ranks that do not prepare wait here for meta.json (written last by the preparing rank)."""
    t0 = time.time()
    while not (data_dir / META).exists():
        if time.time() - t0 > timeout_s:
            raise DataError(f"waited {timeout_s:.0f}s for {data_dir / META}; did data preparation fail on rank 0?")
        time.sleep(0.2)
    yield
