"""Recipes: typed loading, dotted-key errors with suggestions, overrides, shipped recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kit.config import RunConfig, apply_override, describe_keys, from_dict, load_recipe
from kit.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "jobs").glob("*.toml"))


def test_shipped_recipes_validate() -> None:
    names = {p.stem for p in RECIPES}
    assert {"tiny", "bloom-560m", "bloom-1b7", "bloom-176b"} <= names
    for p in RECIPES:
        cfg = load_recipe(p)
        assert isinstance(cfg, RunConfig)


def test_bloom_176b_has_the_published_shape() -> None:
    cfg = load_recipe(ROOT / "jobs" / "bloom-176b.toml")
    m = cfg.model
    assert (m.hidden_size, m.n_layer, m.n_head, m.seq_length) == (14336, 70, 112, 2048)
    assert cfg.data.vocab_size == 250880
    from kit.model import param_count

    assert 175e9 < param_count(m, cfg.data.vocab_size) < 178e9  # BLOOM: 176,247,271,424


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_stepz=3", "unknown key trainer.max_stepz; did you mean trainer.max_steps?"),
        ("modle.n_layer=3", "unknown key modle; did you mean model?"),
        ("model.n_head=5", "model.hidden_size (64) must be a multiple of model.n_head (5)"),
        ("trainer.max_steps='ten'", "trainer.max_steps must be an integer, found str 'ten'"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage must be 0, 1, 2 or 3, got 4"),
        ("optim.warmup_steps=500", "optim.warmup_steps (500) must be less than trainer.max_steps"),
        ("spikes.policy='panic'", "spikes.policy must be"),
        ("trainer.deadline='tomorrow'", "trainer.deadline must be an ISO 8601 time"),
        ("run.name='a b'", "run.name must be a plain folder name"),
        ("batch", "expected dotted.key=value"),
    ],
)
def test_errors_name_the_dotted_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_recipe(ROOT / "jobs" / "tiny.toml", [override])
    assert message in str(e.value)


def test_source_errors_name_the_source() -> None:
    raw = {"data": {"sources": [{"name": "web", "path": "/x", "format": "csv"}]}}
    with pytest.raises(ConfigError, match=r"data.sources\[web\].format must be one of"):
        from_dict(raw)
    with pytest.raises(ConfigError, match=r"data.sources\[web\].path is required"):
        from_dict({"data": {"sources": [{"name": "web"}]}})


def test_override_parses_toml_values_and_strings() -> None:
    raw: dict = {}
    apply_override(raw, "slurm.exclude=['n1','n2']")
    apply_override(raw, "run.name=plain-string")
    apply_override(raw, "optim.lr=3e-4")
    assert raw == {"slurm": {"exclude": ["n1", "n2"]}, "run": {"name": "plain-string"}, "optim": {"lr": 3e-4}}


def test_round_trip_through_frozen_toml(tmp_path: Path) -> None:
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml")
    p = tmp_path / "run.toml"
    p.write_text(cfg.to_toml())
    again = load_recipe(p)
    assert again.to_dict() == cfg.to_dict()
    assert again.digest() == cfg.digest()


def test_every_field_has_a_docstring_in_docs() -> None:
    # docs/recipes.md documents every dotted key (regenerate: python -m kit.docgen > docs/recipes.md)
    text = (ROOT / "docs" / "recipes.md").read_text()
    missing = [k for k in describe_keys() if f"`{k}`" not in text]
    assert not missing, f"undocumented keys: {missing}"


def test_validate_cli_one_line_error_no_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "validate", "tiny.toml", "--set", "optim.lr=-1"],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip() == "kit: error: optim.lr must be greater than 0, got -1.0"
    assert "Traceback" not in out.stderr


def test_missing_recipe_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("/nonexistent/recipe.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[run\nname=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(p)
