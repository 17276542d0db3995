"""Does an export reproduce its checkpoint? Every weight compared exactly, and the logits of the first
blocks of ``from_pretrained(export)`` against the same blocks built from the checkpoint's own weights.

The reference must not share code with the converter, or a parsing bug would agree with itself:
- ZeRO-1/2 whose module dtype is the export dtype: the engine's own module weights, saved whole in
  ``mp_rank_00_model_states.pt`` (exactly what the engine computed with; a second copy of the weights,
  so a damaged byte in either copy shows as a difference);
- otherwise (ZeRO-3 keeps no whole module; or another dtype): DeepSpeed's zero_to_fp32 in lazy
  mode, cast to the export dtype the way the engine casts its fp32 masters;
- a tensor x pipeline layout (kit.parallel): the engine's module weights of every shard, joined with
  torch.cat (:func:`layout_module_state`; held whole in memory), in the training dtype: the export is
  compared cast to it.
The export is read with safetensors' own reader and transformers' from_pretrained.

What is checked, and why it is bounded (issue 16: verification held two whole models, twice the
model in memory, more than DeepSpeed's converter itself):
1. weights: every tensor of the export against the reference, one tensor at a time: by CRC-32 where
   tools.convert gives the export's tensors' CRC-32s (taken from the shards as written, in the read for
   the manifest's CRC-32s): against the CRC-32s torch.save wrote for the module weights (ZeRO-1/2: no
   weight read at all; :func:`saved_record_check`), or the reference tensor's own CRC-32 (zero_to_fp32);
   otherwise (and for a tensor not proven so) bit for bit. The reference's file pages are dropped behind
   (madvise), so memory stays at about the largest tensor;
2. logits: a model of the first ``SAMPLE_LAYERS`` blocks (embeddings, blocks 0..k-1, final norm,
   tied head: every kind of module the model has) loaded with from_pretrained from the export, and
   the same blocks from the reference, on a fixed batch. The weights of the other blocks are covered
   by 1; the logits check covers the loading path (config, names, shards, dtype, tying) and the
   arithmetic, which are the same for every block.
``ok`` needs both: weights identical, and logits within ``atol`` (default 0: bit-identical).

Both models compute from weights in 64-byte aligned memory (copied there where they are not). Why: safetensors
places tensors at whatever offset the header length gives (8-byte granularity), torch.load's mmap at
64-byte boundaries, and MKL's AVX-512 kernels may sum in another order for differently aligned
operands (Intel's "conditional numerical reproducibility" caveat). Equal weights at different
addresses then gave logits 1 ulp apart on one CI machine; placement is not what this check is for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from kit import checkpoint as ck
from kit.config import RunConfig
from kit.errors import CheckpointError
from kit.parallel.layout import Layout
from kit.rundir import RunDir
from kit.tools.zero_reader import MADV_DONTNEED, MADV_POPULATE_READ, MODEL_STATES_Z12, advise

BATCH_SEED = 0
BATCH_SHAPE = (1, 16)  # 16 positions x the vocabulary: enough logits to see any difference, cheap at any size
# (the head's matmul was most of the check at 32 positions: 16 took 0.03-0.06 s off kit convert, bench/convert.py)
SAMPLE_LAYERS = 2  # blocks in the logits check (the model's first ones)
ALIGN = 64  # bytes: both models compute from weights aligned so (see above)
DROP_EVERY = 64 << 20  # bytes of reference read between two drops of its file pages


def fixed_batch(cfg: RunConfig) -> Any:
    """Deterministic token ids (no special tokens), the same on every machine."""
    import torch

    g = torch.Generator().manual_seed(BATCH_SEED)
    rows, cols = BATCH_SHAPE
    return torch.randint(4, cfg.data.vocab_size, (rows, min(cols, cfg.model.seq_length)), generator=g)


class Reference:
    """The checkpoint's own weights in the export dtype, one tensor at a time (:meth:`get`), with the
    file pages behind them given back as it goes (:meth:`done`)."""

    def __init__(self, ckpt: ck.Checkpoint, dtype: Any, cfg: RunConfig) -> None:
        import torch

        self.dtype = dtype
        self.path = ckpt.path
        self.module: dict[str, Any] | None = None
        self.mapped = False  # module tensors are file mappings (their pages can be given back)
        self.lazy: dict[str, Any] = {}
        self._flat: dict[int, Any] = {}
        self._read = 0
        layout = ck.layout_of(ckpt)
        if not layout.plain:
            self.module = layout_module_state(ckpt, layout, _full_shapes(cfg))
            self.kind = f"engine module weights ({layout} shards merged)"
            kinds = {v.dtype for v in self.module.values() if v.is_floating_point()}
            if len(kinds) == 1 and dtype not in kinds:  # the shards are in the training dtype: compare there
                self.dtype = kinds.pop()
                self.kind += f", export compared as {str(self.dtype).removeprefix('torch.')}"
            return
        if ckpt.manifest.kit.zero_stage in (1, 2):
            states = torch.load(ckpt.path / MODEL_STATES_Z12, map_location="cpu", mmap=True, weights_only=False)
            module = states["module"]
            if all(v.dtype == dtype for v in module.values() if v.is_floating_point()):
                self.module, self.kind, self.mapped = dict(module), "engine module weights", True
                return
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            self.lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.path.parent), tag=ckpt.tag, lazy_mode=True)
        self.kind = "deepspeed zero_to_fp32"
        self._flat = {id(f): f for t in self.lazy.values() for rank in getattr(t, "flat_groups", []) for f in rank}

    def saved_check(self, crcs: dict[str, int], names: set[str]) -> set[str]:
        """The reference tensors proven equal to the export's by the CRC-32s torch.save wrote, where the
        reference is the engine's module weights as saved (:func:`saved_record_check`); else none."""
        return saved_record_check(self.path / MODEL_STATES_Z12, crcs, names)[0] if self.mapped else set()

    def names(self) -> list[str]:
        return list(self.module if self.module is not None else self.lazy)

    def get(self, name: str) -> Any:
        if self.module is not None:
            return self.module[name]
        t = self.lazy[name]
        return (t.contiguous() if hasattr(t, "contiguous") else t).to(self.dtype)

    def crc(self, name: str) -> int | None:
        """The CRC-32 of the reference tensor ``name`` without copying it (:func:`gathered_crc`), where it
        is a zero_to_fp32 tensor already in the export dtype (fp32); else None (:meth:`get` it)."""
        import torch

        t = self.lazy.get(name) if self.module is None and self.dtype == torch.float32 else None
        if t is None:
            return None
        crc = gathered_crc(t)
        if crc is not None:
            self._read += 4 * int(t.shape.numel())
            if self._read >= DROP_EVERY:
                self.drop()
        return crc

    def drop(self) -> None:
        """Give back every file page read so far (the next reads fault them in again from the page cache)."""
        self._read = 0
        if self.module is not None and self.mapped:
            for t in self.module.values():
                advise(t, MADV_DONTNEED)
        for flat in self._flat.values():
            advise(flat, MADV_DONTNEED)

    def done(self, t: Any) -> None:
        """``t`` (from :meth:`get`) is no longer needed: give its file pages back now and then."""
        self._read += t.numel() * t.element_size()
        if self.module is not None:
            if self.mapped:  # never on memory of its own: MADV_DONTNEED would zero it
                advise(t, MADV_DONTNEED)
        elif self._read >= DROP_EVERY:
            for flat in self._flat.values():
                advise(flat, MADV_DONTNEED)
            self._read = 0


