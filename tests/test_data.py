"""Data: every source format, errors that name the source, a deterministic resumable mixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kit.config import load_recipe
from kit.data import BLOCK, MixtureDataset, mixture_weights, prepare, rank_micro_indices
from kit.errors import DataError
from tests.conftest import ROOT, tiny_overrides

TEXT = "Le chat dort sur le tapis. " * 40


def recipe(tmp_path: Path, sources: list[dict], **extra: object):  # type: ignore[no-untyped-def]
    lines = []
    for s in sources:
        lines.append("[[data.sources]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in s.items()]
    p = tmp_path / "r.toml"
    p.write_text("\n".join(lines) + "\n")
    return load_recipe(p, tiny_overrides(tmp_path / "runs", **extra))


def write_sources(d: Path) -> list[dict]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text(f"{TEXT}\n\nDer Hund schläft. " * 30)
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " + "текст " * 50}) for i in range(40)))
    pq.write_table(pa.table({"text": [f"parquet {i} " + "日本語の文 " * 40 for i in range(40)]}), d / "c.parquet")
    return [
        {"name": "txt", "path": str(d / "a.txt"), "format": "text", "language": "fr"},
        {"name": "js", "path": str(d / "b.jsonl"), "format": "jsonl", "language": "ru"},
        {"name": "pq", "path": str(d / "c.parquet"), "format": "parquet", "language": "ja", "weight": 2.0},
    ]


def test_all_formats_prepare_and_round_trip(tmp_path: Path) -> None:
    cfg = recipe(tmp_path, write_sources(tmp_path / "src"))
    meta = prepare(cfg, tmp_path / "data", log=lambda m: None)
    assert [s["name"] for s in meta["sources"]] == ["txt", "js", "pq"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "data" / "tokenizer.json"))
    assert tok.decode(tok.encode("Der Hund schläft. 日本語").ids) == "Der Hund schläft. 日本語"
    ds = MixtureDataset(tmp_path / "data", seed=1, seq_length=32)
    ref = ds.ref(5)
    assert ref.source in {"txt", "js", "pq"} and ref.docs
    assert ds.sample(5).shape == (32,)
    assert ds.origins(ref.source)[ref.docs[0]].startswith(str(tmp_path / "src"))


def test_sampler_is_a_pure_function_of_the_index(tmp_path: Path) -> None:
    cfg = recipe(tmp_path, write_sources(tmp_path / "src"))
    prepare(cfg, tmp_path / "data", log=lambda m: None)
    a = MixtureDataset(tmp_path / "data", seed=7, seq_length=32)
    b = MixtureDataset(tmp_path / "data", seed=7, seq_length=32)
    idx = [0, 1, 2, BLOCK + 3, 5 * BLOCK + 11, 3]
    # b reads them in another order (a resumed run starts mid-stream): same samples
    assert all(np.array_equal(a.sample(i), b.sample(i)) for i in reversed(idx))
    c = MixtureDataset(tmp_path / "data", seed=8, seq_length=32)
    assert any(not np.array_equal(a.sample(i), c.sample(i)) for i in range(20))


def test_mixture_follows_the_weights(tmp_path: Path) -> None:
    cfg = recipe(tmp_path, write_sources(tmp_path / "src"))
    meta = prepare(cfg, tmp_path / "data", log=lambda m: None)
    ds = MixtureDataset(tmp_path / "data", seed=1, seq_length=32)
    counts: dict[str, int] = {}
    for i in range(BLOCK):
        s = ds.ref(i).source
        counts[s] = counts.get(s, 0) + 1
    for s in meta["sources"]:
        assert abs(counts[s["name"]] / BLOCK - s["p"]) < 1.0 / BLOCK + 1e-9


def test_smoothed_weights() -> None:
    w = mixture_weights([1000, 10], [0, 0], alpha=0.3)
    assert w[0] > w[1] > 10 / 1010  # small languages are up-sampled
    assert mixture_weights([1000, 10], [1.0, 3.0], 0.3) == [0.25, 0.75]


def test_ranks_and_microsteps_partition_the_global_batch() -> None:
    seen = [i for m in range(2) for r in range(3) for i in rank_micro_indices(100, 4, 3, r, m)]
    assert sorted(seen) == list(range(100, 124))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"name": "x", "path": "/nonexistent/file.txt"}, r"data.sources\[x\].path: nothing found at /nonexistent"),
        ({"name": "x", "path": "BAD_JSONL", "format": "jsonl"}, r"line 2 is not JSON"),
        ({"name": "x", "path": "NO_TEXT", "format": "jsonl"}, r"line 1 has no string \"text\" field"),
        ({"name": "x", "path": "BAD_PARQUET", "format": "parquet"}, r"not a Parquet file"),
        ({"name": "x", "path": "LATIN1", "format": "text"}, r"not UTF-8 text"),
        ({"name": "x", "path": "EMPTY", "format": "text"}, r"no non-empty documents"),
        ({"name": "x", "path": "/tmp", "format": "gettext", "languages": ["xx"]}, r"no .mo catalogues"),
    ],
)
def test_bad_data_gets_a_clear_error(tmp_path: Path, source: dict, message: str) -> None:
    files = {
        "BAD_JSONL": b'{"text": "ok"}\n{oops\n',
        "NO_TEXT": b'{"body": "x"}\n',
        "BAD_PARQUET": b"PAR1 this is not parquet",
        "LATIN1": "caf\xe9".encode("latin-1"),
        "EMPTY": b"\n\n  \n",
    }
    if source["path"] in files:
        p = tmp_path / source["path"]
        p.write_bytes(files[source["path"]])
        source = {**source, "path": str(p)}
    cfg = recipe(tmp_path, [source])
    with pytest.raises(DataError, match=message):
        prepare(cfg, tmp_path / "data", log=lambda m: None)
    assert not (tmp_path / "data" / "meta.json").exists()  # nothing that looks prepared


def test_too_little_data_for_one_sample(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("tiny")
    cfg = recipe(tmp_path, [{"name": "s", "path": str(tmp_path / "s.txt")}])
    with pytest.raises(DataError, match="fewer than one sample"):
        prepare(cfg, tmp_path / "data", log=lambda m: None)


def test_embedded_default_data_exists_on_this_machine() -> None:
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml")
    assert all(s.format == "gettext" for s in cfg.data.sources)
    from kit.data import iter_documents

    for s in cfg.data.sources:
        assert next(iter_documents(s)).text.strip()


def test_reuses_a_given_tokenizer(tmp_path: Path) -> None:
    sources = write_sources(tmp_path / "src")
    first = recipe(tmp_path, sources)
    prepare(first, tmp_path / "d1", log=lambda m: None)
    given = tmp_path / "d1" / "tokenizer.json"
    (tmp_path / "r2").mkdir()
    second = recipe(tmp_path / "r2", sources, **{"data.tokenizer": str(given)})
    prepare(second, tmp_path / "d2", log=lambda m: None)
    assert (tmp_path / "d2" / "tokenizer.json").read_bytes() == given.read_bytes()
    assert (tmp_path / "d1" / "js.tokens.bin").read_bytes() == (tmp_path / "d2" / "js.tokens.bin").read_bytes()
    too_small = recipe(tmp_path / "r2", sources, **{"data.tokenizer": str(given), "data.vocab_size": 300})
    with pytest.raises(DataError, match=r"has \d+ tokens but data.vocab_size is 300; set data.vocab_size >= "):
        prepare(too_small, tmp_path / "d3", log=lambda m: None)
