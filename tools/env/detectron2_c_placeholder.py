"""Placeholder for ``detectron2._C``, the compiled part of detectron2 that its PyPI sdist lacks.

The TOOD project installs detectron2 v0.6 from the sdist ``pb1-detectron2==0.6`` whose Python tree is
upstream v0.6 but which ships no C++/CUDA sources, so ``detectron2._C`` cannot be built. Three detectron2
modules import ``_C`` at module level (deformable conv, rotated boxes, rotated RoIAlign), which would make
``import detectron2.layers`` fail. This module registers a finder *after* the normal ones: a real compiled
``detectron2/_C*.so`` always wins; only when none exists is this placeholder imported in its place.

Importing works. Calling any op of the placeholder raises ``RuntimeError`` naming the op and saying that it
needs a source build of detectron2. The environment report functions (``get_compiler_version``,
``get_cuda_version``, ``has_cuda``) answer truthfully instead of raising, because ``default_setup`` calls them.
TOOD itself needs none of the compiled ops (it uses torchvision's ``deform_conv2d`` and pycocotools' COCOeval).

No file of detectron2 is modified: ``tools/setup_env.sh`` copies this file into the virtual environment's
site-packages and adds a ``.pth`` line that calls :func:`install`.
"""

import importlib.abc
import importlib.machinery
import sys
import types

MODULE_NAME = "detectron2._C"
IS_TOOD_PLACEHOLDER = True


class MissingCompiledOpError(RuntimeError):
    """Raised when a compiled detectron2 op is called but detectron2 was installed without them."""


def _missing_op(name):
    def op(*args, **kwargs):
        raise MissingCompiledOpError(
            f"detectron2._C.{name} is not available: this detectron2 is the pure-Python v0.6 release "
            f"installed by the TOOD project without its compiled C++/CUDA ops. '{name}' needs a source "
            "build of detectron2 (https://detectron2.readthedocs.io/en/latest/tutorials/install.html); "
            "after installing one, run tools/setup_env.sh again and it will be used instead of this placeholder."
        )

    op.__name__ = name
    return op


def _make_module():
    module = types.ModuleType(MODULE_NAME, __doc__)
    module.IS_TOOD_PLACEHOLDER = True
    module.get_compiler_version = lambda: "not compiled (TOOD placeholder for detectron2._C)"
    module.get_cuda_version = lambda: "not compiled (TOOD placeholder for detectron2._C)"
    module.has_cuda = lambda: False

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing_op(name)

    module.__getattr__ = __getattr__
    return module


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return _make_module()

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != MODULE_NAME:
            return None
        # Defer to a real compiled extension when there is one.
        if importlib.machinery.PathFinder.find_spec(fullname, path) is not None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(), origin="tood-placeholder")


def install():
    """Append the finder to ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
