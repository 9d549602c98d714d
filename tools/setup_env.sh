#!/usr/bin/env bash
# Builds (or reuses) the project's environment: .venv/ inside the checkout.
#
#   PYTHON=/path/to/python tools/setup_env.sh     (make test PYTHON=/path/to/python does the same)
#
# * If $PYTHON imports a working detectron2 (>= 0.6, with its real compiled ops: a source build), that
#   interpreter is used as it is ("interpreter" mode). .venv is made without system site-packages and gets one
#   .pth file that adds $PYTHON's own site directories (tools/env/interpreter_site.py says why: a venv made by
#   a venv's python is based on the *base* interpreter, so --system-site-packages would show the wrong
#   packages). Only the tood package (editable) and the test tools go into .venv, resolved against $PYTHON's
#   own versions, so that nothing of that interpreter is changed or replaced.
# * Otherwise ("own" mode) .venv gets torch/torchvision from PyPI and detectron2 v0.6's Python tree from the
#   PyPI sdist pb1-detectron2==0.6 (byte-identical to upstream v0.6, but without its C++ sources), placed on
#   sys.path by a .pth file; the missing compiled module is replaced by tools/env/detectron2_c_placeholder.py.
#   Every pip call uses requirements/constraints.txt, the one place where versions are pinned.
# Without PYTHON, an existing .venv is kept for the interpreter it was built for (python3 if none).
# Idempotent: a second run checks a stamp and returns in about a second (a few seconds with PYTHON set: the
# interpreter's detectron2 is checked again).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
HELPER="$ROOT/tools/env/interpreter_site.py"
MODE_FILE="$VENV/tood-env.txt"  # mode=own|interpreter, python=..., env=... (read by tests/test_env.py too)
USER_PTH="zzz-tood-interpreter-site.pth"  # sorts last: .venv's own packages stay first on sys.path
D2_SDIST="pb1-detectron2==0.6"

log() { echo "[setup_env] $*"; }
die() { echo "[setup_env] error: $*" >&2; exit 1; }

