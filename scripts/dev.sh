#!/usr/bin/env bash
# The README's two commands on a fresh machine: set up the environment (idempotent: a second run with nothing changed
# installs nothing) and run the quickstart or the tests.
#
#   scripts/dev.sh quickstart [speedtune quickstart flags]   (make quickstart)
#   scripts/dev.sh test [pytest args]                        (make test; make test-fast runs -m "not slow")
#   scripts/dev.sh setup [run|dev]                           only set up
#   scripts/dev.sh lock                                      re-resolve requirements/*.lock (needs uv)
#
# Environment: PYTHON (default python3, 3.10 or newer), VENV (default .venv), SPEEDTUNE_NO_UV=1 to use pip alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

check_python() {
    command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH: install Python 3.10 or newer, or set PYTHON=/path/to/python3"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "$PYTHON is $("$PYTHON" -V 2>&1); speedtune needs 3.10 or newer (set PYTHON=/path/to/python3.1x)"
}

has_cuda_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

# torch first, by hand: a plain `torch` requirement takes PyPI's multi-GB CUDA build. A CUDA torch that is already
# installed is left alone; without a CUDA GPU the CPU build is taken (from a local wheel where pip is configured with
# one, else from PyTorch's CPU index).
install_torch() {
    if "$PY" -c 'import torch' 2>/dev/null; then
        say "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: left as it is"
    elif has_cuda_gpu; then
        say "CUDA GPU found: installing PyPI's CUDA torch"
        "$PY" -m pip install -q "torch>=2.4,<2.15"
    else
        say "no CUDA GPU: installing the CPU build of torch 2.13.0"
        "$PY" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null ||
            "$PY" -m pip install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
    fi
}

# uv resolves and installs in seconds where pip takes minutes; it comes from the package index into the venv itself.
ensure_uv() {
    [ "${SPEEDTUNE_NO_UV:-}" = 1 ] && return 1
    [ -x "$VENV/bin/uv" ] && return 0
    "$PY" -m pip install -q uv >/dev/null 2>&1 && [ -x "$VENV/bin/uv" ]
}

# $1: run (the quickstart: gguf + embedded) or dev (everything the tests need: + ui, dev)
install_project() {
    local extras lock
    case $1 in
        run) extras=gguf,embedded; lock=requirements/run.lock ;;
        dev) extras=gguf,embedded,ui,dev; lock=requirements/dev.lock ;;
    esac
    if ensure_uv; then
        say "installing with uv (pinned versions: $lock)"
        local uvpip=("$VENV/bin/uv" pip install -q --python "$PY")
        # the lock was resolved for CPython 3.11 on x86-64 Linux; elsewhere the ranges in pyproject.toml decide
        if "$PY" -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64")'; then
            "${uvpip[@]}" -r "$lock" -e ".[$extras]"
        else
            "${uvpip[@]}" -e ".[$extras]"
        fi
    else
        say "installing with pip"
        "$PY" -m pip install -q -e ".[$extras]"
    fi
}

install_browser() {
    [ -x /usr/bin/chromium ] && return 0
    command -v apt-get >/dev/null || die "the browser tests need Chromium at /usr/bin/chromium (Debian's chromium package)"
    local sudo=""
    [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo=sudo; } ||
        die "the browser tests need Chromium: run 'sudo apt-get install -y chromium' once"
    say "installing Debian's Chromium for the browser tests"
    { $sudo apt-get update -q && $sudo apt-get install -y -q chromium; } >/tmp/speedtune-apt.log 2>&1 ||
        die "apt-get install chromium failed (log: /tmp/speedtune-apt.log)"
}

# Every speedtune process imports torch and transformers (thousands of modules). Where PYTHONDONTWRITEBYTECODE is
# set (CI images, containers) Python never caches their bytecode, and uv does not write it when it installs: each
# process compiled them again, about 4 s of CPU a `speedtune train` here, paid by every command and every test that
# starts one. Compiled once at set-up instead (files already compiled are skipped; a few files of other Python
# versions' syntax don't compile, which is harmless).
compile_bytecode() {
    say "compiling the environment's Python files to bytecode"
    "$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" speedtune \
        >/dev/null 2>&1 || true
}

# The stamp holds a hash of what the environment was built from (this script included): with it unchanged, set-up
# does nothing.
setup() {
    local kind=${1:-dev} stamp want
    check_python
    want=$(cat pyproject.toml requirements/*.lock scripts/dev.sh | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
    stamp="$VENV/.speedtune-$kind"
    [ "$kind" = dev ] && install_browser
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$PY" ]; then
        return 0
    fi
    [ -x "$PY" ] || { say "creating $VENV ($("$PYTHON" -V))"; "$PYTHON" -m venv "$VENV"; }
    "$PY" -m pip install -q --upgrade pip
    install_torch
    install_project "$kind"
    compile_bytecode
    echo "$want" >"$stamp"
    [ "$kind" = dev ] && echo "$want" >"$VENV/.speedtune-run"
    say "ready: $VENV"
}

lock() {
    check_python
    [ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
    ensure_uv || die "the lock files are written by uv: pip install uv"
    mkdir -p requirements
    # torch is installed by hand (install_torch): resolved as the CPU build, so no CUDA packages are pinned, then left
    # out of the files
    local torch_pin src=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
    [ -n "${PIP_FIND_LINKS:-}" ] && src=(--find-links "$PIP_FIND_LINKS")
    torch_pin=$(mktemp)
    echo "torch==2.13.0+cpu" >"$torch_pin"
    for spec in "run:gguf,embedded" "dev:gguf,embedded,ui,dev"; do
        local name=${spec%%:*} extras=${spec#*:} args=()
        for e in ${extras//,/ }; do args+=(--extra "$e"); done
        "$VENV/bin/uv" pip compile -q pyproject.toml "${args[@]}" --python-version 3.11 \
            --python-platform x86_64-manylinux_2_28 -c "$torch_pin" "${src[@]}" --no-emit-package torch \
            --no-header -o "requirements/$name.lock"
    done
    rm -f "$torch_pin"
    say "wrote requirements/run.lock and requirements/dev.lock"
}

verb=${1:-}
[ $# -gt 0 ] && shift
case $verb in
    setup) setup "${1:-dev}" ;;
    quickstart) setup run; exec "$VENV/bin/speedtune" quickstart "$@" ;;
    # one worker per core, a test file per worker (files share the trained run through a lock: tests/conftest.py),
    # in the order tests/conftest.py gives them (xdist would otherwise hand out the files with the most tests first)
    # (passive OpenMP waiting: the workers' torch thread pools share the cores without spinning against each other)
    test) setup dev; OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} exec "$PY" -m pytest -q -n auto --dist loadfile \
        --no-loadscope-reorder --durations=25 -rs -rf "$@" ;;
    lock) lock ;;
    *) die "usage: scripts/dev.sh quickstart|test|setup [run|dev]|lock" ;;
esac
