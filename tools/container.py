"""``kit container build TARGET``: compose and run the Apptainer build of a pinned training image.

Why a verb and not a shell script: the build must read the pins (containers/pins.toml), refuse pins
that contradict pyproject.toml, package exactly one commit of the kit, and pass every version as a
``--build-arg``; a person typing the command would drift. The command is printed first, so a build
host without the kit can run it by hand, and where apptainer is missing (as on these development
machines) the verb stops there with a message saying so.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from kit.containers.apptainer import build_command, format_command
from kit.containers.pins import PINS_PATH, Pins, check_pyproject, load_pins, repo_pyproject
from kit.errors import KitError


class ApptainerMissing(KitError):
    """apptainer is not on PATH: the command was printed, not run."""


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="build the image of a target (a100, h100) from containers/pins.toml")
    b.add_argument("target", help="a [targets.NAME] of the pin file, e.g. h100")
    b.add_argument("--output", "-o", default="", help="the .sif to write (default: ./kit-TARGET-KITVERSION.sif)")
    b.add_argument("--pins", default=str(PINS_PATH), help="pin file (default: the one shipped with the kit)")
    b.add_argument("--force", action="store_true", help="overwrite an existing image")
    b.add_argument("--print", dest="print_only", action="store_true",
                   help="print the command and stop (works without apptainer and with a placeholder digest)")


def run(args: argparse.Namespace, verb: str) -> int:
    return build(args)


def source_tree() -> Path:
    """The checkout this kit runs from (the build packages one commit of it)."""
    root = PINS_PATH.parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / ".git").exists():
        raise KitError(f"{root} is not a git checkout of the kit: build images from a clone of the kit's repository")
    return root


def commit_of(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if out.returncode != 0:
        raise KitError(f"cannot read the commit of {root}: {out.stderr.strip()}")
    return out.stdout.strip()


def dirty(root: Path) -> bool:
    out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True)
    return bool(out.stdout.strip())


def build(args: argparse.Namespace) -> int:
    pins: Pins = load_pins(args.pins)
    pins.target(args.target)  # an unknown target fails here, naming the pin file
    pyproject = repo_pyproject()
    if pyproject is None:
        raise KitError("pyproject.toml of the kit was not found: build images from a clone of the kit's repository")
    check_pyproject(pins, pyproject)
    root = source_tree()
    commit = commit_of(root)
    output = Path(args.output or f"kit-{args.target}-{pins.stack['kit']}.sif").absolute()
    src = output.with_name(f"{output.stem}.kit-src.tar.gz")
    cmd = build_command(pins, args.target, output, src, commit, force=args.force)
    print(f"# kit {pins.stack['kit']} at commit {commit[:12]}, target {args.target}, pins {pins.path}")
    print(f"git -C {root} archive --format=tar.gz --prefix=kit/ -o {src} {commit}")
    print(format_command(cmd), end="")
    if args.print_only:
        return 0
    if shutil.which(cmd[0]) is None:
        raise ApptainerMissing("apptainer is not installed on this machine: nothing was built; run the commands "
                               "above on a build host with Apptainer >= 1.2 (or install it: "
                               "https://apptainer.org/docs/admin/main/installation.html)")
    if pins.placeholder_digest:
        raise KitError(f"{pins.path}: base.digest is the all-zero placeholder; pin the real digest of "
                       f"{pins.base['image']}:{pins.base['tag']} (skopeo inspect --format '{{{{.Digest}}}}' "
                       f"docker://{pins.base['image']}:{pins.base['tag']}) and build again")
    if dirty(root):
        print(f"# note: {root} has uncommitted changes; the image holds commit {commit[:12]} only", file=sys.stderr)
    subprocess.run(["git", "-C", str(root), "archive", "--format=tar.gz", "--prefix=kit/", "-o", str(src), commit],
                   check=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise KitError(f"apptainer build failed (exit {proc.returncode}); see its output above")
    print(f"built {output}; set container.image = \"{output}\" and container.target = \"{args.target}\" in the recipe")
    return 0
