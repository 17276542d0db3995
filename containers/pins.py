"""The version pins of the training images: load, validate, compare with pyproject, turn into build args.

Why one file: a four-month run dies of silent version drift. ``containers/pins.toml`` is the only
place a version of the image's stack is written; ``kit container build`` passes the pins to the
definition files as ``--build-arg`` values and ``kit doctor`` compares the running environment with
them. Every error names the pin file and the dotted field, as recipe errors do.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from kit.errors import ConfigError

PINS_PATH = Path(__file__).resolve().parent / "pins.toml"
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64

_FIELDS: dict[str, tuple[str, ...]] = {
    "base": ("image", "tag", "digest"),
    "stack": ("python", "cuda", "nccl", "torch", "deepspeed", "transformers", "tokenizers", "nvidia_ml_py", "kit"),
    "driver": ("min",),
}
_TARGET_FIELDS = ("definition", "gpu_name", "compute_capability", "torch_cuda_arch_list")
# pin field -> distribution name in pyproject.toml's dependencies (and in importlib.metadata)
DISTRIBUTIONS = {"torch": "torch", "deepspeed": "deepspeed", "transformers": "transformers",
                 "tokenizers": "tokenizers", "nvidia_ml_py": "nvidia-ml-py"}
# CUDA major -> oldest driver with minor-version compatibility (NVIDIA's CUDA compatibility guide)
CUDA_MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


class PinsError(ConfigError):
    """The pin file is malformed, contradicts itself, or contradicts pyproject.toml."""


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    definition: str
    gpu_name: str
    compute_capability: str
    torch_cuda_arch_list: str


@dataclass(frozen=True, slots=True)
class Pins:
    path: Path
    base: dict[str, str]
    stack: dict[str, str]
    driver: dict[str, str]
    targets: dict[str, Target]

    @property
    def base_ref(self) -> str:
        """The base image by digest (the tag is for humans: a digest cannot move)."""
        return f"{self.base['image']}@{self.base['digest']}"

    @property
    def placeholder_digest(self) -> bool:
        return self.base["digest"] == PLACEHOLDER_DIGEST

    def target(self, name: str) -> Target:
        """A target by name; an unknown one is an error that lists the known ones."""
        try:
            return self.targets[name]
        except KeyError:
            known = ", ".join(sorted(self.targets))
            raise PinsError(f"{self.path}: unknown target {name!r}; the targets in this file are: {known}") from None

    def build_args(self, target: str, kit_src: str | Path) -> dict[str, str]:
        """Every ``{{ KEY }}`` a definition file may use, in a stable order (the golden files rely on it)."""
        t = self.target(target)
        args = {"TARGET": t.name, "BASE_IMAGE": self.base_ref, "BASE_TAG": self.base["tag"],
                "GPU_NAME": t.gpu_name, "TORCH_CUDA_ARCH_LIST": t.torch_cuda_arch_list,
                "DRIVER_MIN": self.driver["min"]}
        args.update({f"{k.upper()}_VERSION": v for k, v in self.stack.items()})
        args["KIT_SRC"] = str(kit_src)
        return args


def load_pins(path: str | Path | None = None) -> Pins:
    """Read and validate a pin file (default: the one shipped beside this module)."""
    p = Path(path) if path is not None else PINS_PATH
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise PinsError(f"pin file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, /dev/null's kin, unreadable, not text
        why = getattr(e, "strerror", None) or e
        raise PinsError(f"pin file {p} cannot be read ({why}); give a pins.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise PinsError(f"{p}: not valid TOML: {e}") from None
    sections: dict[str, dict[str, str]] = {}
    for section, names in _FIELDS.items():
        sections[section] = _table(p, raw, section, names)
    targets_raw = raw.get("targets")
    if not isinstance(targets_raw, dict) or not targets_raw:
        raise PinsError(f"{p}: [targets.NAME] tables are missing (one per GPU kind, e.g. [targets.h100])")
    targets = {}
    for name in targets_raw:
        fields = _table(p, targets_raw, name, _TARGET_FIELDS, prefix="targets.")
        targets[name] = Target(name=name, **fields)
    unknown = sorted(set(raw) - {*_FIELDS, "targets"})
    if unknown:
        raise PinsError(f"{p}: unknown table [{unknown[0]}]; valid tables: base, stack, driver, targets.NAME")
    pins = Pins(path=p, base=sections["base"], stack=sections["stack"], driver=sections["driver"], targets=targets)
    check_self(pins)
    return pins


def _table(path: Path, raw: dict[str, object], section: str, names: tuple[str, ...],
           prefix: str = "") -> dict[str, str]:
    t = raw.get(section)
    if not isinstance(t, dict):
        raise PinsError(f"{path}: table [{prefix}{section}] is missing")
    for key in names:
        if key not in t:
            raise PinsError(f"{path}: {prefix}{section}.{key} is required")
        if not isinstance(t[key], str) or not t[key].strip():
            raise PinsError(f"{path}: {prefix}{section}.{key} must be a non-empty string, got {t[key]!r}")
    extra = sorted(set(t) - set(names))
    if extra:
        raise PinsError(f"{path}: unknown key {prefix}{section}.{extra[0]}; valid keys: {', '.join(names)}")
    return {k: str(t[k]).strip() for k in names}


def _version(path: Path, key: str, text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        raise PinsError(f"{path}: {key} = {text!r} is not a version (e.g. \"2.6.0\")") from None


def check_self(pins: Pins) -> None:
    """Contradictions inside the pin file: formats, the driver floor for the CUDA major, and
    each target's architecture list against its compute capability and definition file."""
    p = pins.path
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", pins.base["digest"]):
        raise PinsError(f"{p}: base.digest must be sha256:<64 hex digits>, got {pins.base['digest']!r}")
    image = pins.base["image"]
    if "@" in image or " " in image or ":" in image.rsplit("/", 1)[-1]:
        raise PinsError(f"{p}: base.image must be a repository without tag or digest, got {image!r}")
    for key, text in pins.stack.items():
        _version(p, f"stack.{key}", text)
    cuda = _version(p, "stack.cuda", pins.stack["cuda"])
    floor = CUDA_MIN_DRIVER.get(cuda.major)
    if floor is None:
        raise PinsError(f"{p}: stack.cuda = {pins.stack['cuda']!r}: unknown CUDA major {cuda.major}")
    if _driver(p, "driver.min", pins.driver["min"]) < _driver(p, "driver.min", floor):
        raise PinsError(f"{p}: driver.min = {pins.driver['min']!r} is older than CUDA {cuda.major}.x supports "
                        f"(at least {floor}); raise driver.min or lower stack.cuda")
    for t in pins.targets.values():
        cc = t.compute_capability
        if not re.fullmatch(r"\d+\.\d+", cc):
            raise PinsError(f"{p}: targets.{t.name}.compute_capability must look like \"9.0\", got {cc!r}")
        archs = re.split(r"[;\s]+", t.torch_cuda_arch_list.replace("+PTX", ""))
        if cc not in archs:
            raise PinsError(f"{p}: targets.{t.name}.torch_cuda_arch_list = {t.torch_cuda_arch_list!r} does not "
                            f"include its compute_capability {cc!r}: DeepSpeed's ops would not run on that GPU")
        if not (p.parent / t.definition).is_file():
            raise PinsError(f"{p}: targets.{t.name}.definition = {t.definition!r}: no such file beside the pin file")


