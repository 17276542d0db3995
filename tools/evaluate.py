"""``kit eval RUN [--step N]`` and ``kit eval EXPORT_DIR``: score a checkpoint or a Hugging Face export.

Scored on the run's own held-out sets (kit.evaluation: the same sequences, the same batches, the same
scoring function as the live evaluation), so the numbers equal the live ``eval`` event of that step;
the table shows the live value beside each one. Or on a given text/jsonl/parquet file (``--data``).
Also: ``--json``, ``--plot FILE`` (per-source validation loss over the run's steps, from the ledger),
a few greedy samples per source for a person to read, and ``--record`` to write the result to the
run's ledger (``kit stream --eval`` does that for every checkpoint it ships).

The model is built the way ``kit convert``'s verification builds it (tools.verify_export): for a
checkpoint, the engine's own module weights (ZeRO-1/2) or DeepSpeed's zero_to_fp32 (ZeRO-3); for an
export, ``from_pretrained``. Weights are moved into freshly allocated memory in both cases.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit import checkpoint as ck
from kit.config import RunConfig, SourceSection
from kit.data import TOKENIZER, load_tokenizer
from kit.errors import DataError, KitError
from kit.evaluation import EVAL_KIND, EvalSet, eval_set_from_texts, load_eval_set, score_all, summarize
from kit.ledger import LedgerWriter, hostname, read_all
from kit.rundir import RUN_TOML, RunDir, resolve_run

PROMPT_TOKENS = 16


@dataclass
class Target:
    """What is scored: a checkpoint of a run, or an export (with its run when it can be found)."""

    kind: str  # "checkpoint" or "export"
    path: Path
    step: int | None
    tag: str
    dtype: str
    rd: RunDir | None
    cfg: RunConfig | None
    ckpt: ck.Checkpoint | None = None


# ------------------------------------------------------------------------------------------ targets


def find_target(arg: str, runs_dir: str, step: int | None, run: str = "") -> Target:
    """A run (its newest or ``step`` checkpoint) or an export folder made by ``kit convert``."""
    p = Path(arg)
    if (p / "config.json").is_file():
        return _export_target(p, run, runs_dir)
    from kit.tools.convert import pick_checkpoint

    rd = resolve_run(arg, runs_dir)
    cfg = rd.load_config()
    ckpt = pick_checkpoint(rd, step)
    return Target("checkpoint", ckpt.path, ckpt.step, ckpt.tag, cfg.deepspeed.precision, rd, cfg, ckpt)


def _export_target(path: Path, run: str, runs_dir: str) -> Target:
    try:
        info = json.loads((path / ck.MANIFEST).read_text())["export"]
    except (OSError, ValueError, KeyError, TypeError):
        raise KitError(f"{path} has a config.json but no readable {ck.MANIFEST} from `kit convert`; "
                       "score exports made by `kit convert`") from None
    rd = resolve_run(run, runs_dir) if run else _run_above(path)
    cfg = rd.load_config() if rd else None
    if cfg is not None and info.get("config_digest") not in (None, cfg.digest()):
        raise KitError(f"{path} was exported from run {info.get('run')!r} with another configuration than "
                       f"{rd.path if rd else '?'}; give its own run with --run")
    return Target("export", path, info.get("step"), str(info.get("tag", "")), str(info.get("dtype", "fp32")), rd, cfg)


def _run_above(path: Path) -> RunDir | None:
    """The run directory an export lies in (``<run>/exports/<tag>-<dtype>``), if any."""
    for parent in path.resolve().parents:
        if (parent / RUN_TOML).is_file():
            return RunDir(parent)
    return None


def load_model(t: Target) -> Any:
    """The model of the target in eval mode, its weights in freshly allocated memory."""
    import torch
    from transformers import AutoModelForCausalLM, BloomForCausalLM
    from transformers.utils import logging as hf_logging

    from kit.model import bloom_config
    from kit.tools.convert import torch_dtype
    from kit.tools.verify_export import Reference, _own_memory

    hf_logging.disable_progress_bar()
    dtype = torch_dtype(t.dtype)
    attn = t.cfg.model.attn_implementation if t.cfg else "eager"
    model: Any
    if t.kind == "export":
        model = AutoModelForCausalLM.from_pretrained(str(t.path), dtype=dtype, attn_implementation=attn,
                                                     local_files_only=True)
    else:  # the checkpoint's own weights at any layout, as kit convert's verification reads them
        assert t.cfg is not None and t.ckpt is not None
        ref = Reference(t.ckpt, dtype, t.cfg)
        state = {name: ref.get(name) for name in ref.names()}
        state.setdefault("lm_head.weight", state["transformer.word_embeddings.weight"])  # tied
        config = bloom_config(t.cfg.model, t.cfg.data.vocab_size)
        config._attn_implementation = attn
        with torch.device("meta"):
            model = BloomForCausalLM(config)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
    _own_memory(model)
    return model.eval()


# --------------------------------------------------------------------------------------------- data


def data_dir(rd: RunDir, cfg: RunConfig) -> Path:
    return Path(cfg.data.prepared) if cfg.data.prepared else rd.data


def eval_set_for(t: Target, data: str = "", sequences: int = 0) -> tuple[EvalSet, Any]:
    """The run's held-out set, or one made from ``data``; and the tokenizer to decode with."""
    tok_file = t.path / TOKENIZER if t.kind == "export" else None
    if t.rd is not None and t.cfg is not None and (tok_file is None or not tok_file.exists()):
        tok_file = data_dir(t.rd, t.cfg) / TOKENIZER
    if tok_file is None or not tok_file.exists():
        raise KitError(f"no tokenizer for {t.path}: {TOKENIZER} is missing; give the run with --run")
    tok = load_tokenizer(tok_file)
    if not data:
        if t.rd is None or t.cfg is None:
            raise KitError(f"{t.path} is not inside a run directory: give its run with --run RUN (to score on "
                           "the run's held-out data) or a file with --data FILE")
        es = load_eval_set(data_dir(t.rd, t.cfg), t.cfg)
        if es is None or not es.sources:
            raise DataError(f"{t.rd.path}'s data has no held-out split (prepared before kit held documents out, "
                            "or eval.heldout_* = 0): score a file with --data FILE")
        return es, tok
    seq = t.cfg.model.seq_length if t.cfg else _export_seq_length(t.path)
    micro = (t.cfg.eval.micro_batch_size or t.cfg.batch.micro_batch_size) if t.cfg else 4
    sequences = sequences or (t.cfg.eval.sequences if t.cfg else 16)
    return eval_set_from_texts(tok, {Path(data).stem: _read_texts(Path(data))}, seq, sequences, micro), tok