def _full_shapes(cfg: RunConfig) -> dict[str, Any]:
    import torch
    from transformers import BloomForCausalLM

    from kit.model import bloom_config

    with torch.device("meta"):
        model = BloomForCausalLM(bloom_config(cfg.model, cfg.data.vocab_size))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def layout_module_state(ckpt: ck.Checkpoint, layout: Layout, full_shapes: dict[str, Any]) -> dict[str, Any]:
    """The engine's own module weights of a tensor/pipeline checkpoint, put together with torch.cat:
    each tensor rank's ``module`` (or, in a pipeline, each layer's file), shards joined along the one
    dimension where they differ from each other's sum. Independent of the converter's byte ranges."""
    import torch

    from kit.parallel.pipe import hf_name

    n_layer = 1 + max((int(k.split(".")[2]) for k in full_shapes if k.startswith("transformer.h.")), default=-1)
    shards: dict[str, dict[int, Any]] = {}
    if layout.pipeline == 1:
        for t in range(layout.tensor):
            module = torch.load(ckpt.path / f"mp_rank_{t:02d}_model_states.pt", map_location="cpu",
                                weights_only=False)["module"]
            for k, v in module.items():
                shards.setdefault(k, {})[t] = v
    else:
        for f in sorted(ckpt.path.glob("layer_*-model_*-model_states.pt")):
            m = re.fullmatch(r"layer_(\d+)-model_(\d+)-model_states\.pt", f.name)
            if m is None:
                continue
            idx, t = int(m.group(1)), int(m.group(2))
            for k, v in torch.load(f, map_location="cpu", weights_only=False).items():
                name = "transformer.word_embeddings.weight" if idx == 0 else hf_name(f"{idx}.{k}", n_layer)
                if name not in full_shapes:
                    raise CheckpointError(f"{f.name}: {k} is not a parameter of this run's model")
                shards.setdefault(name, {})[t] = v
    state: dict[str, Any] = {}
    for name, by_rank in shards.items():
        parts = [by_rank[t] for t in sorted(by_rank)]
        full = tuple(full_shapes[name])
        if tuple(parts[0].shape) == full:  # replicated over the tensor ranks
            state[name] = parts[0]
            continue
        dims = [d for d in range(len(full)) if parts[0].shape[d] * len(parts) == full[d]]
        if len(dims) != 1:
            raise CheckpointError(f"{ckpt.tag}: {name} shards {[tuple(p.shape) for p in parts]} do not make {full}")
        state[name] = torch.cat(parts, dim=dims[0])
    state.setdefault("lm_head.weight", state["transformer.word_embeddings.weight"])
    return state


