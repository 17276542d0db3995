"""One DeepSpeed process (a subprocess of tests/test_asyncsave.py: ZeRO-3 patches torch process-wide).

Trains two steps, then saves the same state twice: with DeepSpeed's own ``save_checkpoint`` into
``OUT/ds`` and through kit's capture (kit.snapshot) into ``OUT/kit``, training one more step between
the capture and the write (the copy must not move). Then loads the kit-written checkpoint back with
``engine.load_checkpoint`` and compares the engine's state with the state at the save. Prints one JSON
line: the files of each, their sha256, and whether the load restored the state bit for bit.

    python tests/asyncsave_worker.py ZERO PRECISION OUT
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    zero, precision, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    os.environ["DS_ACCELERATOR"] = "cpu"  # a bare single process: kit.dist picks rank 0 of 1, a free port
    from kit import dist
    from kit.config import load_recipe
    from kit.engine import build_engine
    from kit.snapshot import HostBuffers, capture, snap_zipfile, write_file

    env = dist.from_environ()
    dist.init(env)
    import torch

    root = Path(__file__).resolve().parent.parent
    cfg = load_recipe(root / "jobs" / "tiny.toml", [
        f"deepspeed.zero_stage={zero}", f'deepspeed.precision="{precision}"', "model.seq_length=32",
        "batch.micro_batch_size=2", "batch.grad_accum=1", "data.vocab_size=512"])
    engine = build_engine(cfg, 1).engine
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()

    def digest() -> str:
        """The fp32 master partitions and Adam moments (torch's AdamW inside ZeRO), and the module's
        own parameters below ZeRO-3 (at ZeRO-3 they are placeholders between steps)."""
        h = hashlib.sha256()
        zo = engine.optimizer
        masters = zo.fp32_partitioned_groups_flat if zero == 3 else zo.single_partition_of_fp32_groups
        for p in masters:
            h.update(p.detach().float().contiguous().numpy().tobytes())
            for name in ("exp_avg", "exp_avg_sq", "step"):
                h.update(zo.optimizer.state[p][name].float().contiguous().numpy().tobytes())
        for k, v in sorted(engine.module.state_dict().items()) if zero < 3 else []:
            h.update(k.encode() + v.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()

    step()
    step()
    at_save = digest()
    engine.save_checkpoint(str(out / "ds"), tag="t", client_state={"kit_step": 2}, save_latest=False)
    snap = capture(engine, str(out / "kit"), "t", {"kit_step": 2}, HostBuffers())
    step()  # training goes on while the files are (not yet) written
    moved = digest() != at_save
    for path, state in snap.files:
        write_file(path, state, snap_zipfile(engine))
    engine.load_checkpoint(str(out / "kit"), tag="t")
    files = {side: {str(p.relative_to(out / side / "t")): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted((out / side / "t").rglob("*")) if p.is_file()} for side in ("ds", "kit")}
    print("RESULT " + json.dumps({"files": files, "moved": moved, "restored": digest() == at_save,
                                  "copied": snap.nbytes}), flush=True)


if __name__ == "__main__":
    main()
    os._exit(0)  # skip torch.distributed's teardown (kit.segment.exit_now says why)
