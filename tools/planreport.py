"""Text and JSON for ``kit plan``: one plan in full, or layouts side by side (``--compare``).

Kept apart from kit/perfmodel.py (beside the verb, in tools/) so that the model stays arithmetic
and the wording can change without touching it. Every figure printed here is a field of
:class:`kit.perfmodel.Plan`; the JSON carries all of them.
"""

from __future__ import annotations

from typing import Any

from kit.config import ClusterSection, RunConfig
from kit.perfmodel import GIB, Plan, recipe_layout

_ZERO_WORDS = {0: "replicated", 1: "optimizer state sharded", 2: "gradients + optimizer state sharded",
               3: "everything sharded"}


def _dur(seconds: float) -> str:
    """A duration with the unit that keeps 3-4 significant digits (a tiny CPU recipe steps in µs)."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:8.2f} s "
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds * 1e6:8.2f} µs"


def _count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3f} {unit}"
    return f"{n:.0f}"


def cluster_line(c: ClusterSection) -> str:
    name = c.preset or "custom cluster"
    return (f"{name}: {c.peak_tflops:g} TFLOP/s bf16, {c.hbm_gib:g} GiB HBM at {c.hbm_gbps:g} GB/s, "
            f"NVLink {c.nvlink_gbps:g} GB/s, inter-node {c.internode_gbps:g} GB/s per GPU, "
            f"{c.gpus_per_node} GPUs a node; matmuls at {c.matmul_efficiency:.0%} of peak")


def _link(gbps: float, cluster: ClusterSection) -> str:
    where = "NVLink" if gbps >= cluster.nvlink_gbps else "inter-node"
    return f"{where}, {gbps:g} GB/s"


def render_plan(cfg: RunConfig, pl: Plan, recipe: str, training: dict[str, float]) -> str:
    """The full plan of one layout: memory, time per step and where it goes, throughput, duration."""
    lay, m = pl.layout, cfg.model
    recompute = "activation checkpointing" if m.activation_checkpointing else "no activation checkpointing"
    lines = [
        f"kit plan {recipe}: run {cfg.run.name}, stack {pl.stack}",
        f"  cluster      {cluster_line(pl.cluster)}",
        f"  model        {_count(pl.parameters)} parameters: {m.n_layer} layers x {m.hidden_size}, "
        f"{m.n_head} heads, seq {m.seq_length}, vocab {cfg.data.vocab_size}",
        f"  layout       TP{lay.tensor} x PP{lay.pipeline} x DP{lay.data} = {lay.world} GPUs on "
        f"{cfg.slurm.nodes} node(s), ZeRO-{lay.zero}, {cfg.deepspeed.precision}, {recompute}",
        f"  batch        micro {lay.micro_batch} x accum {lay.grad_accum} x DP{lay.data} = {pl.global_batch} "
        f"samples = {pl.tokens_per_step:,} tokens a step",
        *_memory_lines(pl),
        *_time_lines(pl),
        f"  throughput   {pl.tflops_per_gpu:.1f} TFLOP/s per GPU (counted as the ledger counts), "
        f"MFU {pl.mfu:.1%}, {pl.tokens_per_s:,.0f} tokens/s",
        f"  training     {cfg.trainer.max_steps:,} steps = {training['total_tokens'] / 1e9:,.1f} B tokens: "
        f"{training['days']:.1f} days, ~{training['segments']:.0f} allocations of {cfg.slurm.time_limit}",
        f"  checkpoint   {training['checkpoint_bytes'] / GIB:,.1f} GiB (weights + fp32 optimizer state)",
    ]
    lines += [f"  note: {n}" for n in pl.notes]
    return "\n".join(lines)


def _memory_lines(pl: Plan) -> list[str]:
    mem, lay = pl.memory, pl.layout
    flight = f"{mem.in_flight} micro-batch{'es' if mem.in_flight > 1 else ''} in flight"
    return [
        f"  memory/GPU   stage {mem.stage} of {lay.pipeline} ({flight}), "
        f"ZeRO-{lay.zero}: {_ZERO_WORDS.get(lay.zero, '')}",
        f"    weights      {mem.weights / GIB:8.1f} GiB",
        f"    gradients    {mem.gradients / GIB:8.1f} GiB",
        f"    optimizer    {mem.optimizer / GIB:8.1f} GiB",
        f"    activations  {mem.activations / GIB:8.1f} GiB   (with recompute "
        f"{mem.activations_recompute / GIB:.1f}, without {mem.activations_full / GIB:.1f})",
        f"    logits       {mem.logits / GIB:8.1f} GiB",
        f"    reserve      {mem.reserve / GIB:8.1f} GiB   (CUDA context, NCCL and DeepSpeed buffers)",
        f"    total        {mem.total / GIB:8.1f} GiB of {pl.cluster.hbm_gib:g}: "
        f"{'fits' if pl.fits else 'DOES NOT FIT'}",
    ]


def _time_lines(pl: Plan) -> list[str]:
    tm, lay, c = pl.timing, pl.layout, pl.cluster
    lines = [
        f"  time/step    {_dur(tm.step)}   (slowest stage: {tm.slowest_stage})",
        f"    compute      {_dur(tm.compute)}   matmuls {_dur(tm.matmul).strip()} + memory-bound ops "
        f"{_dur(tm.memory_bound).strip()}",
    ]
    if lay.tensor > 1:
        lines.append(f"    tensor       {_dur(tm.tensor)}   ring all-reduces inside the blocks "
                     f"({_link(tm.tensor_gbps, c)})")
    if lay.pipeline > 1:
        lines.append(f"    pipeline     {_dur(tm.pipeline)}   activations and gradients between stages "
                     f"({_link(tm.pipeline_gbps, c)})")
        lines.append(f"    bubble       {_dur(tm.bubble)}   1F1B: (p-1)/(m+p-1) = {lay.pipeline - 1}/"
                     f"{lay.grad_accum + lay.pipeline - 1} = {tm.bubble_fraction:.1%}")
    if lay.data > 1:
        hidden = tm.data_comm - tm.data_exposed
        lines.append(f"    data         {_dur(tm.data_exposed)}   ZeRO-{lay.zero} collectives "
                     f"({_link(tm.data_gbps, c)}); {_dur(tm.data_comm).strip()} of transfers, "
                     f"{_dur(hidden).strip()} hidden behind compute")
    lines.append(f"    optimizer    {_dur(tm.optimizer)}   Adam update of the local shard (memory-bound)")
    return lines


_HEADER = ("      TP  PP   DP ZeRO  micro x accum  mem GiB fits  step s  TFLOP/s   MFU  bubble  tensor"
           "    pipe    data")


def _g(x: float) -> str:
    """Seconds in 7 columns, 3 significant digits (tiny recipes' transfers are microseconds)."""
    return f"{x:7.3g}" if x == 0 or x >= 0.01 else f"{x:7.1e}"


def _row(pl: Plan, own: bool) -> str:
    lay, tm = pl.layout, pl.timing
    return (f"   {'*' if own else ' '} {lay.tensor:3d} {lay.pipeline:3d} {lay.data:4d} {lay.zero:4d} "
            f"{lay.micro_batch:6d} x {lay.grad_accum:5d} {pl.memory.total / GIB:8.1f} {'yes' if pl.fits else ' no'} "
            f"{_g(tm.step)} {pl.tflops_per_gpu:8.1f} {pl.mfu:6.1%} {tm.bubble_fraction:6.1%} "
            f"{_g(tm.tensor)} {_g(tm.pipeline)} {_g(tm.data_exposed)}")


def render_compare(cfg: RunConfig, plans: list[Plan], skipped: dict[str, int], recipe: str, top: int) -> str:
    """Layouts side by side, fastest first: the ``top`` that fit, the recipe's own, and a verdict."""
    own = recipe_layout(cfg)
    fitting = [pl for pl in plans if pl.fits]
    shown = fitting[:top] if top > 0 else list(plans)
    mine = next(pl for pl in plans if pl.layout == own)
    if mine not in shown:
        shown.append(mine)
    c = plans[0].cluster
    lines = [f"kit plan {recipe} --compare: {own.world} GPUs, global batch {mine.global_batch}, stack {mine.stack}",
             f"  cluster {cluster_line(c)}", _HEADER]
    lines += [_row(pl, pl.layout == own) for pl in shown]
    more = f"; {len(shown)} shown (--top 0: all)" if top > 0 else ""
    lines.append(f"  {len(plans)} layouts, {len(fitting)} fit in {c.hbm_gib:g} GiB; * = the recipe's "
                 f"({'fits' if mine.fits else 'does not fit'}){more}")
    lines += [f"  {count} more tensor x pipeline split(s) left out: {why}" for why, count in skipped.items()]
    lines += _verdict(fitting, mine)
    return "\n".join(lines)


def _verdict(fitting: list[Plan], mine: Plan) -> list[str]:
    if not fitting:
        return ["  no layout fits: more GPUs, a smaller micro-batch, or activation checkpointing"]
    best = fitting[0]
    out = [f"  fastest that fits: {best.layout.label()}: {best.timing.step:.3g} s/step, "
           f"{best.tflops_per_gpu:.1f} TFLOP/s per GPU"]
    if best.layout.zero == 3 and any(pl.layout.zero < 3 for pl in fitting):
        out.append("  (ZeRO-3 ranks first because its transfers hide behind compute; the model counts bytes, "
                   "not ZeRO-3's per-parameter gather hooks, which cost time on a real run)")
    if best is mine:
        out.append("  the recipe's layout is the fastest that fits")
    elif mine.fits:
        out.append(f"  the recipe's layout ranks {fitting.index(mine) + 1} of {len(fitting)}, "
                   f"{mine.timing.step / best.timing.step - 1:+.0%} step time")
    else:
        out.append("  the recipe's layout does not fit")
    return out


def compare_json(cfg: RunConfig, plans: list[Plan], skipped: dict[str, int]) -> dict[str, Any]:
    own = recipe_layout(cfg)
    fitting = [pl for pl in plans if pl.fits]
    return {"recipe_layout": own.label(), "fastest_fitting": fitting[0].layout.label() if fitting else None,
            "skipped": skipped, "layouts": [dict(pl.to_dict(), recipe=pl.layout == own) for pl in plans]}
