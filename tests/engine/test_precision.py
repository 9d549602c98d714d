"""Precision chosen by the CPU: bfloat16 autocast where it has bfloat16 units, float32 elsewhere, an explicit
``train.amp.enabled`` (training) or ``--precision`` (inference) always winning; and bfloat16 training that learns, on
any CPU."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import HookBase
from detectron2.structures import Boxes, Instances

from tests.conftest import (
    REPO_ROOT,
    WITHOUT_AVX512,
    register_coco_args,
    reregister_coco,
    tiny_yaml_overrides,
    write_tiny_lazy_config,
)
from tood import add_tood_config
from tood.engine import Trainer, argument_parser, main
from tood.engine.train_loop import CheckedAMPTrainer, build_trainer
from tood.precision import (
    choose_inference_precision,
    choose_precision,
    cpu_bfloat16_units,
    inference_autocast,
)


@pytest.mark.parametrize(
    "avx512_bf16,amx,units",
    [
        (True, False, ("AVX512-BF16",)),
        (False, True, ("AMX",)),
        (True, True, ("AVX512-BF16", "AMX")),
        (False, False, ()),
    ],
)
def test_bfloat16_where_the_cpu_has_bfloat16_units(cpu_units, avx512_bf16, amx, units):
    cpu_units(avx512_bf16, amx)
    assert cpu_bfloat16_units() == units
    amp, why = choose_precision(None, "cpu")
    assert amp == bool(units)
    if units:
        assert why.startswith(f"bfloat16 autocast: this CPU has {' and '.join(units)}")
    else:
        assert why.startswith("float32: no bfloat16 units on this CPU (AVX2")


def test_units_oneDNN_cannot_use_do_not_count(cpu_units):
    cpu_units(True, False, onednn_bf16=False)
    assert cpu_bfloat16_units() == ()
    assert choose_precision(None, "cpu")[0] is False


@pytest.mark.parametrize("units", [True, False])
def test_an_explicit_setting_wins(cpu_units, units):
    cpu_units(units, False)
    assert choose_precision(True, "cpu") == (True, "bfloat16 autocast: train.amp.enabled=True")
    assert choose_precision(False, "cpu") == (False, "float32: train.amp.enabled=False")


def test_cuda_keeps_float32_unless_asked(cpu_units):
    cpu_units(True, True)
    assert choose_precision(None, "cuda")[0] is False
    assert choose_precision(True, "cuda") == (True, "float16 autocast with loss scaling: train.amp.enabled=True")


def test_zoo_configs_keep_float32_and_the_quick_start_chooses():
    assert LazyConfig.load(str(REPO_ROOT / "configs" / "tood_R_50_1x.py")).train.amp.enabled is False
    assert LazyConfig.load(str(REPO_ROOT / "configs" / "quickstart_shapes.py")).train.amp.enabled is None


class LossLog(HookBase):
    def __init__(self):
        self.losses = []

    def after_step(self):
        self.losses.append(self.trainer.storage.history("total_loss").latest())


def test_bfloat16_training_learns():
    """The quick-start model in bfloat16 autocast on one fixed batch: 12 AdamW steps give finite losses that fall."""
    cfg = LazyConfig.load(str(REPO_ROOT / "configs" / "quickstart_shapes.py"))
    cfg.model.tal_start_iter = 6
    model = instantiate(cfg.model).train()
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        instances = Instances((96, 96))
        xy = torch.rand(3, 2, generator=g) * 50
        instances.gt_boxes = Boxes(torch.cat([xy, xy + 20 + torch.rand(3, 2, generator=g) * 20], dim=1))
        instances.gt_classes = torch.randint(0, 6, (3,), generator=g)
        batch.append(
            {"image": torch.randint(0, 255, (3, 96, 96), generator=g, dtype=torch.uint8), "instances": instances}
        )
    cfg.optimizer.params.model = model
    trainer = build_trainer(model, itertools.repeat(batch), instantiate(cfg.optimizer), amp=True, device="cpu")
    log = LossLog()
    trainer.register_hooks([log])
    trainer.train(0, 12)
    assert all(torch.isfinite(torch.tensor(log.losses)))
    # Within each assignment phase (ATSS, then task-aligned) the loss on the same batch falls.
    assert log.losses[5] < log.losses[0] and log.losses[11] < log.losses[6], log.losses


@pytest.mark.parametrize("units", [True, False])
def test_inference_precision(cpu_units, units):
    """``--precision`` wins; ``auto`` and no choice with ``train.amp.enabled=None`` follow the CPU's units; no choice
    follows an explicit ``train.amp.enabled``; CUDA stays float32 unless bf16 is asked for. Each reason names how to
    choose otherwise."""
    cpu_units(units, False)
    assert choose_inference_precision("fp32", None) == (False, "float32: --precision fp32")
    assert choose_inference_precision("bf16", False) == (True, "bfloat16 autocast: --precision bf16")
    for choice in ("auto", None):
        bf16, why = choose_inference_precision(choice, None)
        assert bf16 == units
        assert why == (
            "bfloat16 autocast: this CPU has AVX512-BF16 (--precision fp32 for float32)"
            if units
            else f"float32: no bfloat16 units on this CPU ({torch.backends.cpu.get_cpu_capability()}; --precision bf16 "
            "forces bfloat16)"
        )
    assert choose_inference_precision(None, True) == (
        True,
        "bfloat16 autocast: as training, train.amp.enabled=True (--precision fp32 for float32)",
    )
    assert choose_inference_precision(None, False) == (
        False,
        "float32: as training, train.amp.enabled=False (--precision bf16 for bfloat16 autocast)",
    )
    for choice, amp in (("auto", None), (None, True)):
        assert choose_inference_precision(choice, amp, "cuda")[0] is False
    assert choose_inference_precision("bf16", None, "cuda")[0] is True
    with pytest.raises(ValueError, match="one of auto, fp32, bf16, got 'fp16'"):
        choose_inference_precision("fp16")


def test_inference_autocast():
    with inference_autocast(True, "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with inference_autocast(False, "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_avx2_mode_sees_no_bfloat16_units():
    """``make test-avx2``'s environment makes PyTorch answer as a CPU without AVX-512 would, on any CPU: AVX2 kernels,
    no oneDNN bfloat16, hence float32 training; the suite's own probes (tests/conftest.py) answer no as well."""
    code = (
        "import torch; from tood.precision import choose_precision; "
        "print(torch.backends.cpu.get_cpu_capability(), torch.ops.mkldnn._is_mkldnn_bf16_supported(), "
        "choose_precision(None)[1])"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("AVX2 False float32: no bfloat16 units on this CPU (AVX2;"), out
    if WITHOUT_AVX512:
        assert (cpu_bfloat16_units(), torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()) == (
            (),
            False,
            False,
        )


def test_a_run_without_a_scaler_resumes_under_mixed_precision():
    """The state of a float32 run (no grad_scaler entry, as bfloat16 runs before the scaler) resumes in the mixed
    precision loop with a fresh scale; a float16 run's scale is restored."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = build_trainer(model, [], optimizer)
    plain.iter = 7
    for precision in (torch.bfloat16, torch.float16):
        trainer = CheckedAMPTrainer(model, [], optimizer, device="cpu", precision=precision)
        trainer.load_state_dict(plain.state_dict())
        assert trainer.iter == 7
    trainer.grad_scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    trainer.grad_scaler.update(1024.0)
    resumed = CheckedAMPTrainer(model, [], optimizer, device="cpu", precision=torch.float16)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.grad_scaler.get_scale() == 1024.0


@pytest.mark.parametrize(
    "flow,precision,bf16",
    [
        ("lazy", "bf16", True),
        ("lazy", "fp32", False),
        ("lazy", None, True),  # the quick-start model's train.amp.enabled=None: by the CPU, which has units here
        ("yaml", "bf16", True),
        ("yaml", None, False),  # SOLVER.AMP.ENABLED=False
    ],
)
def test_eval_only_evaluates_in_the_chosen_precision(
    tiny_shapes, tmp_path, cpu_units, autocast_at_forward, flow, precision, bf16
):
    """``tools/train_net.py --eval-only [--precision P]`` with either config system: every forward of the evaluation
    runs in the precision chosen, and the log says which."""
    cpu_units(True, False)
    output = tmp_path / "eval"
    if flow == "lazy":
        config = write_tiny_lazy_config(
            tmp_path / "config.py", "prec_tiny", "prec_tiny", extra="model.test_score_thresh = 0.0\n"
        )
        model = instantiate(LazyConfig.load(config).model)
        opts = [f"train.output_dir={output}", f"train.init_checkpoint={tmp_path / 'model.pth'}", "train.device=cpu"]
        args = ["--config-file", config, *register_coco_args(tiny_shapes, "prec_tiny")]
    else:
        reregister_coco("prec_tiny_yaml", tiny_shapes / "annotations.json", tiny_shapes / "images")
        opts = tiny_yaml_overrides("prec_tiny_yaml", output, **{"MODEL.WEIGHTS": str(tmp_path / "model.pth")})
        args = ["--config-file", str(REPO_ROOT / "configs" / "COCO-Detection" / "tood_R_50_FPN_1x.yaml")]
        cfg = get_cfg()
        add_tood_config(cfg)
        cfg.merge_from_file(args[1])
        cfg.merge_from_list(opts)
        model = Trainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    args += ["--eval-only", *(["--precision", precision] if precision else []), *opts]
    results = main(argument_parser().parse_args(args))
    assert "bbox" in results
    assert autocast_at_forward and set(autocast_at_forward) == {bf16}, autocast_at_forward
    expected = {"bf16": "bfloat16 autocast: --precision bf16", "fp32": "float32: --precision fp32"}.get(
        precision,
        "bfloat16 autocast: this CPU has AVX512-BF16" if bf16 else "float32: as training, train.amp.enabled=False",
    )
    assert f"Evaluation precision: {expected}" in (output / "log.txt").read_text()


def test_an_unknown_yaml_precision_is_an_error_before_anything_runs(tiny_shapes, tmp_path):
    reregister_coco("prec_tiny_yaml", tiny_shapes / "annotations.json", tiny_shapes / "images")
    opts = tiny_yaml_overrides("prec_tiny_yaml", tmp_path, **{"TEST.PRECISION": "fp16"})
    args = ["--config-file", str(REPO_ROOT / "configs" / "COCO-Detection" / "tood_R_50_FPN_1x.yaml"), *opts]
    with pytest.raises(ValueError, match="TEST.PRECISION must be one of auto, fp32, bf16, or '' .*got 'fp16'"):
        main(argument_parser().parse_args(args))
    assert not (tmp_path / "log.txt").exists()
