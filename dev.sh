#!/usr/bin/env bash
# dev.sh - the README's two commands, self-contained on a fresh Debian 12 machine.
#
#   bash dev.sh demo     set up .venv if needed, then run the embedded default (kit demo)
#   bash dev.sh test     set up .venv, start the local Slurm cluster (root), lint, type-check, pytest
#   bash dev.sh test --stress [RUNS]   the concurrency-sensitive tests RUNS times on saturated CPUs
#   bash dev.sh setup    only the .venv (pinned requirements/lock.txt + kit in editable mode)
#
# Why pinned: torch must be the CPU wheel (an unpinned torch pulls a multi-GB CUDA build) and the
# exact versions are the ones measured here (bit-exact resume depends on the arithmetic).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${KIT_VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import kit, deepspeed, textual' 2>/dev/null \
     || [ requirements/lock.txt -nt "$VENV/.kit-installed" ]; then
    echo "[dev] setting up $VENV (pinned requirements/lock.txt)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -r requirements/lock.txt
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
    touch "$VENV/.kit-installed"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  # DeepSpeed's CPU comm op, compiled once into this install's own cache (kit.opcache; needs g++):
  # no DeepSpeed start then compiles it, or waits on another's build lock.
  if [ ! -e "$VENV/.kit-ops-built" ] || [ "$VENV/.kit-installed" -nt "$VENV/.kit-ops-built" ]; then
    if command -v g++ >/dev/null; then
      python -m kit.opcache build >/dev/null && touch "$VENV/.kit-ops-built"
    else
      echo "[dev] g++ not found: DeepSpeed's CPU comm op will compile at the first start instead"
    fi
  fi
}

system_packages() {
  # g++ builds DeepSpeed's CPU communication op on first use; tmux runs the TUI in a real terminal.
  local want=(g++ tmux) missing=()
  for p in "${want[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

case "${1:-}" in
  setup) setup ;;
  demo) system_packages; setup; shift; exec kit demo "$@" ;;
  test)
    shift
    system_packages
    setup
    if [ "$(id -u)" = 0 ]; then
      bash .ci/slurm/start.sh
    else
      echo "[dev] not root: the local Slurm cluster is not started (Slurm tests will skip, or fail under CI=true)"
    fi
    if [ "${1:-}" = "--stress" ]; then
      shift
      runs=3
      if [[ "${1:-}" =~ ^[0-9]+$ ]]; then runs=$1; shift; fi
      echo "[dev] stress: the concurrency tests $runs times under load"; exec python tests/stress.py --runs "$runs" "$@"
    fi
    echo "[dev] ruff"; ruff check .
    echo "[dev] mypy"; mypy kit jobs monitor tools
    # --durations: every run (CI included) ends with the 25 slowest tests, so it shows where time goes
    echo "[dev] pytest"; exec python -m pytest --durations=25 "$@" ;;
  *) echo "usage: bash dev.sh {demo|test|setup} [args]"; exit 2 ;;
esac