def _export_seq_length(path: Path) -> int:
    try:
        return int(json.loads((path / "tokenizer_config.json").read_text())["model_max_length"])
    except (OSError, ValueError, KeyError, TypeError):
        raise KitError(f"{path}/tokenizer_config.json does not say the sequence length; give --run RUN") from None


def _read_texts(path: Path) -> list[str]:
    from kit.data import iter_documents

    fmt = {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "text")
    if not path.is_file():
        raise DataError(f"--data {path}: no such file (a .txt with blank-line separated documents, a .jsonl "
                        "with a \"text\" field per line, or a .parquet with a \"text\" column)")
    texts = [d.text for d in iter_documents(SourceSection(name=path.stem, path=str(path), format=fmt))]
    if not texts:
        raise DataError(f"--data {path}: no non-empty documents")
    return texts


# ------------------------------------------------------------------------------------------- scoring


def live_event(rd: RunDir | None, step: int | None) -> dict[str, Any] | None:
    """The live evaluation of ``step`` (the latest, when a rollback replayed it)."""
    if rd is None or step is None:
        return None
    found = [e for e in read_all(rd.path, {EVAL_KIND}) if e.get("step") == step and e.get("by") == "live"]
    return found[-1] if found else None


def compare(res: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any] | None:
    """How far this result is from the live one, per source (None: no live evaluation of that step)."""
    if live is None or not isinstance(live.get("sources"), dict):
        return None
    diffs = {}
    for name, v in res["sources"].items():
        lv = live["sources"].get(name, {})
        if isinstance(lv, dict) and isinstance(lv.get("loss"), (int, float)):
            diffs[name] = abs(v["loss"] - lv["loss"])
    worst = max(diffs.values(), default=None)
    return {"step": live["step"], "max_abs_diff": worst, "identical": bool(diffs) and worst == 0.0,
            "sources": {k: live["sources"][k]["loss"] for k in diffs}}


