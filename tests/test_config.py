"""Recipes: typed loading, dotted-key errors with suggestions, overrides, shipped recipes."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ----------------------------------------------------------------------- issue 14: every key checked


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("slurm.nodes=0", "slurm.nodes must be at least 1, got 0"),
        ("slurm.nodes=-1", "slurm.nodes must be at least 1, got -1"),
        ("slurm.mem_gb=-4", "slurm.mem_gb must be >= 0 (0 = Slurm's default), got -4.0"),
        ("slurm.time_limit='abc'", "slurm.time_limit must be a Slurm time limit"),
        ("slurm.time_limit='0'", "slurm.time_limit must be longer than 0"),
        ("slurm.time_limit='10:75'", "slurm.time_limit must be a Slurm time limit"),
        ("slurm.gpus_per_node=-1", "slurm.gpus_per_node must be >= 0 (0 = CPU tasks)"),
        ("slurm.tasks_per_node=-2", "slurm.tasks_per_node must be >= 0 (0 = trainer.nproc)"),
        ("slurm.cpus_per_task=0", "slurm.cpus_per_task must be at least 1"),
        ("slurm.exclude=['n1,n2']", "slurm.exclude[0] must be one name without spaces or commas"),
        ("slurm.partition='a b'", "slurm.partition must not contain spaces"),
        ("slurm.sbatch_args.time='1:00:00'", "slurm.sbatch_args.time is set by the recipe: use slurm.time_limit"),
        ("slurm.sbatch_args.ntasks-per-node=4", "slurm.sbatch_args.ntasks-per-node is set by the recipe"),
        ("trainer.stop_after_steps=-3", "trainer.stop_after_steps must be >= 0 (0 = off), got -3"),
        ("trainer.threads=0", "trainer.threads must be at least 1"),
        ("trainer.stop_margin_s=-1", "trainer.stop_margin_s must be >= 0"),
        ("optim.eps=0", "optim.eps must be greater than 0"),
        ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
        ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
        ("model.hidden_size=99999999999999999999999", "model.hidden_size is out of range (more than 64 bits)"),
        ("model.layer_norm_epsilon=0", "model.layer_norm_epsilon must be greater than 0"),
        ("run.seed=-1", "run.seed must be >= 0"),
        ("health.host_mem_max_pct=150", "health.host_mem_max_pct must be in (0, 100]"),
        ("deepspeed.extra.when=[1979-05-27]", "deepspeed.extra.when[0] must be a string, number, boolean, list or"),
        ("container.binds=[':/x']", "container.binds[0] must be"),
    ],
)
def test_every_section_is_checked_with_the_key_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_recipe(ROOT / "jobs" / "tiny.toml", [override])
    assert message in str(e.value)


@pytest.mark.parametrize("dotted", sorted(__import__("kit.validation").validation.DEEPSPEED_MODELLED))
def test_deepspeed_extra_cannot_override_what_the_recipe_models(dotted: str) -> None:
    """extra zero_optimization.stage = 3 used to run ZeRO-3 while the recipe, manifest and converter said 2."""
    from kit.validation import DEEPSPEED_MODELLED

    with pytest.raises(ConfigError) as e:
        load_recipe(ROOT / "jobs" / "tiny.toml", [f"deepspeed.extra.{dotted}=1"])
    assert f"deepspeed.extra.{dotted} is set by the recipe: use {DEEPSPEED_MODELLED[dotted]} instead" in str(e.value)
    with pytest.raises(ConfigError, match=r"is set by the recipe"):  # a key under a modelled table too
        load_recipe(ROOT / "jobs" / "tiny.toml", [f"deepspeed.extra.{dotted}.x.y=1"])


def test_deepspeed_extra_passes_what_the_recipe_does_not_model() -> None:
    from kit.engine import deepspeed_config

    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", ["deepspeed.extra.zero_optimization.offload_optimizer.device='cpu'",
                                                    "deepspeed.extra.communication_data_type='fp32'"])
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["communication_data_type"] == "fp32"


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 5400), ("10:30", 630), ("1:00:00", 3600), ("20:00:00", 72000), ("2-00", 172800), ("1-12", 129600),
    ("1-12:30", 131400), ("1-00:00:01", 86401), ("1-23:59:59", 172799),
])
def test_time_limit_forms_of_sbatch(text: str, seconds: float) -> None:
    from kit.validation import parse_time_limit

    assert parse_time_limit(text) == seconds
    assert load_recipe(ROOT / "jobs" / "tiny.toml", [f"slurm.time_limit='{text}'"]).slurm.time_limit_s == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "1-24:00", "10:60", "1:60:00", "-5", "1.5", "UNLIMITED",
                                  "1-", "-1:00", "1--2", " 1 : 00"])
def test_time_limit_malformed(text: str) -> None:
    from kit.validation import parse_time_limit

    assert parse_time_limit(text) is None


def test_bare_times_and_dates_in_overrides_are_text() -> None:
    """`--set slurm.time_limit=20:00:00` is a TOML time; no recipe key is date-typed, so it is the text."""
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", ["slurm.time_limit=20:00:00",
                                                    "trainer.deadline=2030-01-02T03:04:05"])
    assert (cfg.slurm.time_limit, cfg.trainer.deadline) == ("20:00:00", "2030-01-02T03:04:05")


_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=12), st.sampled_from(["'20:00:00'", "1979-05-27", "[1, 2]", "{a = 1}", "'x y'",
                                                          "[]", "''", "'1-00:00:00'", "-0", "[[1]]"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from([*describe_keys(), "deepspeed.extra.x", "deepspeed.extra.bf16.enabled",
                            "slurm.sbatch_args.gres", "data.sources", "slurm"]),
       value=_VALUES)
def test_any_value_for_any_key_is_a_config_error_or_a_plannable_frozen_recipe(key: str, value: object) -> None:
    """Whatever an override says, loading raises ConfigError or gives a config that `kit plan` can size
    and whose frozen run.toml reads back equal (no traceback, no unreadable run directory)."""
    from kit.model import sizing

    text = value if isinstance(value, str) else repr(value).replace("True", "true").replace("False", "false")
    try:
        cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [f"{key}={text}"])
    except ConfigError:
        return
    s = sizing(cfg)
    assert s["world_size"] >= 1 and cfg.slurm.time_limit_s > 0
    again = from_dict(tomllib.loads(cfg.to_toml()))
    assert again.to_dict() == cfg.to_dict()