def _export_shards(export: Path) -> list[Path]:
    index = export / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    return [export / n for n in names]


def saved_record_check(path: Path, crcs: dict[str, int], names: set[str]) -> tuple[set[str], int]:
    """Which tensors of a ``module`` state dict saved whole (ZeRO-1/2's model states) are proven equal to the
    export by CRC-32 alone, without reading a weight: torch.save wrote the CRC-32 of each storage (zip
    record); the module's tensors are views into storages (in training dtype they all share DeepSpeed's
    flat buffer), so a record's CRC-32 is put together (kit.crc.crc32_combine) from the export's
    tensor CRC-32s (``crcs``) in storage order, with any bytes between tensors (padding) read from the
    file. A record whose CRC-32 matches proves every tensor in it; the tensors of one that does not (or
    cannot be put together so: overlapping views, a tensor with no CRC) are returned to be compared byte
    for byte. Returns (proven names, records checked)."""
    import torch

    from kit.crc import crc32_combine
    from kit.tools.source_check import crc_of_range, records

    by_start = {r.start: r for r in records(path) if r.stored and r.crc}
    module = torch.load(path, map_location="meta", weights_only=False)["module"]  # file offsets, no data
    views: dict[int, list[tuple[int, int, str]]] = {}
    for name, t in module.items():
        start = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        if name in names and isinstance(start, int) and start in by_start and t.is_contiguous():
            views.setdefault(start, []).append((t.storage_offset() * t.element_size(), t.numel() * t.element_size(),
                                                name))
    proven: set[str] = set()
    buf = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as f:
        for start, spans in views.items():
            rec = by_start[start]
            same: dict[tuple[int, int], list[str]] = {}  # views of the same bytes (a tied weight): one CRC
            for off, n, name in spans:
                same.setdefault((off, n), []).append(name)
            crc, pos, ok = 0, 0, True
            for (off, n), alike in sorted(same.items()):
                known = [crcs[a] for a in alike if a in crcs]
                if off < pos or not known:
                    ok = False
                    break
                if off > pos:
                    crc = crc32_combine(crc, crc_of_range(f.fileno(), start + pos, off - pos, buf), off - pos)
                crc, pos = crc32_combine(crc, known[0], n), off + n
            if ok and pos < rec.size:
                crc = crc32_combine(crc, crc_of_range(f.fileno(), start + pos, rec.size - pos, buf), rec.size - pos)
            if ok and crc == rec.crc:
                proven.update(name for alike in same.values() for name in alike)
    return proven, len(views)