def _driver(path: Path, key: str, text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        raise PinsError(f"{path}: {key} = {text!r} is not a driver version (e.g. \"535.104.05\")")
    return tuple(int(x) for x in text.split("."))


def driver_tuple(text: str) -> tuple[int, ...]:
    """A driver version ("535.104.05") as a comparable tuple; non-digits are dropped."""
    return tuple(int(x) for x in re.findall(r"\d+", text))


def check_pyproject(pins: Pins, pyproject: str | Path) -> None:
    """The pins must satisfy the kit's own dependency ranges, and pin the kit's own version."""
    pp = Path(pyproject)
    try:
        project = tomllib.loads(pp.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise PinsError(f"{pp}: cannot read [project] ({e})") from None
    if pins.stack["kit"] != project.get("version"):
        raise PinsError(f"{pins.path}: stack.kit = {pins.stack['kit']!r} but {pp} says version = "
                        f"{project.get('version')!r}; set stack.kit to the version being built")
    ranges: dict[str, Requirement] = {}
    for text in project.get("dependencies", []):
        try:
            req = Requirement(text)
        except InvalidRequirement:
            raise PinsError(f"{pp}: dependency {text!r} is not a valid requirement") from None
        ranges[req.name.lower()] = req
    for key, dist in DISTRIBUTIONS.items():
        found = ranges.get(dist)
        if found is None:
            raise PinsError(f"{pins.path}: stack.{key} pins {dist}, which {pp} does not depend on")
        if not found.specifier.contains(pins.stack[key], prereleases=True):
            raise PinsError(f"{pins.path}: stack.{key} = {pins.stack[key]!r} is outside {pp}'s range "
                            f"{dist}{found.specifier}; change one of them")


def repo_pyproject() -> Path | None:
    """pyproject.toml of the checkout the kit runs from (None for an installed wheel)."""
    p = PINS_PATH.parent.parent / "pyproject.toml"
    return p if p.is_file() else None
