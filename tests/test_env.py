"""The environment that tools/setup_env.sh builds: detectron2 imports, and its missing ops say so."""

import pytest


def test_detectron2_imports_everything_tood_uses():
    import detectron2
    import detectron2.layers  # noqa: F401  (imports detectron2._C at module level)
    import detectron2.modeling  # noqa: F401
    from detectron2.evaluation import COCOEvaluator  # noqa: F401

    major, minor = (int(x) for x in detectron2.__version__.split(".")[:2])
    assert (major, minor) >= (0, 6)


def test_placeholder_op_error_names_op_and_source_build():
    from detectron2 import _C

    if not getattr(_C, "IS_TOOD_PLACEHOLDER", False):
        pytest.skip("a compiled detectron2._C is installed: the placeholder is not in use")
    with pytest.raises(RuntimeError, match=r"deform_conv_forward.*source build of detectron2"):
        _C.deform_conv_forward()
    # The environment report that default_setup prints must not raise.
    assert "placeholder" in _C.get_compiler_version()
    assert _C.has_cuda() is False


def test_detectron2_layer_using_compiled_op_fails_clearly():
    import torch
    from detectron2 import _C
    from detectron2.layers import ModulatedDeformConv

    if not getattr(_C, "IS_TOOD_PLACEHOLDER", False):
        pytest.skip("a compiled detectron2._C is installed: the placeholder is not in use")
    conv = ModulatedDeformConv(4, 4, 3, padding=1)
    x = torch.zeros(1, 4, 8, 8)
    offset, mask = torch.zeros(1, 18, 8, 8), torch.ones(1, 9, 8, 8)
    # detectron2 0.6 refuses CPU itself before reaching _C; on CUDA the placeholder raises.
    with pytest.raises((RuntimeError, NotImplementedError)):
        conv(x, offset, mask)


def test_placeholder_defers_to_a_real_extension(tmp_path, monkeypatch):
    """A compiled ``_C`` found on the package path wins over the placeholder's finder."""
    import importlib.machinery
    import sys

    import detectron2_c_placeholder as ph

    finder = next(f for f in sys.meta_path if isinstance(f, ph._Finder))
    fake_pkg = tmp_path / "detectron2"
    fake_pkg.mkdir()
    (fake_pkg / "_C.py").write_text("REAL = True\n")
    assert finder.find_spec("detectron2._C", [str(fake_pkg)]) is None
    assert isinstance(finder.find_spec("detectron2._C", [str(tmp_path / "empty")]), importlib.machinery.ModuleSpec)
    assert finder.find_spec("detectron2.other", None) is None
