"""Generate the reference parts of the operator guide from the code that defines them.

- docs/recipes.md from the config dataclasses: every dotted key, type, default and docstring. Field
  docstrings are not kept at run time, so they are read from kit/config.py's source with ast.
  Regenerate with ``python -m kit.docgen > docs/recipes.md`` (a test checks every key is documented).
- docs/run-directory.md's ledger tables from kit/ledger/schema.py (event kinds and their fields, the
  step metrics, the segment-end reasons), between its ``<!-- ledger:begin -->`` and
  ``<!-- ledger:end -->`` markers: ``python -m kit.docgen --ledger`` rewrites them in place (a test
  checks they are current).
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


BEGIN, END = "<!-- ledger:begin -->", "<!-- ledger:end -->"


def render_ledger() -> str:
    """The ledger's tables (generated from kit.ledger.schema)."""
    from kit.ledger import schema as sc

    def fields(spec: sc.EventSpec) -> str:
        def one(f: sc.Field) -> str:
            extra = ", NaN allowed" if f.nonfinite else ""
            return f"{'**' if f.required else ''}{f.name}{'**' if f.required else ''} ({f.type}{extra}): {f.doc}"

        return "<br>".join(one(f) for f in spec.fields) if spec.kind != "step" else (
            "**step** (int), **loss** (float): and the step metrics below")

    out = [BEGIN, "",
           "Generated from kit/ledger/schema.py by `python -m kit.docgen --ledger`. Every line carries the "
           "envelope " + ", ".join(f"`{f.name}`" for f in sc.ENVELOPE) + f" (schema version {sc.SCHEMA_VERSION}); "
           "**bold** fields are required (an event without one is dropped by readers and counted), the others "
           "optional (absent, or of their type). Bulk kinds are written at a high rate and indexed by columns.",
           "", "| kind | written by | what | fields |", "|---|---|---|---|"]
    for spec in sc.SPECS:
        bulk = " (bulk)" if spec.bulk else ""
        out.append(f"| `{spec.kind}`{bulk} | {spec.writer} | {spec.doc} | {fields(spec)} |")
    out += ["", "**Step metrics** (fields of `step`; the monitor's curves, TensorBoard's tags and the index's "
            "columns come from this table):", "", "| metric | unit | type | TensorBoard | over a bucket | meaning |",
            "|---|---|---|---|---|---|"]
    for m in sc.STEP_METRICS:
        kind = m.type + (f" ({', '.join(m.choices)})" if m.choices else "") + (", NaN allowed" if m.nonfinite else "")
        out.append(f"| `{m.name}` | {m.unit or '-'} | {kind} | {m.tb_tag or '-'} | {m.agg} | {m.doc} |")
    out += ["", "**Segment-end reasons** (`segment_ended.reason`, the segment's exit status, and what the chain "
            "does):", "", "| reason | exit | outcome | meaning |", "|---|---|---|---|"]
    for r in sc.END_REASONS:
        out.append(f"| `{r.name}` | {r.exit_code} | {r.outcome} | {r.doc} |")
    out += ["", END]
    return "\n".join(out)


def update_ledger_doc(path: Path) -> bool:
    """Rewrite the generated part of ``path``; True when it changed."""
    text = path.read_text()
    a, b = text.index(BEGIN), text.index(END) + len(END)
    new = text[:a] + render_ledger() + text[b:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--ledger"]:
        doc = Path(__file__).resolve().parent.parent / "docs" / "run-directory.md"
        print(f"{doc}: {'updated' if update_ledger_doc(doc) else 'already current'}")
    else:
        print(render())
