import importlib.util
import logging
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO_ROOT = Path(__file__).resolve().parents[1]
# Reference tensors recorded from mmdetection 3.3, in a folder beside the checkout; TOOD_ORACLE_DIR overrides.
ORACLE_DIR = Path(os.environ.get("TOOD_ORACLE_DIR", REPO_ROOT.parent / "shared" / "oracle"))
# ATEN_CPU_CAPABILITY=avx2 (with ONEDNN_MAX_CPU_ISA=AVX2: make test-avx2) runs the suite as PyTorch sees a CPU without
# AVX-512: oneDNN then answers that it has no bfloat16 support, and the fixture below makes torch.cpu's probes, which
# read the CPU's flags directly, answer no too.
WITHOUT_AVX512 = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2")


# The references were recorded with 2 threads: a CPU's float sums depend on how the work is split between threads, so
# tests that compare with them compute with that many (a module marked ``reference_threads``), whatever the machine's
# core count or OMP_NUM_THREADS, and restore the count after.
REFERENCE_THREADS = 2


@pytest.fixture(scope="module", autouse=True)
def _reference_threads(request):
    if request.node.get_closest_marker("reference_threads") is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(REFERENCE_THREADS)
    yield
    torch.set_num_threads(threads)


def load_tool(name: str):
    """``tools/<name>.py`` (``name`` may name a subfolder: ``env/...``) as a module, without running its ``__main__``
    block: tests call its functions in-process."""
    spec = importlib.util.spec_from_file_location(f"tools_{name.replace('/', '_')}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_oracle(name):
    """The reference file ``name``; a user's clone without it skips the test, CI (``CI`` set) fails it."""
    path = ORACLE_DIR / name
    if not path.is_file():
        reason = f"reference file {path} is absent (set TOOD_ORACLE_DIR to the folder holding {name})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must have the reference files", pytrace=False)
        pytest.skip(reason)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def head_oracle():
    """mmdetection 3.3's TOOD head outputs, targets, losses and gradients."""
    return _load_oracle("tood_head_mmdet_seed0.pt")


@pytest.fixture(scope="session")
def e2e_oracle():
    """mmdetection 3.3's full TOOD R-50 detector on the astronaut photo."""
    return _load_oracle("tood_e2e_mmdet_seed0_astronaut.pt")


@pytest.fixture(scope="session")
def train_oracle():
    """4 SGD steps of mmdetection 3.3's TOOD R-50 from the e2e oracle's weights."""
    return _load_oracle("tood_train_mmdet_seed0.pt")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """The folder (annotations.json, images/) of a generated dataset of 8 images of 128 px, 6 classes."""
    from tood.data import get_shapes_dataset  # here: tests/tools/test_env.py checks the environment without tood

    return get_shapes_dataset(num_images=8, seed=0, image_size=128, root=tmp_path_factory.mktemp("tiny_shapes"))


def register_coco_args(folder, *names):
    """tools/train_net.py's ``--register-coco NAME JSON IMAGE_ROOT`` of the dataset in ``folder``, for each name."""
    args = []
    for name in names:
        args += ["--register-coco", name, str(folder / "annotations.json"), str(folder / "images")]
    return args


def write_tiny_lazy_config(path, train_dataset, test_dataset=None, extra=""):
    """Writes to ``path`` a LazyConfig of the quick-start model on ``train_dataset`` (and ``test_dataset``) at 128 px,
    2 images per batch, without flips (so that every run sees the same pixels), then the ``extra`` lines."""
    lines = [
        "from detectron2.config import LazyConfig",
        f"_base = LazyConfig.load({str(REPO_ROOT / 'configs' / 'quickstart_shapes.py')!r})",
        "model, optimizer, lr_multiplier, dataloader, train = (",
        "    _base.model, _base.optimizer, _base.lr_multiplier, _base.dataloader, _base.train",
        ")",
        f"dataloader.train.dataset.names = {train_dataset!r}",
        *([f"dataloader.test.dataset.names = {test_dataset!r}"] if test_dataset else []),
        "for _augs in (dataloader.train.mapper.augmentations, dataloader.test.mapper.augmentations):",
        "    _augs[0].short_edge_length = 128",
        "    _augs[0].max_size = 128",
        "dataloader.train.mapper.augmentations[1].prob = 0.0",
        "dataloader.train.total_batch_size = 2",
    ]
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


