"""Tensor x pipeline x data parallelism (docs/parallel.md).

- :mod:`kit.parallel.layout`: rank <-> (tensor, pipeline, data) coordinates (pure; import freely);
- :mod:`kit.parallel.mesh`: DeepSpeed's process groups for a layout;
- :mod:`kit.parallel.tensor`: AutoTP sharding and the per-rank alibi;
- :mod:`kit.parallel.pipe`: the BLOOM pipeline of transformers' blocks;
- :mod:`kit.parallel.model`: the model of a layout, ready for ``deepspeed.initialize``.

Only the layout is imported here: importing kit must not import DeepSpeed.
"""

from kit.parallel.layout import Coords, Layout, coords, layout_of

__all__ = ["Coords", "Layout", "coords", "layout_of"]