def _st_dtype(t: Any) -> str:
    """safetensors' name of a tensor's dtype ("F32", "BF16", ...)."""
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(str(t.dtype).removeprefix("torch."), "")


def tensor_crc(t: Any) -> int:
    """CRC-32 of a tensor's bytes (kit.crc)."""
    import torch

    from kit.crc import crc32

    return crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def gathered_crc(t: Any) -> int | None:
    """CRC-32 of a DeepSpeed zero_to_fp32 ``GatheredTensor`` (its lazy ZeRO-3 tensor) as its
    ``contiguous()`` would make it, without making it: the same chunks, chosen by the same steps as
    DeepSpeed's (every rank's slices of the flat groups the tensor's range touches, then the first
    numel elements), CRC'd where they lie (the flat groups are memory mappings) instead of copied
    together by torch.cat. The copy into fresh memory was most of the ZeRO-3 weights' check
    (bench/convert.py). None where ``t`` is not such a tensor (another DeepSpeed: the caller copies)."""
    import math

    import torch

    from kit.crc import crc32

    try:
        flat_groups, bounds = t.flat_groups, t.flat_groups_offset
        offset, end_idx, left = t.offset, t.offset + t.partitioned_numel, math.prod(t.shape)
    except AttributeError:
        return None
    crc = 0
    for groups in flat_groups:  # DeepSpeed's GatheredTensor.contiguous, step for step
        start_group_id = end_group_id = None
        for group_id in range(len(bounds) - 1):
            if bounds[group_id] <= offset < bounds[group_id + 1]:
                start_group_id = group_id
            if bounds[group_id] < end_idx <= bounds[group_id + 1]:
                end_group_id = group_id
                break
        if start_group_id is None or end_group_id is None:
            return None
        for group_id in range(start_group_id, end_group_id + 1):
            chunk = groups[group_id][offset - bounds[group_id]:min(end_idx, bounds[group_id + 1]) - bounds[group_id]]
            take = min(chunk.numel(), left)
            if take <= 0:
                break
            if chunk.dtype != torch.float32 or not chunk.is_contiguous():
                return None
            crc, left = crc32(chunk[:take].view(torch.uint8).numpy(), crc), left - take
    return crc if left == 0 else None