def tiny_yaml_overrides(dataset, output_dir, **overrides):
    """``KEY VALUE`` overrides, as strings on a command line, that shrink configs/COCO-Detection/tood_R_50_FPN_1x.yaml
    to seconds on CPU: R-18 with trainable BN, 64 channels, 128 px images of ``dataset``, 4 iterations at batch 2."""
    opts = {
        "MODEL.DEVICE": "cpu",
        "MODEL.WEIGHTS": "",
        "MODEL.RESNETS.DEPTH": 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
        "MODEL.RESNETS.NORM": "BN",
        "MODEL.BACKBONE.FREEZE_AT": 0,
        "MODEL.FPN.OUT_CHANNELS": 64,
        "MODEL.TOOD.FEAT_CHANNELS": 64,
        "MODEL.TOOD.NUM_CONVS": 2,
        "MODEL.TOOD.NUM_CLASSES": 6,
        "MODEL.TOOD.TAL_START_ITER": 2,
        "MODEL.TOOD.SCORE_THRESH_TEST": 0.0,
        "DATASETS.TRAIN": (dataset,),
        "DATASETS.TEST": (dataset,),
        "DATALOADER.NUM_WORKERS": 0,
        "INPUT.MIN_SIZE_TRAIN": (128,),
        "INPUT.MAX_SIZE_TRAIN": 128,
        "INPUT.MIN_SIZE_TEST": 128,
        "INPUT.MAX_SIZE_TEST": 128,
        "SOLVER.IMS_PER_BATCH": 2,
        "SOLVER.BASE_LR": 0.001,
        "SOLVER.WARMUP_ITERS": 1,
        "SOLVER.MAX_ITER": 4,
        "SOLVER.STEPS": (3,),
        "SOLVER.CHECKPOINT_PERIOD": 2,
        "OUTPUT_DIR": output_dir,
        **overrides,
    }
    return [str(x) for kv in opts.items() for x in kv]


@pytest.fixture
def autocast_at_forward(monkeypatch):
    """Whether CPU bfloat16 autocast was on at each forward of a TOOD model."""
    import tood  # here: tests/tools/test_env.py checks the environment without tood

    seen = []
    forward = tood.TOOD.forward

    def recording(self, batched_inputs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, batched_inputs)

    monkeypatch.setattr(tood.TOOD, "forward", recording)
    return seen


@pytest.fixture
def one_thread():
    """One torch thread: the tiny models gain nothing from a second, and threads that outnumber the free cores
    (another job running) slow torch's CPU ops down manyfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tood_log(caplog):
    """caplog that also sees the "tood" and fvcore loggers (Detectron2's setup_logger stops their propagation)."""
    loggers = [logging.getLogger(name) for name in ("tood", "fvcore")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


def reregister_coco(name, json_file, image_root):
    """``register_checked_coco`` under ``name``, replacing an earlier registration of that name."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from tood.data.checks import register_checked_coco

    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    MetadataCatalog.pop(name, None)
    register_checked_coco(name, str(json_file), str(image_root))


def set_cpu_units(monkeypatch, avx512_bf16: bool, amx: bool, onednn_bf16: bool = True, capability: str = "AVX2"):
    """Makes every probe that the precision rule reads answer as a CPU with these units would: torch.cpu's feature
    flags, oneDNN's bfloat16 support and ATen's vector capability."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


@pytest.fixture
def cpu_units(monkeypatch):
    """``cpu_units(avx512_bf16, amx, onednn_bf16=True, capability="AVX2")``: :func:`set_cpu_units` for one test."""
    return lambda *args, **kwargs: set_cpu_units(monkeypatch, *args, **kwargs)


@pytest.fixture(autouse=True)
def _cpu_kind(monkeypatch):
    # oneDNN's probe and ATen's capability already answer as such a CPU's in that mode; they stay untouched, since
    # torch.export's decompositions walk torch.ops and expect operators there.
    if WITHOUT_AVX512:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


class FloatOutputs(TorchDispatchMode):
    """Records the dtype of every floating tensor that any operator computes, with the operators that made it.

    Views compute nothing and are left out (Detectron2's ``Boxes`` of the inputs are float32 by design, and reshaping
    them is no computation in float32)."""

    def __init__(self):
        super().__init__()
        self.ops = defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in () if func.is_view else tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.ops[t.dtype].add(str(func.overloadpacket))
        return out
