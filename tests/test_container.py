"""The images: definition files parse (spython, a real Apptainer-definition parser), the pin file is the
single source of versions and agrees with pyproject.toml, and the composed apptainer command lines match
golden files. Apptainer itself cannot be installed here, so the builds are tested as text.

Regenerate the golden files after an intended change of pins or definition files::

    KIT_REGEN_GOLDEN=1 pytest tests/test_container.py -k golden
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from spython.main.parse.parsers import SingularityParser

from kit.config import load_recipe
from kit.containers.apptainer import (
    build_command,
    check_image,
    check_recipe,
    definition_args,
    definition_path,
    format_command,
    render,
)
from kit.containers.pins import PINS_PATH, PinsError, check_pyproject, load_pins
from kit.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
TARGETS = ("a100", "h100")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def parse(text: str, tmp_path: Path, name: str = "x.def") -> dict:
    p = tmp_path / name
    p.write_text(text)
    return SingularityParser(str(p)).recipe


def rendered(target: str) -> str:
    pins = load_pins()
    args = pins.build_args(target, "/build/kit-src.tar.gz")
    args["KIT_COMMIT"] = COMMIT
    return render(definition_path(pins, target).read_text(), args)


# --------------------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("target", TARGETS)
def test_definition_parses_and_carries_every_pin(target: str, tmp_path: Path) -> None:
    pins = load_pins()
    recipe = parse(rendered(target), tmp_path)
    (stage,) = recipe.values()
    assert stage.fromHeader == pins.base_ref  # by digest, not by tag
    labels = "\n".join(stage.labels)
    for key, version in pins.stack.items():
        assert f"org.kit.{key} {version}" in labels, key
    assert f"org.kit.torch_cuda_arch_list {pins.target(target).torch_cuda_arch_list}" in labels
    assert f"KIT_IMAGE_TARGET={target}" in stage.environ
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in stage.environ
    # spython folds %test into the install lines as `echo ... >> /tests.sh`
    assert f'echo "kit doctor --static --target {target}" >> /tests.sh' in stage.install
    post = "\n".join(stage.install)
    for lib in ("libibverbs1", "librdmacm1"):
        assert lib in post
    assert f'TORCH_CUDA_ARCH_LIST="{pins.target(target).torch_cuda_arch_list}"' in post
    assert f"deepspeed=={pins.stack['deepspeed']}" in post


@pytest.mark.parametrize("target", TARGETS)
def test_definition_repeats_no_version(target: str) -> None:
    lines = definition_path(load_pins(), target).read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))  # comments run nothing
    versions = re.findall(r"(?<![\w.{])\d+\.\d+(?:\.\d+)*", text)
    assert versions == [], f"{target}.def writes versions {versions}: put them in containers/pins.toml"


@pytest.mark.parametrize("target", TARGETS)
def test_definition_uses_exactly_the_build_args(target: str) -> None:
    pins = load_pins()
    used = set(definition_args(definition_path(pins, target).read_text()))
    provided = set(pins.build_args(target, "x")) | {"KIT_COMMIT"}
    assert used == provided, f"unused pins {provided - used}, unknown args {used - provided}"


def test_a100_and_h100_build_the_same_way(tmp_path: Path) -> None:
    """The two files may differ in their comments and %environment only; %post and %test must not drift."""
    stages = [next(iter(parse(definition_path(load_pins(), t).read_text(), tmp_path, f"{t}.def").values()))
              for t in TARGETS]
    assert stages[0].install == stages[1].install
    assert stages[0].labels == stages[1].labels


def test_render_refuses_an_argument_without_value() -> None:
    with pytest.raises(PinsError, match=r"\{\{ NOPE \}\}"):
        render("From: {{ NOPE }}\n", {}, where="x.def")


# ---------------------------------------------------------------------------------------------- pins


def test_pins_agree_with_pyproject() -> None:
    check_pyproject(load_pins(), ROOT / "pyproject.toml")


def _pins_copy(tmp_path: Path, old: str, new: str) -> Path:
    d = tmp_path / "containers"
    d.mkdir(exist_ok=True)
    for f in PINS_PATH.parent.glob("*.def"):
        shutil.copy(f, d / f.name)
    text = PINS_PATH.read_text()
    assert old in text, old
    (d / "pins.toml").write_text(text.replace(old, new, 1))
    return d / "pins.toml"


@pytest.mark.parametrize(("old", "new", "message"), [
    ('torch_cuda_arch_list = "9.0"', 'torch_cuda_arch_list = "8.0"',
     r"targets\.h100\.torch_cuda_arch_list .* does not include"),
    ('min = "525.60.13"', 'min = "470.57.02"', r"driver\.min = '470\.57\.02' is older than CUDA 12"),
    ('digest = "sha256:', 'digest = "md5:', r"base\.digest must be sha256"),
    ('deepspeed = "0.19.8"', 'deepspeed = "latest"', r"stack\.deepspeed = 'latest' is not a version"),
    ('definition = "h100.def"', 'definition = "b200.def"', r"targets\.h100\.definition = 'b200\.def': no such file"),
    ('tokenizers = "0.23.3"', 'tokenizers = "0.23.3"\nflash_attn = "2.7"', r"unknown key stack\.flash_attn"),
    ('image = "nvcr.io/nvidia/pytorch"', 'image = "nvcr.io/nvidia/pytorch:25.01-py3"', r"base\.image must be"),
    ('cuda = "12.8"\n', "", r"stack\.cuda is required"),
])
def test_pins_that_contradict_themselves_name_file_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = _pins_copy(tmp_path, old, new)
    with pytest.raises(PinsError, match=message) as e:
        load_pins(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(("old", "new", "message"), [
    ('torch = "2.6.0a0+ecf3bae40a"', 'torch = "2.15.0"',
     r"stack\.torch = '2\.15\.0' is outside .*pyproject\.toml's range torch"),
    ('transformers = "5.24.0"', 'transformers = "4.30.0"', r"stack\.transformers = '4\.30\.0' is outside"),
    ('kit = "0.1.0"', 'kit = "0.0.9"', r"stack\.kit = '0\.0\.9' but .*pyproject\.toml says version = '0\.1\.0'"),
])
def test_pins_that_contradict_pyproject_name_file_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = _pins_copy(tmp_path, old, new)
    with pytest.raises(PinsError, match=message) as e:
        check_pyproject(load_pins(path), ROOT / "pyproject.toml")
    assert str(path) in str(e.value)


def test_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(PinsError, match=r"pins\.toml: unknown target 'b200'; .*: a100, h100"):
        load_pins().target("b200")


# ------------------------------------------------------------------------------------------- goldens


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("KIT_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: KIT_REGEN_GOLDEN=1 pytest tests/test_container.py -k golden"
    assert text == path.read_text(), (
        f"{path} differs from the composed command; if the change is intended, regenerate with "
        "KIT_REGEN_GOLDEN=1 pytest tests/test_container.py -k golden and review the diff")


@pytest.mark.parametrize("target", TARGETS)
def test_build_command_golden(target: str) -> None:
    cmd = build_command(load_pins(), target, f"/images/kit-{target}.sif", "/images/kit-src.tar.gz", COMMIT)
    check_golden(f"container_build_{target}.txt", format_command(cmd).replace(str(ROOT), "<kit>"))


# ------------------------------------------------------------------------------------------ commands


def kit(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"}  # no apptainer there
    return subprocess.run([sys.executable, "-m", "kit.tools.cli", *args], capture_output=True, text=True, env=env)


def test_container_build_prints_the_command_and_stops_without_apptainer(tmp_path: Path) -> None:
    assert shutil.which("apptainer", path=os.path.dirname(sys.executable) + ":/usr/bin:/bin") is None
    pins = _pins_copy(tmp_path, "sha256:" + "0" * 64, "sha256:" + "ab" * 32)
    out = kit("container", "build", "h100", "--pins", str(pins), "--output", str(tmp_path / "k.sif"))
    assert out.returncode == 1
    assert "apptainer is not installed on this machine: nothing was built" in out.stderr
    assert "--build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch@sha256:" + "ab" * 32 in out.stdout
    assert not (tmp_path / "k.sif").exists() and not list(tmp_path.glob("*.tar.gz"))
    printed = kit("container", "build", "a100", "--print")
    assert printed.returncode == 0, printed.stderr
    assert "--build-arg TORCH_CUDA_ARCH_LIST=8.0" in printed.stdout


def test_container_build_refuses_an_unknown_target() -> None:
    out = kit("container", "build", "b200", "--print")
    assert out.returncode == 1
    assert "pins.toml: unknown target 'b200'" in out.stderr


def test_recipe_whose_image_does_not_exist(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "jobs" / "tiny.toml").read_text().replace(
        "[model]", f'[container]\nimage = "{tmp_path}/missing.sif"\ntarget = "h100"\n\n[model]'))
    cfg = load_recipe(recipe)
    with pytest.raises(ConfigError, match=r"r\.toml: container\.image = '.*missing\.sif' does not exist; "
                                          r"build it with `kit container build h100`"):
        check_image(cfg, recipe)
    out = kit("doctor", str(recipe))
    assert out.returncode == 1 and "container.image" in out.stderr and "r.toml" in out.stderr


def test_recipe_with_an_unknown_target(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    tiny = (ROOT / "jobs" / "tiny.toml").read_text()
    recipe.write_text(tiny.replace("[model]", '[container]\ntarget = "b200"\n\n[model]'))
    with pytest.raises(ConfigError, match=r"r\.toml: container\.target = 'b200' is not a target of .*pins\.toml "
                                          r"\(known: a100, h100\)"):
        check_recipe(load_recipe(recipe), recipe)
    out = kit("doctor", str(recipe))
    assert out.returncode == 1 and "container.target = 'b200'" in out.stderr
