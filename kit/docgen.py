"""Generate docs/recipes.md from the config dataclasses: every dotted key, type, default and docstring.

Field docstrings are not kept at run time, so they are read from kit/config.py's source with ast.
Regenerate with: ``python -m kit.docgen > docs/recipes.md`` (a test checks every key is documented).
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from kit import config

HEADER = """# Recipes

A run is one TOML file (see `jobs/`). Every key below can be overridden on any command that takes a
recipe with `--set dotted.key=value` (the value is a TOML literal: `--set trainer.max_steps=200`,
`--set slurm.exclude='["node12"]'`). `kit validate RECIPE` prints the resolved recipe; an error names
the dotted key, what was expected and what was found, and suggests the nearest valid key.

The resolved recipe is frozen into the run directory (`run.toml`). A later segment or a resubmission
with a recipe that changes the arithmetic (model, data, optim, batch, deepspeed, run.seed) is refused.

Generated from kit/config.py by `python -m kit.docgen > docs/recipes.md`.
"""


def field_docs() -> dict[str, dict[str, str]]:
    tree = ast.parse(Path(config.__file__).read_text())
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and i + 1 < len(body):
                nxt = body[i + 1]
                value = nxt.value if isinstance(nxt, ast.Expr) else None
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    docs[stmt.target.id] = " ".join(value.value.split())
        out[node.name] = docs
    return out


def render() -> str:
    docs = field_docs()
    lines = [HEADER]
    hints = typing.get_type_hints(config.RunConfig)
    for section in dataclasses.fields(config.RunConfig):
        cls = hints[section.name]
        lines.append(f"## [{section.name}]\n")
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines.append(" ".join(cls.__doc__.split()) + "\n")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        ch = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            tp = getattr(ch[f.name], "__name__", str(ch[f.name]))
            lines.append(f"| `{section.name}.{f.name}` | {tp} | `{default!r}` | {docs[cls.__name__].get(f.name, '')} |")
        if section.name == "data":
            src = config.SourceSection
            sh = typing.get_type_hints(src)
            lines.append("\nEach `[[data.sources]]` table:\n")
            lines.append("| key | type | default | meaning |")
            lines.append("|---|---|---|---|")
            for f in dataclasses.fields(src):
                default = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
                tp = getattr(sh[f.name], "__name__", str(sh[f.name]))
                doc = docs["SourceSection"].get(f.name, "")
                lines.append(f"| `data.sources[].{f.name}` | {tp} | `{default!r}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