def compare_weights(ref: Reference, export: Path,
                    crcs: dict[str, int] | None = None) -> tuple[list[str], int, dict[str, int]]:
    """Names of the tensors that differ (or are missing on either side), how many were compared, and
    how many each way ("saved_crc32", "crc32", "bytes").

    ``crcs``: the CRC-32 of each export tensor, taken from the shards as they were written (tools.convert
    reads every byte back for the manifest's CRC-32s anyway). A tensor that has one is compared by it:
    against the CRC-32 torch.save wrote for the reference tensor (the engine's module weights: nothing
    read at all), or else against the reference tensor's own CRC-32; the rest byte for byte, the export
    read with safetensors' reader. A CRC-32 differs for any change of up to 32 consecutive bits and for
    all but 1 in 2^32 other changes."""
    from safetensors import safe_open
    from transformers import BloomForCausalLM

    crcs = crcs or {}
    tied = dict(BloomForCausalLM._tied_weights_keys)
    wanted = set(ref.names())
    saved = ref.saved_check(crcs, wanted) if crcs else set()
    differing, seen = [], set()
    how = {"saved_crc32": 0, "crc32": 0, "bytes": 0}
    for shard in _export_shards(export):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                seen.add(name)
                if name not in wanted:
                    differing.append(name)
                    continue
                sl = f.get_slice(name)
                if name in crcs and sl.get_dtype() == "F32" and (fast := ref.crc(name)) is not None:
                    same = tuple(sl.get_shape()) == tuple(ref.lazy[name].shape) and fast == crcs[name]
                    how["crc32"] += 1  # the zero_to_fp32 tensor's CRC-32, taken where its chunks lie
                    if not same:
                        differing.append(name)
                    continue
                want = ref.get(name)  # the module's: a file mapping, nothing read yet
                plain = want.dtype == ref.dtype and sl.get_dtype() == _st_dtype(want)
                if plain and name in saved:
                    same = tuple(sl.get_shape()) == tuple(want.shape)
                    how["saved_crc32"] += 1
                elif name in crcs and plain:
                    same = tuple(sl.get_shape()) == tuple(want.shape) and tensor_crc(want) == crcs[name]
                    how["crc32"] += 1
                else:
                    how["bytes"] += 1
                    got = f.get_tensor(name)
                    if got.dtype != ref.dtype and got.is_floating_point():
                        got = got.to(ref.dtype)  # a layout's reference is in the training dtype (as from_pretrained)
                    same = same_bits(want, got)
                    del got
                if not same:
                    differing.append(name)
                ref.done(want)
    differing += sorted(n for n in wanted - seen if tied.get(n) not in seen)
    return sorted(differing), len(seen), how


def same_bits(a: Any, b: Any) -> bool:
    """Same dtype, shape and bytes (a NaN equals the same NaN): compared as 64-bit words where they
    fit, after faulting the mapped pages in with one call each (page by page, faults cost most)."""
    import numpy as np
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    x, y = (t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in (a, b))
    advise(a, MADV_POPULATE_READ)
    advise(b, MADV_POPULATE_READ)
    if x.nbytes % 8 == 0:
        x, y = x.view(np.uint64), y.view(np.uint64)
    return bool(np.array_equal(x, y))


def _prefix_config(cfg: RunConfig, layers: int) -> Any:
    from kit.model import bloom_config

    config = bloom_config(cfg.model, cfg.data.vocab_size)
    config.n_layer = min(layers, cfg.model.n_layer)
    config._attn_implementation = cfg.model.attn_implementation
    return config


def sampled_logits(cfg: RunConfig, ref: Reference, export: Path) -> tuple[Any, Any]:
    """Logits of the first blocks: loaded from the export by from_pretrained, and built from the reference.
    One model at a time, so memory holds one prefix (and its file pages are given back)."""
    return export_logits(cfg, ref.dtype, export), reference_logits(cfg, ref)


