#!/usr/bin/env bash
# Builds (or reuses) the project's environment: .venv/ inside the checkout.
#
#   PYTHON=/path/to/python tools/setup_env.sh     (default PYTHON: python3)
#
# * If $PYTHON already imports a working detectron2 (>= 0.6, with its compiled ops), it is used as it is:
#   .venv is made with --system-site-packages and only the TOOD package and the test tools go into it,
#   so nothing of that interpreter changes.
# * Otherwise .venv gets torch/torchvision from PyPI and detectron2 v0.6's Python tree from the PyPI sdist
#   pb1-detectron2==0.6 (byte-identical to upstream v0.6, but without its C++ sources), placed on sys.path
#   by a .pth file; the missing compiled module is replaced by tools/env/detectron2_c_placeholder.py.
# Every pip call uses requirements/constraints.txt, the one place where versions are pinned.
# Idempotent: a second run checks a stamp and returns in about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
D2_SDIST="pb1-detectron2==0.6"

log() { echo "[setup_env] $*"; }

fingerprint() {
    cat "$CONSTRAINTS" "$ROOT/setup.py" "$ROOT/tools/setup_env.sh" "$ROOT/tools/env/detectron2_c_placeholder.py" \
        | sha256sum | cut -c1-16
}
STAMP="$VENV/.tood-env-$(fingerprint)"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import detectron2, torchvision, tood" 2>/dev/null; then
    exit 0
fi

# A working detectron2 is one whose compiled ops exist (a source build), not our placeholder.
has_working_d2() {
    "$1" - <<'PY' 2>/dev/null
import sys
import detectron2, torch, torchvision
from detectron2 import _C
major, minor = (int(x) for x in detectron2.__version__.split(".")[:2])
ok = (major, minor) >= (0, 6) and not getattr(_C, "IS_TOOD_PLACEHOLDER", False)
sys.exit(0 if ok else 1)
PY
}

pip_install() { "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "$@"; }

if ! command -v "$PYTHON" >/dev/null; then
    echo "[setup_env] error: PYTHON=$PYTHON not found" >&2
    exit 1
fi

if has_working_d2 "$PYTHON"; then
    log "using the detectron2 already installed for $PYTHON (left unchanged)"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv --system-site-packages "$VENV"
    # Install only what that interpreter lacks; constraints would downgrade the user's own packages.
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"
else
    [[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    pip_install "pip<26.3" "setuptools" wheel
    log "installing torch and torchvision (pinned in $CONSTRAINTS)"
    pip_install torch torchvision

    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    D2_SRC="$VENV/src/detectron2-0.6"
    if [[ ! -f "$D2_SRC/detectron2/__init__.py" ]]; then
        log "fetching detectron2 v0.6 (Python tree of the PyPI sdist $D2_SDIST)"
        DL="$(mktemp -d)"
        # Its setup.py imports torch, hence --no-build-isolation; --no-deps: we install its requirements below.
        "$VENV/bin/python" -m pip download --quiet --no-deps --no-build-isolation -c "$CONSTRAINTS" \
            "$D2_SDIST" -d "$DL"
        mkdir -p "$DL/x" "$VENV/src"
        tar -xzf "$DL"/pb1-detectron2-0.6.tar.gz -C "$DL/x"
        rm -rf "$D2_SRC"
        mv "$DL/x/pb1-detectron2-0.6" "$D2_SRC"
        rm -rf "$DL"
    fi
    # detectron2 v0.6's install_requires (its setup.py), less black: it only formats LazyConfig.to_py output.
    pip_install "termcolor>=1.1" "Pillow>=7.1" "yacs>=0.1.8" tabulate cloudpickle matplotlib "tqdm>4.29.0" \
        tensorboard "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "pycocotools>=2.0.2" future pydot \
        "omegaconf>=2.1" "hydra-core>=1.1" scipy opencv-python-headless
    cp "$ROOT/tools/env/detectron2_c_placeholder.py" "$SITE/"
    printf '%s\n%s\n' "$D2_SRC" "import detectron2_c_placeholder; detectron2_c_placeholder.install()" \
        > "$SITE/tood-detectron2.pth"
    log "installing the tood package (editable) and the test tools"
    pip_install -e "$ROOT[dev]"
fi

"$VENV/bin/python" -c "import detectron2, torch, torchvision, tood; \
print('[setup_env] ready: torch', torch.__version__, '| torchvision', torchvision.__version__, \
'| detectron2', detectron2.__version__, '| CUDA available:', torch.cuda.is_available())"
rm -f "$VENV"/.tood-env-*
touch "$STAMP"