def evaluate(t: Target, data: str = "", sequences: int = 0, samples: int = 1, new_tokens: int = 32,
             model: Any = None) -> dict[str, Any]:
    """Score a target; the result as JSON-able data (what ``--json`` prints and ``--record`` writes)."""
    t0 = time.perf_counter()
    es, tok = eval_set_for(t, data, sequences)
    model = model if model is not None else load_model(t)
    res = summarize(es, score_all(model, es))
    out: dict[str, Any] = {"target": str(t.path), "kind": t.kind, "step": t.step, "tag": t.tag, "dtype": t.dtype,
                           "data": data or "held-out", **res, "notes": list(es.notes)}
    out["live"] = None if data else compare(res, live_event(t.rd, t.step))
    if samples > 0:
        from kit.tools.eval_report import generate_samples

        out["samples"] = generate_samples(model, es, tok, samples, new_tokens, min(PROMPT_TOKENS, es.seq_length // 2))
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def evaluate_checkpoint(rd: RunDir, c: ck.Checkpoint) -> dict[str, Any]:
    """A checkpoint on the run's held-out sets, without samples (``kit stream --eval``)."""
    cfg = rd.load_config()
    t = Target("checkpoint", c.path, c.step, c.tag, cfg.deepspeed.precision, rd, cfg, c)
    return evaluate(t, samples=0)


def record(rd: RunDir, res: dict[str, Any], led: LedgerWriter | None = None) -> None:
    """Write a result as an ``eval`` event (by: checkpoint, export or stream) to the run's ledger."""
    fields = {k: res[k] for k in ("sources", "loss", "ppl", "tokens", "tag", "dtype", "seconds")}
    live = res.get("live") or {}
    fields["live_max_abs_diff"] = live.get("max_abs_diff")
    by = res.get("by", res["kind"])
    if led is not None:
        led.emit(EVAL_KIND, step=res["step"], by=by, **fields)
        return
    with LedgerWriter(rd.path, f"eval-{hostname()}-{os.getpid()}") as own:
        own.emit(EVAL_KIND, step=res["step"], by=by, **fields)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    from kit.tools.cli import NONNEGATIVE, POSITIVE

    p.add_argument("target", help="run directory (or run name under --runs-dir), or an export folder of `kit convert`")
    p.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: ./runs)")
    p.add_argument("--step", type=NONNEGATIVE, default=None,
                   help="the checkpoint's step (default: the newest complete one)")
    p.add_argument("--run", default="", help="for an export outside its run directory: the run whose held-out data "
                                             "to score on")
    p.add_argument("--data", default="", metavar="FILE",
                   help="score on this file instead (.txt: documents separated by blank lines; .jsonl; .parquet)")
    p.add_argument("--sequences", type=NONNEGATIVE, default=0,
                   help="with --data: sequences to score (default: eval.sequences)")
    p.add_argument("--samples", type=NONNEGATIVE, default=1,
                   help="greedy samples per source to print (default 1; 0: none)")
    p.add_argument("--new-tokens", type=POSITIVE, default=32, help="tokens generated per sample (default 32)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="write the per-source validation loss over the run's steps (ledger eval events) to PNG")
    p.add_argument("--record", action="store_true", help="write the result to the run's ledger as an eval event")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace, verb: str) -> int:
    from kit.tools.eval_report import plot_history, print_result

    if args.plot is not None and args.plot.parent.is_dir() and not os.access(args.plot.parent, os.W_OK):
        raise KitError(f"cannot write --plot {args.plot}: {args.plot.parent} is not writable; choose another file")
    t = find_target(args.target, args.runs_dir, args.step, args.run)
    if t.kind == "export" and args.step is not None and args.step != t.step:
        raise KitError(f"{t.path} is the export of step {t.step}; --step {args.step} applies to a run")
    res = evaluate(t, args.data, args.sequences, args.samples, args.new_tokens)
    if args.record:
        if t.rd is None or args.data:
            raise KitError("--record writes the run's held-out result to its ledger: it needs the run and no --data")
        record(t.rd, res)
    if args.plot is not None:
        if t.rd is None:
            raise KitError("--plot draws the run's evaluations from its ledger: give the run with --run")
        res["plot"] = str(plot_history(t.rd, args.plot, mark=t.step))
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print_result(res)
    return 0