def export_logits(cfg: RunConfig, dtype: Any, export: Path) -> Any:
    """The first blocks' logits of the model ``from_pretrained`` loads from the export."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = _prefix_config(cfg, SAMPLE_LAYERS)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "weights of the other blocks not used": that is the point
    try:
        got_model = AutoModelForCausalLM.from_pretrained(str(export), config=config, dtype=dtype,
                                                         attn_implementation=config._attn_implementation,
                                                         local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    _own_memory(got_model)
    got_model.eval()
    with torch.no_grad():
        return got_model(input_ids=fixed_batch(cfg)).logits


def reference_logits(cfg: RunConfig, ref: Reference) -> Any:
    """The same blocks' logits built from the checkpoint's own weights."""
    import torch
    from transformers import BloomForCausalLM

    config = _prefix_config(cfg, SAMPLE_LAYERS)
    with torch.device("meta"):
        ref_model = BloomForCausalLM(config)
    keep = set(ref_model.state_dict()) - set(BloomForCausalLM._tied_weights_keys)  # tied: one copy, tie_weights
    state = {}
    for name in ref.names():
        if name in keep:
            state[name] = ref.get(name)
            if ref.module is None:
                ref.done(state[name])  # the merged copy is the model's: the file pages behind it can go
    ref_model.load_state_dict(state, strict=False, assign=True)
    ref_model.tie_weights()
    missing = [n for n, p in ref_model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the reference lacks {missing[:3]}")
    if ref.mapped:  # mapped file pages: into fresh memory (the merges already allocated theirs)
        _own_memory(ref_model)
    del state
    ref.drop()
    ref_model.eval()
    with torch.no_grad():
        return ref_model(input_ids=fixed_batch(cfg)).logits


def warm_up() -> None:
    """Build what ``from_pretrained`` builds on its first call in a process (transformers' table of
    checkpoint renamings: about a thousand regular expressions, 0.15-0.2 s here): tools.convert runs this
    on a thread while the shards are written, where the time is hidden behind the copy."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # another transformers: nothing to warm
        return
    get_checkpoint_conversion_mapping("bloom")


def verify_export(rd: RunDir, cfg: RunConfig, ckpt: ck.Checkpoint, export: Path, dtype_name: str,
                  atol: float = 0.0, crcs: dict[str, int] | None = None) -> dict[str, Any]:
    """Compare every weight exactly and the first blocks' logits (``ok``: weights identical and logits
    within ``atol``); returns the ledger fields (ok, bit_identical, max_abs_diff, weights_identical,
    differing_weights, weights_compared_by, atol, reference, ...). ``crcs``: the export's tensors'
    CRC-32s as written (tools.convert).

    Mostly one thing after another: the reference's logits computed on a thread while the shards were
    written slowed the writing by as much (two busy cores), and the two logits computed side by side
    gained nothing. Where the weights' check copies nothing (a fp32 export of ZeRO-3: the zero_to_fp32
    tensors' CRC-32s taken where their chunks lie, :meth:`Reference.crc`) it runs on a thread beside the
    logits check, in the single-threaded parts of that (from_pretrained, the reference's gathering):
    -0.1 s (bench/convert.py). Where it copies (the reference tensors of other dtypes, of layouts), it
    runs first: beside the prefix models those copies took the command over half of DeepSpeed's
    converter's memory."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    ref = Reference(ckpt, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name], cfg)
    if ref.module is None and ref.dtype == torch.float32 and crcs:
        # both threads only read ``ref``'s file mappings (torch.load's mmap: MAP_PRIVATE, never written);
        # a drop() by either gives pages back that the other's next read faults in again from the page cache
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-check") as pool:
            weights = pool.submit(compare_weights, ref, export, crcs)
            got, want = sampled_logits(cfg, ref, export)
            differing, compared, how = weights.result()
    else:
        differing, compared, how = compare_weights(ref, export, crcs)
        got, want = sampled_logits(cfg, ref, export)
    diff = float((got.float() - want.float()).abs().max())
    return {"ok": not differing and diff <= atol, "bit_identical": bool(torch.equal(got, want)),
            "max_abs_diff": diff, "weights_identical": not differing, "differing_weights": differing[:5],
            "weights_compared": compared, "weights_compared_by": how,
            "logits_layers": min(SAMPLE_LAYERS, cfg.model.n_layer),
            "atol": atol, "reference": ref.kind, "batch": list(fixed_batch(cfg).shape), "dtype": dtype_name}


def _own_memory(model: Any) -> None:
    """Move every parameter that is not 64-byte aligned into a fresh tensor (torch's allocator aligns
    them to 64 bytes); shared (tied) parameters stay one object. Aligned ones (torch.save's records are)
    stay where they are: copying the embedding was most of the logits check's time."""
    import torch

    for p in model.parameters():  # parameters() yields a shared Parameter once
        if p.data.data_ptr() % ALIGN or not p.data.is_contiguous():
            p.data = p.data.clone(memory_format=torch.contiguous_format)
