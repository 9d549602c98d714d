"""Lets tools/setup_env.sh give .venv the packages of another interpreter ($PYTHON) exactly as they are.

Run by $PYTHON itself; standard library only (any Python 3.8+)::

    python interpreter_site.py check-detectron2      prints "ok ..." if detectron2 works, else "no: <why>"
    python interpreter_site.py pth                   the lines of a .pth file for .venv's site-packages
    python interpreter_site.py constraints FILE      a pip constraints file for installs into .venv

Why a .pth file and not ``python -m venv --system-site-packages``: a venv made by the python of a venv is
based on the *base* interpreter, so --system-site-packages would show the base's packages, not those of the
venv the user chose. Instead .venv (made without system site-packages) gets one line per site directory of
$PYTHON, in $PYTHON's own order, that calls ``site.addsitedir``. Those directories then follow .venv's own
site-packages on ``sys.path``, and their own .pth files run too, so editable installs (``pip install -e
detectron2`` works through a .pth file) are seen as $PYTHON sees them. This works the same for a venv, a
conda environment and a system interpreter (including its per-user site-packages when it uses them).
Nothing is written anywhere but .venv: $PYTHON's own environment is only read.
"""

import importlib.machinery
import os
import re
import site
import sys
import sysconfig

# Installed into .venv at the project's pinned versions even when $PYTHON has other versions: `make test`
# checks formatting with ruff, whose output changes between releases, and the test options (pytest.ini) need
# pytest and pytest-timeout. .venv's copies come first on sys.path there; $PYTHON itself is untouched.
ALWAYS_PINNED_BY_PROJECT = {"ruff", "pytest", "pytest-timeout"}
# Installers: never constrained to $PYTHON's versions (setuptools may be added to .venv for pkg_resources).
INSTALLERS = {"pip", "setuptools", "wheel"}
PROJECT = "tood"

# A PEP 440 version (public part, optional local part); others are left out of the constraints.
_VERSION = re.compile(
    r"^(\d+!)?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?$", re.IGNORECASE
)
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _norm_path(path):
    return os.path.normcase(os.path.realpath(path))


def site_dirs():
    """$PYTHON's site directories that are on its sys.path, in the order in which ``site`` added them."""
    candidates = []
    if site.ENABLE_USER_SITE:  # False in a venv; True for most system and conda interpreters
        candidates.append(site.getusersitepackages())
    if hasattr(site, "getsitepackages"):  # missing only in very old virtualenvs
        candidates.extend(site.getsitepackages())
    candidates.extend(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    on_path = {_norm_path(p) for p in sys.path if p}
    dirs, seen = [], set()
    for d in candidates:
        key = _norm_path(d)
        if key in on_path and key not in seen and os.path.isdir(d):
            seen.add(key)
            dirs.append(d)
    return dirs


def pth_lines():
    header = f"# Written by tools/env/interpreter_site.py: the site directories of {sys.executable}"
    return [header] + [f"import site; site.addsitedir({d!r})" for d in site_dirs()]


def installed_versions():
    """{normalized name: (name, version)} of every distribution $PYTHON sees, first on sys.path winning."""
    import importlib.metadata as metadata

    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in found:
            found[normalize(name)] = (name, dist.version)
    return found


def constraints(project_constraints_file):
    """$PYTHON's versions of everything it has, then the project's pins for what it lacks and its test tools."""
    installed = installed_versions()
    keep_ours = ALWAYS_PINNED_BY_PROJECT | INSTALLERS | {PROJECT}
    lines = [
        f"# Written by tools/env/interpreter_site.py for {sys.executable}: its own versions, so that no",
        "# install into .venv replaces one of its packages, then the project's pins for the rest.",
    ]
    for key, (name, version) in sorted(installed.items()):
        if key in keep_ours:
            continue
        if _VERSION.match(version):
            lines.append(f"{name}=={version}")
        else:
            lines.append(f"# {name} {version}: not a PEP 440 version, left unconstrained")
    with open(project_constraints_file) as f:
        for line in f:
            req = line.split("#", 1)[0].strip()
            match = _REQ_NAME.match(req)
            if match and (normalize(match.group(1)) in keep_ours or normalize(match.group(1)) not in installed):
                lines.append(req)
    return lines


def check_detectron2():
    """'ok ...' when detectron2 >= 0.6 imports with its real compiled ops (a source build), else 'no: why'."""
    try:
        import detectron2
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as e:  # any failure means: not usable as it is
        return f"no: {type(e).__name__}: {e}"
    try:
        major, minor = (int(x) for x in detectron2.__version__.split(".")[:2])
    except ValueError:
        return f"no: detectron2 version {detectron2.__version__!r} is not understood"
    if (major, minor) < (0, 6):
        return f"no: detectron2 {detectron2.__version__} is older than 0.6"
    try:
        from detectron2 import _C
    except Exception as e:
        return f"no: detectron2 {detectron2.__version__} is there but its compiled ops do not load ({e})"
    origin = getattr(_C, "__file__", None) or ""
    if getattr(_C, "IS_TOOD_PLACEHOLDER", False) or not origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return "no: detectron2._C is not a compiled extension (it is the TOOD placeholder or a stand-in)"
    return f"ok detectron2 {detectron2.__version__} from {os.path.dirname(detectron2.__file__)}"


def main(argv):
    if argv[:1] == ["check-detectron2"]:
        verdict = check_detectron2()
        print(verdict)
        return 0 if verdict.startswith("ok") else 1
    if argv[:1] == ["pth"]:
        print("\n".join(pth_lines()))
        return 0
    if argv[:1] == ["constraints"] and len(argv) == 2:
        print("\n".join(constraints(argv[1])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