fingerprint() {
    cat "$CONSTRAINTS" "$ROOT/setup.py" "$ROOT/tools/setup_env.sh" "$ROOT"/tools/env/*.py | sha256sum | cut -c1-16
}
STAMP="$VENV/.tood-env-$(fingerprint)"

env_ready() {
    [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import detectron2, torchvision, tood" 2>/dev/null
}
recorded() { if [[ -f "$MODE_FILE" ]]; then sed -n "s/^$1=//p" "$MODE_FILE"; fi; }

# --- Which interpreter, which mode --------------------------------------------------------------------------
if [[ -z "${PYTHON:-}" ]]; then
    # No choice made: keep .venv as it was built (for whichever interpreter), else start from python3.
    if env_ready; then
        exit 0
    fi
    PYTHON="$(recorded python)"
    PYTHON="${PYTHON:-python3}"
fi
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found (to build .venv for another one: make test PYTHON=...)"
# An absolute path without resolving symlinks (a venv's python is a symlink to its base interpreter).
PYTHON="$(command -v "$PYTHON")"
[[ "$PYTHON" = /* ]] || PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"

verdict="$("$PYTHON" "$HELPER" check-detectron2 2>/dev/null || true)"
verdict="${verdict:-no: the check of its detectron2 did not finish}"
if [[ "$verdict" == ok* ]]; then
    MODE=interpreter
    # The environment itself: .venv shows exactly this prefix's packages.
    ENV_ID="$("$PYTHON" -c 'import sys; print(sys.prefix)')"
else
    MODE=own
    # .venv is made from the base interpreter, whatever venv PYTHON lives in.
    ENV_ID="$("$PYTHON" -c 'import sys; print(sys.base_prefix, "%d.%d" % sys.version_info[:2])')"
fi
WANT="$MODE:$ENV_ID"

if [[ -d "$VENV" ]]; then
    if [[ -f "$MODE_FILE" ]]; then
        have="$(recorded mode):$(recorded env)"
    elif grep -q '^include-system-site-packages *= *false' "$VENV/pyvenv.cfg" 2>/dev/null; then
        # Made by an earlier version of this script, in own mode: keep it if that is wanted (the steps below
        # then only check what is installed).
        have="own:$ENV_ID"
    else
        have="unknown"
    fi
    if [[ "$have" != "$WANT" ]]; then
        log "removing $VENV (built for $have; now wanted: $WANT)"
        rm -rf "$VENV"
    elif env_ready; then
        exit 0
    fi
fi

write_mode_file() {
    printf 'mode=%s\npython=%s\nenv=%s\n' "$MODE" "$PYTHON" "$ENV_ID" > "$MODE_FILE"
}

# --- Interpreter mode: $PYTHON's detectron2, torch, numpy ... as they are ------------------------------------
setup_interpreter_mode() {
    log "using $PYTHON as it is: ${verdict#ok }"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv --without-pip "$VENV"
    write_mode_file
    local site
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PYTHON" "$HELPER" pth > "$site/$USER_PTH"
    local cons="$VENV/tood-constraints.txt"
    "$PYTHON" "$HELPER" constraints "$CONSTRAINTS" > "$cons"

    # pip: $PYTHON's own (seen through the .pth file) installs into .venv; if it has none, .venv gets one.
    if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        log "$PYTHON has no pip: installing one into .venv"
        "$VENV/bin/python" -m ensurepip --default-pip >/dev/null
    fi
    vpip() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$cons" "$@"; }

    log "installing the tood package (editable) and the test tools into .venv"
    vpip --no-deps -e "$ROOT"
    # tood's own requirements (setup.py): $PYTHON normally has them all (detectron2 needs them); install only
    # the missing ones, at versions that fit $PYTHON's packages.
    local missing
    missing="$("$VENV/bin/python" - <<'PY'
import importlib.util
wanted = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "Pillow",
          "pycocotools": "pycocotools", "fvcore": "fvcore", "cv2": "opencv-python-headless", "tqdm": "tqdm"}
print(" ".join(dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None))
PY
)"
    if [[ -n "$missing" ]]; then
        log "$PYTHON lacks $missing (needed by tood): installing into .venv"
        # shellcheck disable=SC2086  # a list of names
        vpip $missing
    fi
    vpip pytest pytest-timeout ruff onnx onnxruntime onnxscript || die "the test tools do not fit $PYTHON's \
packages (constraints: $cons); install pytest/ruff/onnx versions that do into $PYTHON, or use plain 'make test'"

    # detectron2's model zoo (used by the configs) imports pkg_resources, which setuptools 81 removed; torch
    # 2.15 pulls in a newer setuptools. Then .venv gets setuptools of its own (pinned), $PYTHON keeps its own.
    if ! "$VENV/bin/python" -c "import detectron2.model_zoo" 2>/dev/null \
        && ! "$VENV/bin/python" -c "import pkg_resources" 2>/dev/null; then
        log "detectron2.model_zoo needs pkg_resources, which $PYTHON's setuptools lacks (removed in 81):"
        log "  installing setuptools<81 into .venv only (in $PYTHON itself: pip install 'setuptools<81')"
        vpip setuptools
    fi
    "$VENV/bin/python" -W ignore -c "import detectron2.model_zoo" || die "detectron2.model_zoo does not import in .venv"
}

# --- Own mode: pinned torch, detectron2 v0.6's Python tree and the _C placeholder -----------------------------
setup_own_mode() {
    log "$PYTHON has no working detectron2 (${verdict#no: }): building the project's own environment"
    [[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    write_mode_file
    pip_install() { "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "$@"; }
    pip_install "pip<26.3" "setuptools" wheel
    log "installing torch and torchvision (pinned in $CONSTRAINTS)"
    pip_install torch torchvision

    local site d2_src
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    d2_src="$VENV/src/detectron2-0.6"
    if [[ ! -f "$d2_src/detectron2/__init__.py" ]]; then
        log "fetching detectron2 v0.6 (Python tree of the PyPI sdist $D2_SDIST)"
        local dl
        dl="$(mktemp -d)"
        # Its setup.py imports torch, hence --no-build-isolation; --no-deps: we install its requirements below.
        "$VENV/bin/python" -m pip download --quiet --no-deps --no-build-isolation -c "$CONSTRAINTS" \
            "$D2_SDIST" -d "$dl"
        mkdir -p "$dl/x" "$VENV/src"
        tar -xzf "$dl"/pb1-detectron2-0.6.tar.gz -C "$dl/x"
        rm -rf "$d2_src"
        mv "$dl/x/pb1-detectron2-0.6" "$d2_src"
        rm -rf "$dl"
    fi
    # detectron2 v0.6's install_requires (its setup.py), less black: it only formats LazyConfig.to_py output.
    pip_install "termcolor>=1.1" "Pillow>=7.1" "yacs>=0.1.8" tabulate cloudpickle matplotlib "tqdm>4.29.0" \
        tensorboard "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "pycocotools>=2.0.2" future pydot \
        "omegaconf>=2.1" "hydra-core>=1.1" scipy opencv-python-headless
    cp "$ROOT/tools/env/detectron2_c_placeholder.py" "$site/"
    printf '%s\n%s\n' "$d2_src" "import detectron2_c_placeholder; detectron2_c_placeholder.install()" \
        > "$site/tood-detectron2.pth"
    log "installing the tood package (editable) and the test tools"
    pip_install -e "$ROOT[dev]"
}

if [[ "$MODE" == interpreter ]]; then setup_interpreter_mode; else setup_own_mode; fi

"$VENV/bin/python" -W ignore -c "import detectron2, torch, torchvision, tood; \
print('[setup_env] ready ($MODE mode): torch', torch.__version__, '| torchvision', torchvision.__version__, \
'| detectron2', detectron2.__version__, 'from', detectron2.__path__[0], '| CUDA available:', torch.cuda.is_available())"
rm -f "$VENV"/.tood-env-*
touch "$STAMP"
