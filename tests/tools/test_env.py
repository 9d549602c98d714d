"""The environment that tools/setup_env.sh builds, in either of its two modes:

* ``own``: detectron2 v0.6's Python tree, with tools/env/detectron2_c_placeholder.py standing in for its
  compiled ops (what CI builds);
* ``interpreter``: the detectron2 source build (with real compiled ops) of the interpreter given as
  ``make test PYTHON=...``, seen unchanged through a .pth file (tools/env/interpreter_site.py).

The mode expected is the one .venv/tood-env.txt records, not the one found, so that an environment that is not
what it should be fails instead of skipping; every test here runs in both modes. The placeholder and the helper
are tested from tools/env/ by path, so they are tested in both modes too.
"""

import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_TOOLS = REPO_ROOT / "tools" / "env"
PLACEHOLDER_FILE = ENV_TOOLS / "detectron2_c_placeholder.py"
HELPER_FILE = ENV_TOOLS / "interpreter_site.py"


def _load_from_tools_env(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def placeholder():
    return _load_from_tools_env(PLACEHOLDER_FILE, "tood_test_detectron2_c_placeholder")


@pytest.fixture(scope="module")
def helper():
    return _load_from_tools_env(HELPER_FILE, "tood_test_interpreter_site")


def _recorded():
    """What tools/setup_env.sh wrote into the running environment ({} for an interpreter it did not build)."""
    mode_file = Path(sys.prefix) / "tood-env.txt"
    if not mode_file.is_file():
        return {}
    return dict(line.split("=", 1) for line in mode_file.read_text().splitlines() if "=" in line)


def _mode():
    from detectron2 import _C

    observed = "own" if getattr(_C, "IS_TOOD_PLACEHOLDER", False) else "interpreter"
    return _recorded().get("mode", observed)


def _within(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def test_detectron2_imports_everything_tood_uses():
    import detectron2
    import detectron2.layers  # noqa: F401  (imports detectron2._C at module level)
    import detectron2.modeling  # noqa: F401
    from detectron2 import model_zoo
    from detectron2.evaluation import COCOEvaluator  # noqa: F401

    major, minor = (int(x) for x in detectron2.__version__.split(".")[:2])
    assert (major, minor) >= (0, 6)
    assert Path(model_zoo.get_config_file("common/models/retinanet.py")).is_file()


def test_tood_is_imported_from_this_checkout():
    import tood

    assert _within(tood.__file__, REPO_ROOT / "projects" / "TOOD" / "tood"), tood.__file__


def test_compiled_ops_are_what_the_mode_promises():
    """own: the placeholder, whose ops fail clearly; interpreter: the user's compiled ops, which compute."""
    from detectron2 import _C
    from detectron2.layers import ModulatedDeformConv
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[5.0, 5.0, 4.0, 2.0, 0.0]])  # centre x, y, width, height, angle (degrees)
    others = torch.tensor([[5.0, 5.0, 4.0, 2.0, 0.0], [6.0, 5.0, 4.0, 2.0, 0.0], [5.0, 5.0, 4.0, 2.0, 90.0]])
    if _mode() == "own":
        assert _C.IS_TOOD_PLACEHOLDER is True
        assert _C.__spec__.origin == "tood-placeholder"
        with pytest.raises(RuntimeError, match=r"box_iou_rotated.*source build of detectron2"):
            pairwise_iou_rotated(boxes, others)
        # The environment report that default_setup prints must not raise.
        assert "placeholder" in _C.get_compiler_version()
        assert _C.has_cuda() is False
        conv = ModulatedDeformConv(4, 4, 3, padding=1)
        offset, mask = torch.zeros(1, 18, 8, 8), torch.ones(1, 9, 8, 8)
        # detectron2 refuses CPU itself before reaching _C; on CUDA the placeholder raises.
        with pytest.raises((RuntimeError, NotImplementedError)):
            conv(torch.zeros(1, 4, 8, 8), offset, mask)
    else:
        assert not hasattr(_C, "IS_TOOD_PLACEHOLDER")
        assert _C.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), _C.__file__
        assert "detectron2_c_placeholder" not in sys.modules
        # 4x2 boxes: identical; shifted by 1 (overlap 3x2 = 6 of 8 + 8 - 6); turned by 90 degrees (2x2 = 4).
        iou = pairwise_iou_rotated(boxes, others)
        torch.testing.assert_close(iou, torch.tensor([[1.0, 0.6, 4.0 / 12.0]]), atol=1e-5, rtol=0)


def test_the_interpreter_check_agrees_with_the_mode():
    """tools/setup_env.sh chooses the mode with this check: it must never take the placeholder for real ops."""
    verdict = subprocess.run(
        [sys.executable, str(HELPER_FILE), "check-detectron2"], capture_output=True, text=True, timeout=300
    ).stdout.strip()
    if _mode() == "own":
        assert verdict.startswith("no: detectron2._C is not a compiled extension"), verdict
    else:
        assert verdict.startswith("ok detectron2"), verdict


