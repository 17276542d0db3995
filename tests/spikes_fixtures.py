"""A poisoned run for the spike tests: two easy "languages" and a source of repeated junk.

The natural sources are template sentences (en, fr), so a tiny model learns them within 20 steps;
the junk source holds 40 documents of one 8-character string of control characters repeated 60
times (repetition and encoding anomalies at once). With explicit weights the mixture's order is
a pure function of the seed (not of the text), and seed 3150 puts 3 junk samples of 8 into step
26 and none into the 14 steps around it: a real, data-made loss spike at a known step.
:func:`junk_steps` recomputes that from the sampler, so a change there fails loudly.
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 3150
SPIKE_STEP = 26
GLOBAL_BATCH = 8  # micro 2 x accumulation 2 x 2 ranks


def write_sources(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    words = {
        "en": (["the cat", "a dog", "my friend", "the teacher", "our neighbour"], ["sees", "likes", "finds", "paints"],
               ["the house", "a red ball", "the garden", "an old book"]),
        "fr": (["le chat", "un chien", "mon ami", "la maîtresse", "notre voisin"], ["voit", "aime", "trouve", "peint"],
               ["la maison", "une balle rouge", "le jardin", "un vieux livre"]),
    }
    for seed, (lang, (s, v, o)) in enumerate(words.items(), start=1):
        r = random.Random(seed)
        docs = [" ".join(f"{r.choice(s)} {r.choice(v)} {r.choice(o)}." for _ in range(r.randrange(5, 40)))
                for _ in range(300)]
        (d / f"{lang}.txt").write_text("\n\n".join(docs))
    r = random.Random(0)
    ctrl = [chr(c) for c in [*range(1, 9), *range(14, 32)]]
    (d / "junk.txt").write_text("\n\n".join("".join(r.choice(ctrl) for _ in range(8)) * 60 for _ in range(40)))
    return d


def recipe(tmp: Path, name: str, policy: str = "log") -> Path:
    """A recipe file for the poisoned run (runs under tmp/runs, sources under tmp/src)."""
    src = write_sources(tmp / "src")
    lines = [
        "[run]", f'name = "{name}"', f'runs_dir = "{tmp / "runs"}"', f"seed = {SEED}",
        "[model]", "hidden_size = 64", "n_layer = 2", "n_head = 4", "seq_length = 32",
        "[data]", "vocab_size = 512",
    ]
    for lang, w in (("en", 0.49), ("fr", 0.49), ("junk", 0.02)):
        lines += ["[[data.sources]]", f'name = "{lang}"', f'path = "{src / (lang + ".txt")}"',
                  f'language = "{"und" if lang == "junk" else lang}"', f"weight = {w}"]
    lines += ["[optim]", "lr = 3e-3", "min_lr = 3e-4", "warmup_steps = 5",
              "[batch]", "micro_batch_size = 2", "grad_accum = 2",
              "[deepspeed]", "zero_stage = 2",
              "[checkpoint]", "interval_steps = 5", "keep_last = 3",
              "[trainer]", "max_steps = 34", "nproc = 2",
              "[spikes]", f'policy = "{policy}"', "warmup_steps = 10", "window = 20", "threshold = 6.0",
              "rollback_steps = 5", "skip_batches = 3"]
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def junk_steps(data_dir: Path, steps: int = 40) -> dict[int, int]:
    """Step -> number of junk samples in it, from the run's own sampler."""
    from kit.data import MixtureDataset

    ds = MixtureDataset(data_dir, SEED, 32)
    out = {}
    for step in range(1, steps + 1):
        n = sum(ds.ref(i).source == "junk" for i in range((step - 1) * GLOBAL_BATCH, step * GLOBAL_BATCH))
        if n:
            out[step] = n
    return out
