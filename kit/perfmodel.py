"""``kit plan``'s performance model: memory, step time and throughput of a recipe's layout on a cluster.

Why a model and not a benchmark: the layout of a 176B run (tensor x pipeline x data, ZeRO stage,
micro-batch) is chosen before the allocation exists, and a wrong choice costs months (BLOOM's old
recipe, ZeRO-3 over 512 GPUs on a 6 GB/s network, would have been communication-bound). A plan is a
few hundred multiplications, so ``--compare`` ranks every layout of a world size in milliseconds on
a login node. Pure Python: no torch, no numpy.

The model (docs/plan.md has the formulas, the sources and the validation against BLOOM-176B):

- compute: matmul FLOPs at ``peak x matmul_efficiency``; memory-bound ops (LayerNorm, GeLU, softmax
  over the materialised attention scores, residuals, the logits' cross-entropy) at HBM bandwidth;
- tensor parallel: 2 ring all-reduces of the activations per block forward, 2 backward, 2 more
  when activations are recomputed, not overlapped with compute;
- pipeline: 1F1B, ``(m + p - 1)`` slots of the slowest stage (bubble ``(p-1)/(m+p-1)``), each slot
  paying the point-to-point send of activations forward and gradients backward;
- data parallel, ring formulas over the slowest link of the group: ZeRO 0/1 reduce gradients (and
  ZeRO 1/2 gather parameters) once per step, after the last micro-batch; ZeRO 2 reduce-scatters
  and ZeRO 3 also all-gathers parameters twice on every micro-batch, overlapped with compute;
- memory per GPU of the fullest stage: weights, gradients and Adam state under the ZeRO stage,
  activations of the micro-batches a 1F1B stage holds in flight, with and without recomputation
  (Korthikanti et al. 2022), the last stage's logits, and a fixed runtime reserve.

Two software stacks differ in what they shard and fuse: ``kit`` (transformers' BLOOM blocks under
DeepSpeed AutoTP and PipelineModule: embedding and LM head replicated across the tensor group, eager
attention with an fp32 softmax) and ``megatron-deepspeed`` (what BLOOM-176B ran: vocabulary-parallel
embedding, fused kernels, embeddings balanced as pipeline slots, fp32 gradient accumulation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kit.config import ClusterSection, RunConfig
from kit.errors import ConfigError
from kit.model import param_count, step_flops

GIB = 2**30
RESERVE_BYTES = 2 * GIB
"""CUDA context, cuBLAS workspace and NCCL buffers (BLOOM's notes measured 1.3-1.6 GiB of context)."""
ZERO2_BUCKET_BYTES = 1 * GIB
"""DeepSpeed's ZeRO-2/3 reduce bucket: 5e8 elements in bf16."""
ZERO3_LIVE_PARAMS = 1e9
"""DeepSpeed's stage3_max_live_parameters default: gathered parameters a ZeRO-3 rank holds at once."""
FP32_MATMUL_FRACTION = 1 / 16
"""fp32 matmuls run without tensor cores (PyTorch leaves TF32 off): A100 19.5 of 312 TFLOP/s."""
ADAM_BYTES_PER_PARAM = 28.0
"""HBM traffic of one Adam update per parameter: read the gradient, read+write the fp32 master
weight and both moments, write the half-precision weight."""
LOGIT_BYTES = 12.0
"""Bytes held per logit element on the last stage: bf16 logits, their fp32 copy, the saved
log-softmax (cross-entropy computed in fp32)."""
LOGIT_TRAFFIC = 24.0
"""HBM bytes moved per logit element, forward and backward of the fp32 cross-entropy."""


@dataclass(frozen=True, slots=True)
class Stack:
    """What the training software shards and fuses: the constants that differ between stacks.

    Byte counts are per token per block, in bf16 (scaled for fp32): ``*_traffic`` is HBM traffic of
    the memory-bound ops of one forward (backward counts twice, recomputation once more), ``act_*``
    the activations a block keeps for its backward (Korthikanti et al. 2022, table 2). Each is
    ``x * h + x_tp * h / t + x_score * heads * seq / t``."""

    name: str
    vocab_parallel: bool
    """Embedding and LM head split across the tensor group (Megatron) or replicated (AutoTP)."""
    embed_slots: bool
    """The pipeline partition counts the embedding and the head as one block each
    (Megatron-DeepSpeed's ``type:transformer|embedding``), else only blocks are balanced."""
    partitioned_p2p: bool
    """Pipeline sends carry 1/t of the activations and all-gather them in the tensor group."""
    fp32_grad_accum: bool
    """Gradients accumulated and all-reduced in fp32, unsharded (DeepSpeed's BF16_Optimizer)."""
    traffic: float
    traffic_tp: float
    traffic_score: float
    act: float
    act_tp: float
    act_score: float


STACKS: dict[str, Stack] = {
    # transformers' BloomBlock, eager. Per token and block, forward: two LayerNorms and two residual
    # adds (20 h); the tanh-GeLU as 9 separate kernels over 4h/t (12 reads + 9 writes: 168 h/t) plus
    # the q/k/v reshape copies and the head merge (16 h/t); per attention score: baddbmm write, mask
    # add, fp32 softmax, cast back, bmm read (22 bytes). Kept for backward per score: the fp32 softmax
    # output and the bf16 probabilities (6 bytes); dropout at p = 0 is skipped by PyTorch.
    "kit": Stack(name="kit", vocab_parallel=False, embed_slots=False, partitioned_p2p=False,
                 fp32_grad_accum=False, traffic=20, traffic_tp=184, traffic_score=22,
                 act=10, act_tp=24, act_score=6),
    # Megatron-DeepSpeed as BLOOM-176B ran it: fused bias-GeLU (16 h/t), fused scale-mask-softmax
    # (a score is written by the GEMM, read and written by the softmax, read by the next GEMM: 8
    # bytes); Korthikanti et al.'s activation counts (dropout masks included).
    "megatron-deepspeed": Stack(name="megatron-deepspeed", vocab_parallel=True, embed_slots=True,
                                partitioned_p2p=True, fp32_grad_accum=True, traffic=20, traffic_tp=16,
                                traffic_score=8, act=10, act_tp=24, act_score=5),
}


@dataclass(frozen=True, slots=True)
class Layout:
    """One way to lay out the world: tensor x pipeline x data ranks, ZeRO stage, micro-batching."""

    tensor: int
    pipeline: int
    data: int
    zero: int
    micro_batch: int
    grad_accum: int

    @property
    def world(self) -> int:
        return self.tensor * self.pipeline * self.data

    def label(self) -> str:
        return (f"TP{self.tensor} PP{self.pipeline} DP{self.data} ZeRO-{self.zero} "
                f"mb{self.micro_batch}x{self.grad_accum}")


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage as the partition lays it out."""

    blocks: int
    embedding: bool
    head: bool


@dataclass(frozen=True, slots=True)
class Memory:
    """Bytes per GPU on the fullest stage."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_recompute: float
    """Activations with recomputation (each block keeps only its input)."""
    activations_full: float
    """Activations without recomputation (each block keeps everything its backward reads)."""
    logits: float
    reserve: float
    total: float
    stage: int
    """The fullest stage (0 = first)."""
    in_flight: int
    """Micro-batches whose activations that stage holds at once (1F1B: p - stage)."""


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per optimizer step; the parts add up to ``step``."""

    compute: float
    matmul: float
    memory_bound: float
    tensor: float
    pipeline: float
    bubble: float
    data_exposed: float
    optimizer: float
    step: float
    data_comm: float
    """Time the data-parallel transfers take, hidden behind compute or not."""
    bubble_fraction: float
    slowest_stage: int
    tensor_gbps: float
    """Bandwidth the tensor all-reduces run at (0 = no tensor parallelism)."""
    pipeline_gbps: float
    """Bandwidth between neighbouring stages (0 = no pipeline)."""
    data_gbps: float
    """Bandwidth the data-parallel collectives run at (0 = one data-parallel rank)."""
    head_share: float
    """Fraction of the slowest stage's time spent in the LM head (0 unless it is the last stage)."""


@dataclass(frozen=True, slots=True)
class Plan:
    layout: Layout
    stack: str
    cluster: ClusterSection
    memory: Memory
    timing: Timing
    fits: bool
    parameters: int
    global_batch: int
    tokens_per_step: int
    tflops_per_gpu: float
    """Hardware FLOP/s per GPU as the ledger counts it (recomputation included when enabled)."""
    mfu: float
    tokens_per_s: float
    notes: tuple[str, ...]
    """What limits this layout, in words (the slowest stage, a communication-bound dimension...)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layout"]["label"] = self.layout.label()
        d["layout"]["world"] = self.layout.world
        d["notes"] = list(self.notes)
        return d


# ------------------------------------------------------------------------------------------ inputs


def resolve_cluster(cfg: RunConfig, name: str = "") -> ClusterSection:
    """The recipe's [cluster], or the named preset when ``name`` is given (``--cluster``)."""
    if name:
        try:
            return ClusterSection(preset=name).resolved()
        except ConfigError as e:
            raise ConfigError(str(e).replace("cluster.preset", "--cluster")) from None
    return cfg.cluster.resolved()


def recipe_layout(cfg: RunConfig) -> Layout:
    """The layout the recipe asks for, on its Slurm allocation."""
    return Layout(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline, data=cfg.data_parallel(local=False),
                  zero=cfg.deepspeed.zero_stage, micro_batch=cfg.batch.micro_batch_size,
                  grad_accum=cfg.batch.grad_accum)


def ranks_per_node(cfg: RunConfig, cluster: ClusterSection) -> int:
    """Ranks the recipe runs on each node; more than the cluster's GPUs per node is an error."""
    rpn = max(1, cfg.world_size(local=False) // max(1, cfg.slurm.nodes))
    if rpn > cluster.gpus_per_node:
        raise ConfigError(f"the recipe runs {rpn} ranks per node (slurm.gpus_per_node or slurm.tasks_per_node) "
                          f"but the cluster has cluster.gpus_per_node = {cluster.gpus_per_node}: lower the "
                          "recipe's ranks per node or plan on another cluster (--cluster)")
    return rpn


def stages(cfg: RunConfig, pipeline: int, stack: Stack) -> list[Stage]:
    """Blocks per stage, as DeepSpeed's uniform partition splits them (extra blocks go first)."""
    n_layer = cfg.model.n_layer
    if stack.embed_slots and pipeline > 1:
        items = ["e"] + ["b"] * n_layer + ["e"]
        bounds = _partition_uniform(len(items), pipeline)
        out = []
        for i in range(pipeline):
            part = items[bounds[i]:bounds[i + 1]]
            out.append(Stage(blocks=part.count("b"), embedding=(i == 0), head=(i == pipeline - 1)))
        return out
    bounds = _partition_uniform(n_layer, pipeline)
    return [Stage(blocks=bounds[i + 1] - bounds[i], embedding=(i == 0), head=(i == pipeline - 1))
            for i in range(pipeline)]


def _partition_uniform(items: int, parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_uniform: boundaries of ``parts`` near-equal chunks."""
    if items <= parts:
        return [min(i, items) for i in range(parts + 1)]
    chunk, extra = divmod(items, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + chunk + (1 if i < extra else 0))
    return bounds


# ------------------------------------------------------------------------------------------- model


def plan(cfg: RunConfig, cluster: ClusterSection, layout: Layout | None = None, stack: str = "kit") -> Plan:
    """Memory, step time and throughput of ``layout`` (default: the recipe's) on ``cluster``."""
    lay = layout or recipe_layout(cfg)
    sw = _stack(cfg, stack, lay.zero)
    rpn = ranks_per_node(cfg, cluster)
    parts = stages(cfg, lay.pipeline, sw)
    params = [_stage_params(cfg, s, lay, sw) for s in parts]
    memory = _memory(cfg, cluster, lay, sw, parts, params)
    timing = _timing(cfg, cluster, lay, sw, parts, params, rpn)
    gb = lay.micro_batch * lay.grad_accum * lay.data
    vocab = cfg.data.vocab_size
    hw_flops = step_flops(cfg.model, vocab, gb)
    model_flops = step_flops(cfg.model, vocab, gb, recompute=False)
    per_gpu_s = timing.step * lay.world
    fits = memory.total <= cluster.hbm_gib * GIB
    return Plan(layout=lay, stack=sw.name, cluster=cluster, memory=memory, timing=timing, fits=fits,
                parameters=param_count(cfg.model, vocab), global_batch=gb, tokens_per_step=gb * cfg.model.seq_length,
                tflops_per_gpu=hw_flops / per_gpu_s / 1e12, mfu=model_flops / per_gpu_s / 1e12 / cluster.peak_tflops,
                tokens_per_s=gb * cfg.model.seq_length / timing.step,
                notes=_notes(lay, cluster, memory, timing, fits, sw))


def _stack(cfg: RunConfig, name: str, zero: int) -> Stack:
    """The stack's constants for this recipe at this ZeRO stage."""
    if name not in STACKS:
        raise ConfigError(f"unknown software stack {name!r}: one of {', '.join(STACKS)}")
    sw = STACKS[name]
    if name == "kit" and _grad_accum_fp32(cfg):
        sw = dataclasses.replace(sw, fp32_grad_accum=True)
    if zero > 1 or cfg.deepspeed.precision != "bf16":
        sw = dataclasses.replace(sw, fp32_grad_accum=False)  # BF16_Optimizer exists for ZeRO 0/1 with bf16
    return sw


def _grad_accum_fp32(cfg: RunConfig) -> bool:
    """deepspeed.extra sets data_types.grad_accum_dtype = "fp32": DeepSpeed's BF16_Optimizer."""
    data_types = cfg.deepspeed.extra.get("data_types", {})
    return (cfg.deepspeed.precision == "bf16" and isinstance(data_types, dict)
            and str(data_types.get("grad_accum_dtype", "")).lower() in ("fp32", "float32", "float"))


def _stage_params(cfg: RunConfig, stage: Stage, lay: Layout, sw: Stack) -> float:
    """Parameters one GPU of this stage holds (its tensor shard)."""
    h, t, vocab = cfg.model.hidden_size, lay.tensor, cfg.data.vocab_size
    block = (12 * h * h + 7 * h) / t + 6 * h  # q/k/v, dense, MLP split; their output biases and LNs replicated
    embed = vocab * h / (t if sw.vocab_parallel else 1)
    n = stage.blocks * block
    if stage.embedding:
        n += embed + 2 * h  # word embeddings and their LayerNorm
    if stage.head:
        n += 2 * h + (0 if stage.embedding else embed)  # final LN; the tied copy of the embeddings
    return n


def _memory(cfg: RunConfig, cluster: ClusterSection, lay: Layout, sw: Stack, parts: list[Stage],
            params: list[float]) -> Memory:
    m, half = cfg.model, cfg.deepspeed.precision == "bf16"
    width = 2 if half else 4
    b, s, h, t, z, d = lay.micro_batch, m.seq_length, m.hidden_size, lay.tensor, lay.zero, lay.data
    full_block = b * s * (sw.act * h + sw.act_tp * h / t + sw.act_score * m.n_head * s / t) * width / 2
    block_input = b * s * h * width
    best: Memory | None = None
    for i, (stage, n) in enumerate(zip(parts, params, strict=True)):
        in_flight = min(lay.pipeline - i, lay.grad_accum) if lay.pipeline > 1 else 1
        weights = n * width / (d if z >= 3 else 1)
        if z >= 3:
            weights += min(n, ZERO3_LIVE_PARAMS) * width
        grads = n * width / (d if z >= 2 else 1) + (n * 4 if sw.fp32_grad_accum and half else 0)
        optim = n * (12 if half else 8) / (d if z >= 1 else 1)
        recompute = in_flight * stage.blocks * block_input + (full_block if stage.blocks else 0)
        full = in_flight * stage.blocks * full_block
        acts = recompute if m.activation_checkpointing else full
        logits = b * s * cfg.data.vocab_size / (t if sw.vocab_parallel else 1) * LOGIT_BYTES if stage.head else 0
        reserve = RESERVE_BYTES + (ZERO2_BUCKET_BYTES if z >= 2 else 0)
        total = weights + grads + optim + acts + logits + reserve
        if best is None or total > best.total:
            best = Memory(weights=weights, gradients=grads, optimizer=optim, activations=acts,
                          activations_recompute=recompute, activations_full=full, logits=logits,
                          reserve=reserve, total=total, stage=i, in_flight=in_flight)
    assert best is not None  # a layout has at least one stage
    return best


def _bandwidth(cluster: ClusterSection, rpn: int, stride: int, size: int) -> float:
    """Bandwidth (bytes/s) of a ring over ``size`` ranks ``stride`` apart: NVLink when the group
    fits in one node, else the per-GPU inter-node bandwidth.

    Per GPU, not the node's whole network: every GPU of a node is in some group of the same
    dimension and they all communicate at once. This is what reproduces the measured ZeRO-3 scaling
    of Narayanan et al. 2021 (docs/plan.md), where a ring's one crossing per node would predict 8x more."""
    members_here = min(size, max(1, rpn // stride)) if stride < rpn else 1
    if size <= members_here:
        return cluster.nvlink_gbps * 1e9
    return min(cluster.nvlink_gbps, cluster.internode_gbps) * 1e9


def _timing(cfg: RunConfig, cluster: ClusterSection, lay: Layout, sw: Stack, parts: list[Stage],
            params: list[float], rpn: int) -> Timing:
    m, half = cfg.model, cfg.deepspeed.precision == "bf16"
    width = 2 if half else 4
    b, s, h, a, t, p, d, z = (lay.micro_batch, m.seq_length, m.hidden_size, m.n_head, lay.tensor,
                              lay.pipeline, lay.data, lay.zero)
    vocab, acc = cfg.data.vocab_size, lay.grad_accum
    c = 4 if m.activation_checkpointing else 3  # forward passes: forward, backward (2), recompute
    flops_s = cluster.peak_tflops * 1e12 * cluster.matmul_efficiency * (1 if half else FP32_MATMUL_FRACTION)
    hbm = cluster.hbm_gbps * 1e9
    head_t = t if sw.vocab_parallel else 1
    block_flops = c * (24 * b * s * h * h + 4 * b * s * s * h) / t
    block_bytes = c * b * s * (sw.traffic * h + sw.traffic_tp * h / t + sw.traffic_score * a * s / t) * width / 2
    head_flops = 3 * 2 * b * s * h * vocab / head_t  # the head is never recomputed
    head_bytes = b * s * vocab / head_t * LOGIT_TRAFFIC
    tp_bw = _bandwidth(cluster, rpn, 1, t)
    allreduce_tp = 2 * (t - 1) / t * b * s * h * width / tp_bw if t > 1 else 0.0
    per_stage = []
    for stage in parts:
        mm = (stage.blocks * block_flops + (head_flops if stage.head else 0)) / flops_s
        mem = (stage.blocks * block_bytes + (head_bytes if stage.head else 0)) / hbm
        n_ar = stage.blocks * 2 * (c - 1) + (int(stage.embedding) + int(stage.head) if sw.vocab_parallel else 0)
        per_stage.append((mm, mem, n_ar * allreduce_tp))
    slowest = max(range(p), key=lambda i: sum(per_stage[i]))
    mm, mem, tp = per_stage[slowest]
    p2p = 0.0
    pp_bw = _bandwidth(cluster, rpn, t, p)
    if p > 1:
        msg = b * s * h * width
        one = (msg / t if sw.partitioned_p2p else msg) / pp_bw
        if sw.partitioned_p2p and t > 1:
            one += (t - 1) / t * msg / tp_bw  # all-gather of the partitioned activations
        p2p = 2 * one  # activations forward, their gradients backward
    dp_bw = _bandwidth(cluster, rpn, t * p, d)
    n = max(params)
    busy = mm + mem + tp + p2p
    comm_mb, exposed_mb, comm_end, exposed_end = _data_parallel(cfg, lay, sw, n, dp_bw, busy * (c - 1) / c, busy)
    slot = busy + exposed_mb
    optimizer = n / (d if z >= 1 else 1) * ADAM_BYTES_PER_PARAM / hbm
    step = (acc + p - 1) * slot + exposed_end + optimizer
    head = head_flops / flops_s + head_bytes / hbm if parts[slowest].head else 0.0
    return Timing(compute=acc * (mm + mem), matmul=acc * mm, memory_bound=acc * mem, tensor=acc * tp,
                  pipeline=acc * p2p, bubble=(p - 1) * slot, data_exposed=acc * exposed_mb + exposed_end,
                  optimizer=optimizer, step=step, data_comm=acc * comm_mb + comm_end,
                  bubble_fraction=(p - 1) / (acc + p - 1), slowest_stage=slowest,
                  tensor_gbps=tp_bw / 1e9 if t > 1 else 0.0, pipeline_gbps=pp_bw / 1e9 if p > 1 else 0.0,
                  data_gbps=dp_bw / 1e9 if d > 1 else 0.0, head_share=head / busy if busy else 0.0)


def _data_parallel(cfg: RunConfig, lay: Layout, sw: Stack, n: float, bw: float, backward: float,
                   busy: float) -> tuple[float, float, float, float]:
    """Seconds of data-parallel transfers (per micro-batch, exposed per micro-batch, at the step's
    end, exposed at the end) for ``n`` parameters per GPU, ring formulas at ``bw`` bytes/s.

    Gradients are reduced once a step (ZeRO 0/1: all-reduce, or reduce-scatter when the optimizer
    state is sharded) or every micro-batch (ZeRO 2/3: reduce-scatter); updated parameters are
    all-gathered after the step (ZeRO 1/2) or fetched forward and backward (ZeRO 3). DeepSpeed
    overlaps them with the backward pass only with ``overlap_comm``, its default under ZeRO-3 alone
    (``deepspeed.extra.zero_optimization.overlap_comm`` sets it); the pipeline engine never does."""
    d, z = lay.data, lay.zero
    if d <= 1:
        return 0.0, 0.0, 0.0, 0.0
    width = 2 if cfg.deepspeed.precision == "bf16" else 4
    fp32_acc = sw.fp32_grad_accum and width == 2
    ring = (d - 1) / d * n / bw  # seconds of one reduce-scatter or all-gather of n elements of one byte
    zero_cfg = cfg.deepspeed.extra.get("zero_optimization", {})
    asked = zero_cfg.get("overlap_comm") if isinstance(zero_cfg, dict) else None
    overlap = lay.pipeline == 1 and (bool(asked) if asked is not None else z == 3)
    gather = ring * width
    # all-reduce of the whole gradient (ZeRO-0, BF16_Optimizer), else reduce-scatter to each shard
    all_reduce = z == 0 or (z == 1 and fp32_acc)
    reduce = 2 * ring * (4 if fp32_acc else width) if all_reduce else ring * width
    if z >= 2:
        comm_mb = reduce + (2 * gather if z == 3 else 0.0)
        hide = (busy if z == 3 else backward) if overlap else 0.0
        end = gather if z == 2 else 0.0
        return comm_mb, max(0.0, comm_mb - hide), end, end
    end = reduce + (gather if z == 1 else 0.0)
    return 0.0, 0.0, end, end - min(reduce, backward if overlap else 0.0)


def _notes(lay: Layout, cluster: ClusterSection, memory: Memory, timing: Timing, fits: bool,
           sw: Stack) -> tuple[str, ...]:
    """What limits the layout, worst first, in the operator's words."""
    out = []
    if not fits:
        out.append(f"does not fit: {memory.total / GIB:.1f} GiB on stage {memory.stage} > "
                   f"{cluster.hbm_gib:g} GiB of HBM")
    busy = timing.compute + timing.tensor + timing.pipeline
    if timing.data_comm > busy:
        out.append(f"communication-bound: ZeRO-{lay.zero}'s data-parallel transfers take {timing.data_comm:.1f} s a "
                   f"step at {timing.data_gbps:g} GB/s, compute {timing.compute:.1f} s")
    if lay.pipeline > 1 and timing.head_share > 0.2:
        why = "replicated over the tensor group" if not sw.vocab_parallel and lay.tensor > 1 else "on the last stage"
        out.append(f"the last stage is the slowest: the LM head ({why}) is {timing.head_share:.0%} of its time; "
                   "fewer blocks on that stage or a vocabulary-parallel head would balance the pipeline")
    if timing.bubble_fraction > 0.15:
        out.append(f"pipeline bubble {timing.bubble_fraction:.0%}: more micro-batches per step (batch.grad_accum) or "
                   "fewer stages shrink it")
    if timing.step and timing.tensor / timing.step > 0.15:
        out.append(f"tensor all-reduces take {timing.tensor / timing.step:.0%} of the step at "
                   f"{timing.tensor_gbps:g} GB/s")
    return tuple(out)


# ----------------------------------------------------------------------------------------- compare


def candidate_layouts(cfg: RunConfig, cluster: ClusterSection) -> tuple[list[Layout], dict[str, int]]:
    """Every layout of the recipe's world that keeps its global batch and could run, and how many
    tensor x pipeline splits were left out, by reason.

    Tensor degrees divide the heads and stay inside a node; stages are at most the blocks; the
    micro-batch is the recipe's, or the largest that divides the per-replica batch; ZeRO 2/3 only
    without a pipeline (DeepSpeed refuses them with one) and ZeRO-3 only without tensor
    parallelism (AutoTP trains with ZeRO 0-2); bf16 needs ZeRO >= 1."""
    world, rpn = cfg.world_size(local=False), ranks_per_node(cfg, cluster)
    m = cfg.model
    batch = cfg.batch.micro_batch_size * cfg.batch.grad_accum * cfg.data_parallel(local=False)
    lowest = 1 if cfg.deepspeed.precision == "bf16" else 0
    out: list[Layout] = []
    skipped: dict[str, int] = {}
    for t in _divisors(m.n_head):
        if t > rpn or world % t:
            continue
        for p in _divisors(world // t):
            d = world // (t * p)
            if p > m.n_layer:
                continue
            if batch % d:
                why = f"the global batch ({batch}) does not divide by their data-parallel size"
                skipped[why] = skipped.get(why, 0) + 1
                continue
            micro = max(x for x in _divisors(batch // d) if x <= cfg.batch.micro_batch_size)
            accum = batch // (d * micro)
            if p > 1 and accum < p:
                why = "fewer micro-batches per step than pipeline stages"
                skipped[why] = skipped.get(why, 0) + 1
                continue
            top = 1 if p > 1 else (3 if t == 1 else 2)
            out.extend(Layout(tensor=t, pipeline=p, data=d, zero=z, micro_batch=micro, grad_accum=accum)
                       for z in range(lowest, top + 1))
    own = recipe_layout(cfg)
    if own not in out:
        out.append(own)
    return out, skipped


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def compare(cfg: RunConfig, cluster: ClusterSection, stack: str = "kit") -> tuple[list[Plan], dict[str, int]]:
    """Plans of every candidate layout, fastest first (all keep the global batch, so step time ranks
    them), and the splits left out by reason."""
    layouts, skipped = candidate_layouts(cfg, cluster)
    plans = [plan(cfg, cluster, lay, stack) for lay in layouts]
    return sorted(plans, key=lambda pl: (pl.timing.step, pl.memory.total)), skipped