def test_venv_sees_the_packages_its_mode_promises(helper):
    """own: nothing from outside .venv but the standard library; interpreter: the chosen interpreter's packages,
    after .venv's own, with nothing of them replaced except the project's test tools and installers."""
    stdlib = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib")}
    site_entries = [p for p in sys.path if os.path.exists(p) and not any(_within(p, s) for s in stdlib)]
    if _mode() == "own":
        outside = [p for p in site_entries if not (_within(p, sys.prefix) or _within(p, REPO_ROOT))]
        assert outside == [], f"own mode must see only .venv and this checkout, not {outside}"
        return
    recorded = _recorded()
    if recorded:  # the interpreter's site directories follow .venv's own site-packages on sys.path
        out = subprocess.run(
            [recorded["python"], str(HELPER_FILE), "pth"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        dirs = re.findall(r"site\.addsitedir\('([^']*)'\)", out)
        assert dirs, out
        positions = [[os.path.realpath(p) for p in sys.path].index(os.path.realpath(d)) for d in dirs]
        assert positions == sorted(positions)
        own_site = min(i for i, p in enumerate(sys.path) if p and _within(p, sys.prefix) and "-packages" in p)
        assert own_site < positions[0]
    allowed = helper.ALWAYS_PINNED_BY_PROJECT | helper.INSTALLERS | {helper.PROJECT}
    where = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            where.setdefault(helper.normalize(name), []).append(str(dist.locate_file("")))
    shadowed = {
        name: locations
        for name, locations in where.items()
        if len(locations) > 1 and _within(locations[0], sys.prefix) and name not in allowed
    }
    assert shadowed == {}, f".venv replaces the interpreter's own packages: {shadowed}"


def test_placeholder_ops_raise_naming_op_and_source_build(placeholder):
    module = placeholder._make_module()
    assert module.IS_TOOD_PLACEHOLDER is True
    with pytest.raises(placeholder.MissingCompiledOpError, match=r"deform_conv_forward.*source build of detectron2"):
        module.deform_conv_forward()
    assert isinstance(placeholder.MissingCompiledOpError(), RuntimeError)
    assert "placeholder" in module.get_compiler_version() and "placeholder" in module.get_cuda_version()
    assert module.has_cuda() is False
    assert not hasattr(module, "__wrapped__")  # dunder look-ups (inspect, pickle, mock) are plain misses


def test_placeholder_defers_to_a_real_extension(placeholder, tmp_path):
    """A compiled ``_C`` found on the package path wins over the placeholder's finder."""
    finder = placeholder._Finder()
    fake_pkg = tmp_path / "detectron2"
    fake_pkg.mkdir()
    (fake_pkg / "_C.py").write_text("REAL = True\n")
    assert finder.find_spec("detectron2._C", [str(fake_pkg)]) is None
    assert isinstance(finder.find_spec("detectron2._C", [str(tmp_path / "empty")]), importlib.machinery.ModuleSpec)
    assert finder.find_spec("detectron2.other", None) is None


_INSTALL_SCRIPT = """
import importlib.util, sys
packages_dir, placeholder_file = sys.argv[1:3]
sys.path.insert(0, packages_dir)
spec = importlib.util.spec_from_file_location("detectron2_c_placeholder", placeholder_file)
ph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ph)
ph.install()
ph.install()
finders = [f for f in sys.meta_path if isinstance(f, ph._Finder)]
assert len(finders) == 1 and sys.meta_path[-1] is finders[0], sys.meta_path
from detectron2 import _C
print(vars(_C).get("IS_TOOD_PLACEHOLDER", False), vars(_C).get("REAL", False))
"""


@pytest.mark.parametrize("compiled", [False, True], ids=["no-compiled-ops", "compiled-ops"])
def test_placeholder_install_end_to_end(tmp_path, compiled):
    """install() (what the .pth line of own mode calls) in a fresh interpreter without site-packages: it adds
    one finder, last, and ``from detectron2 import _C`` gets the placeholder only when no real module exists."""
    pkg = tmp_path / "detectron2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    if compiled:
        (pkg / "_C.py").write_text("REAL = True\n")
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _INSTALL_SCRIPT, str(tmp_path), str(PLACEHOLDER_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == (["False", "True"] if compiled else ["True", "False"])


def test_interpreter_constraints_keep_the_interpreters_versions(helper, tmp_path):
    """The constraints for installs into .venv (interpreter mode) pin what the interpreter has at its versions,
    the project's test tools at the project's pins, and the project's other pins only for what it lacks."""
    project = tmp_path / "constraints.txt"
    project.write_text("torch==0.0.1  # old\nruff==0.17.5\nno-such-package-tood-test==1.0\npip<26.3\n")
    lines = helper.constraints(str(project))
    pins = {helper.normalize(re.split(r"[=<>]", line)[0]): line for line in lines if not line.startswith("#")}
    assert pins["torch"] == f"torch=={importlib.metadata.version('torch')}"
    assert pins["ruff"] == "ruff==0.17.5"
    assert pins["no-such-package-tood-test"] == "no-such-package-tood-test==1.0"
    assert pins["pip"] == "pip<26.3"
    assert "tood" not in pins
