"""README.md's commands and code run.

Every shell command of README's ```bash blocks is covered, by its form (the tool, its flags, the keys it overrides):

* run here, cheaply: in a scratch folder laid out as README assumes (``configs/``, the downloaded files, a
  COCO-format dataset in ``mine/``, ``photo.jpg``), the command is run as written, in this process, with tiny overrides
  appended (64 px images, one iteration). The downloads are stand-ins made here: random weights in mmdetection's and
  torchvision's formats, under the published file names;
* or by the test of the suite that runs that form, named in :data:`COVERAGE`; the named test must exist.

A command of a form that :data:`COVERAGE` does not know fails :func:`test_every_command_is_covered`. Every command's
flags must also parse with its tool's own parser, and every override key must exist in its config. Every ```python
block runs in the scratch folder.
"""

import contextlib
import importlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances

from tests.conftest import REPO_ROOT, load_tool
from tood import add_tood_config
from tood.checkpoint import TOODCheckpointer, check_weights_file
from tood.data import get_shapes_dataset
from tood.engine import Trainer, argument_parser, dataset_metadata, main
from tood.engine.config_checks import check_override_keys
from tood.engine.training import load_config, scale_learning_rate
from tood.mmdet_names import MMDET_TOOD_NAME_MAP

README = (REPO_ROOT / "README.md").read_text()
PYTHON = ".venv/bin/python"
HERE = "tests/tools/test_readme.py::"

# Command form (see `form`) -> the tests that run it. Tests of this file run the README command itself.
COVERAGE = {
    "make quickstart": [
        HERE + "test_make_targets",
        "tests/tools/test_quickstart.py::test_quickstart_trains_evaluates_draws_and_reports",
    ],
    "make test": [HERE + "test_make_targets", "tests/tools/test_env.py::test_venv_sees_the_packages_its_mode_promises"],
    "make test-fast": [HERE + "test_make_targets"],
    "make test-avx2": [
        HERE + "test_make_targets",
        "tests/engine/test_precision.py::test_avx2_mode_sees_no_bfloat16_units",
    ],
    "make test PYTHON=": [
        HERE + "test_make_targets",
        "tests/tools/test_env.py::test_the_interpreter_check_agrees_with_the_mode",
        "tests/tools/test_env.py::test_interpreter_constraints_keep_the_interpreters_versions",
    ],
    "tools/convert_mmdet_to_d2.py --config --input --output": [
        HERE + "test_convert_a_published_checkpoint",
        "tests/conversion/test_conversion.py::test_reference_checkpoint_converts_and_loads_strictly",
    ],
    "tools/train_net.py [.py] --config-file --eval-only : train.init_checkpoint": [
        "tests/tools/test_train_net.py::test_train_checkpoint_evaluate_resume_and_eval_only",
        "tests/engine/test_schedule.py::test_missing_coco_and_weights_are_named_together",
    ],
    "tools/convert_torchvision_resnet.py": [
        HERE + "test_imagenet_initialisation",
        "tests/tools/test_convert_resnet.py::test_converted_backbone_computes_torchvision_features",
        "tests/tools/test_convert_resnet.py::test_open_mmlab_resnext_checkpoint_initialises_the_x101_config",
    ],
    "tools/train_net.py [.py] --config-file --num-gpus : train.output_dir": [
        HERE + "test_the_8_gpu_commands_set_up_the_reference_s_run",
        "tests/tools/test_train_net.py::test_two_cpu_processes_reproduce_one",
        "tests/engine/test_schedule.py::test_the_headline_command_without_coco_ends_with_reasons_not_a_traceback",
    ],
    "tools/train_net.py [.py] --config-file --num-gpus : dataloader.train.total_batch_size train.output_dir "
    "train.reference_batch_size": [
        HERE + "test_fewer_gpus_scale_batch_and_learning_rate",
        "tests/engine/test_schedule.py::test_reference_batch_size_scales_the_learning_rate",
        "tests/tools/test_train_net.py::test_two_cpu_processes_reproduce_one",
    ],
    "tools/train_net.py [.py] --config-file --dist-url --machine-rank --num-gpus --num-machines : train.output_dir": [
        "tests/tools/test_train_net_machines.py::test_two_machines_reproduce_one_process",
        "tests/tools/test_train_net_machines.py::test_a_machine_that_never_joins_ends_the_other",
    ],
    "tools/gpu_check.py --output": [
        "tests/tools/test_gpu_check.py::test_without_cuda_it_says_so_and_measures_nothing",
        "tests/tools/test_gpu_check.py::test_measurements_run_on_cpu",
    ],
    "tools/train_net.py [.py] --config-file --num-gpus --resume : train.output_dir": [
        HERE + "test_the_8_gpu_commands_set_up_the_reference_s_run",
        "tests/tools/test_train_net.py::test_train_checkpoint_evaluate_resume_and_eval_only",
        "tests/engine/test_reliability.py::test_resumed_run_continues_like_the_uninterrupted_one",
    ],
    "tools/train_net.py [.yaml] --config-file --num-gpus : OUTPUT_DIR SOLVER.REFERENCE_WORLD_SIZE": [
        HERE + "test_fewer_gpus_scale_batch_and_learning_rate",
        "tests/configs/test_yaml_zoo.py::test_reference_world_size_scales_the_tal_start_with_the_schedule",
    ],
    "tools/train_net.py [.yaml] --config-file --eval-only : MODEL.WEIGHTS": [
        HERE + "test_evaluate_the_converted_model_with_yaml",
        "tests/configs/test_yaml_zoo.py::test_train_net_trains_and_evaluates_a_yaml_config",
    ],
    "tools/train_net.py [.py] --config-file --register-coco : dataloader.test.dataset.names "
    "dataloader.train.dataset.names model.num_classes train.output_dir": [
        HERE + "test_train_on_your_own_dataset",
        "tests/engine/test_schedule.py::test_max_iter_2_on_the_zoo_config_trains_and_writes_its_checkpoint",
    ],
    "tools/train_net.py [.py] --config-file --register-coco : dataloader.test.dataset.names "
    "dataloader.train.dataset.names model.num_classes train.init_checkpoint train.output_dir": [
        HERE + "test_fine_tune_from_the_converted_coco_model",
        "tests/engine/test_reliability.py::test_checkpoint_of_other_classes_or_architecture_is_explained",
    ],
    "tools/demo.py [.py] --confidence-threshold --config-file --input --opts --output : train.init_checkpoint": [
        HERE + "test_demo",
        "tests/tools/test_demo.py::test_images_folder_and_glob",
    ],
    "tools/demo.py [.py] --config-file --input --opts --output --register-coco : dataloader.test.dataset.names "
    "model.num_classes train.init_checkpoint": [
        HERE + "test_demo",
        "tests/tools/test_demo.py::test_class_names_of_a_registered_coco_dataset",
    ],
    "tools/export_model.py [.py] --config-file --output --weights": [
        "tests/conversion/test_export.py::test_export_and_verify[onnx-fp32]",
        "tests/conversion/test_export.py::test_r50_anchor_free_matches_pytorch[onnx]",
    ],
    "tools/export_model.py [.py] --config-file --format --output --sample-image --weights": [
        "tests/conversion/test_export.py::test_export_and_verify[pt2-fp32]",
        "tests/conversion/test_export.py::test_r50_anchor_free_matches_pytorch[pt2]",
    ],
}

# Appended to the LazyConfig commands run here: 64 px images, batch 2, one iteration.
TINY_TRAINING = [
    "train.max_iter=1",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
    "dataloader.train.mapper.augmentations.0.max_size=64",
]
TINY_TEST = [
    "dataloader.test.mapper.augmentations.0.short_edge_length=64",
    "dataloader.test.mapper.augmentations.0.max_size=64",
]
NUM_CLASSES = 3


# --- README's commands ------------------------------------------------------------------------------------------


def bash_commands(text=README):
    """The commands of the ```bash blocks, as argument lists (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def python_blocks(text=README):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


demo = load_tool("demo")
export_model = load_tool("export_model")
convert_mmdet_to_d2 = load_tool("convert_mmdet_to_d2")
convert_torchvision_resnet = load_tool("convert_torchvision_resnet")

PARSERS = {
    "tools/train_net.py": argument_parser,
    "tools/demo.py": demo.argument_parser,
    "tools/export_model.py": export_model.argument_parser,
}


def option(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def override_keys(tool, args):
    """The config keys a command overrides (yacs: KEY VALUE pairs; LazyConfig: key=value)."""
    if tool not in PARSERS:
        return []
    opts = PARSERS[tool]().parse_args(args).opts
    if option(args, "--config-file").endswith(".yaml"):
        return opts[::2]
    return [o.split("=", 1)[0] for o in opts]


def form(tokens):
    """A command's form: ``make TARGET [VAR=]`` or ``TOOL [config kind] FLAGS : OVERRIDDEN KEYS``."""
    if tokens[0] == "make":
        return " ".join([t for t in tokens if "=" not in t] + [t.split("=")[0] + "=" for t in tokens if "=" in t])
    assert tokens[0] == PYTHON, f"README commands run the project's interpreter {PYTHON}: {shlex.join(tokens)}"
    tool, args = tokens[1], tokens[2:]
    parts = [tool]
    if "--config-file" in args:
        parts.append(f"[{Path(option(args, '--config-file')).suffix}]")
    parts += sorted({t for t in args if t.startswith("--")})
    keys = sorted(override_keys(tool, args))
    return " ".join(parts + ([":", *keys] if keys else []))


def readme_commands(wanted):
    found = [tokens for tokens in bash_commands() if form(tokens) == wanted]
    assert found, f"README has no command of the form {wanted!r}"
    return found


def registered(tokens):
    """The ``--register-coco NAME JSON IMAGE_ROOT`` triples of a command."""
    return [tuple(tokens[i + 1 : i + 4]) for i, t in enumerate(tokens) if t == "--register-coco"]


def run_argv(tokens, *extra):
    """The command's arguments after the tool, with ``extra`` appended."""
    return [*tokens[2:], *extra]


def test_readme_has_commands_and_snippets():
    assert len(bash_commands()) >= 15 and len(python_blocks()) >= 2


def test_every_command_is_covered():
    """Every README command form maps to tests, and at least one of them runs in the fast tier (``make test-fast``,
    not marked slow) and carries no skip mark: a form whose only tests are slow, skipped or gone is not covered."""
    forms = {form(tokens): shlex.join(tokens) for tokens in bash_commands()}
    uncovered = sorted(f"{f!r} ({command})" for f, command in forms.items() if f not in COVERAGE)
    assert not uncovered, "README commands that no test runs:\n" + "\n".join(uncovered)
    stale = sorted(set(COVERAGE) - set(forms))
    assert not stale, f"COVERAGE names command forms that README no longer has: {stale}"
    # pytest itself says which of the mapped tests exist (parametrized ids included) and which are in the fast tier.
    test_ids = sorted({test_id for f in forms for test_id in COVERAGE[f]})
    collected = {}
    for tier, marks in (("all", []), ("fast", ["-m", "not slow"])):
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *marks, *test_ids],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        items = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
        # A mapped test without parameters stands for each of its parametrized cases.
        collected[tier] = {t for t in test_ids if t in items or any(i.startswith(t + "[") for i in items)}
    missing = sorted(set(test_ids) - collected["all"])
    assert not missing, f"mapped tests that do not exist: {missing}"

    def skip_marked(test_id):
        path, name = test_id.split("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        marks = []
        for holder in (module, getattr(module, name.split("[")[0])):
            held = getattr(holder, "pytestmark", [])
            marks += held if isinstance(held, list) else [held]
        return any(getattr(m, "name", None) in ("skip", "skipif", "xfail") for m in marks)

    for f in forms:
        fast = [t for t in COVERAGE[f] if t in collected["fast"] and not skip_marked(t)]
        assert fast, f"{f!r}: none of its tests runs in the fast tier unskipped: {COVERAGE[f]}"


def test_every_command_parses_with_its_tool_and_config():
    """Flags parse with the tool's own parser; every override key exists in the config (LazyConfig or YAML)."""
    for tokens in bash_commands():
        tool, args = (tokens[0], tokens[1:]) if tokens[0] == "make" else (tokens[1], tokens[2:])
        assert tool == "make" or (REPO_ROOT / tool).is_file(), tool
        if tool not in PARSERS:
            continue
        parsed = PARSERS[tool]().parse_args(args)
        config = REPO_ROOT / parsed.config_file
        assert config.is_file(), shlex.join(tokens)
        if config.suffix == ".yaml":
            cfg = get_cfg()
            add_tood_config(cfg)
            cfg.merge_from_file(str(config))
            cfg.merge_from_list(parsed.opts)
        else:
            cfg = LazyConfig.load(str(config))
            check_override_keys(cfg, parsed.opts)
            LazyConfig.apply_overrides(cfg, parsed.opts)


def test_make_targets():
    """``make -n`` shows what README's make commands run: the environment set-up first, with the chosen PYTHON."""
    for tokens in bash_commands():
        if tokens[0] != "make":
            continue
        # Without the PYTHON of the environment or of a calling make (make test exports its variables to sub-makes).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        shown = subprocess.run(["make", "-n", *tokens[1:]], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        python = next((t.split("=", 1)[1] for t in tokens if t.startswith("PYTHON=")), "")
        assert lines[0] == f'PYTHON="{python}" bash tools/setup_env.sh', shown.stdout
        target = tokens[1]
        as_avx2 = 'ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m pytest -m "not slow"'
        expected = {
            "quickstart": [".venv/bin/python tools/quickstart.py"],
            "test": [".venv/bin/python -m pytest", as_avx2],
            "test-fast": ['.venv/bin/python -m pytest -m "not slow"'],
            "test-avx2": [as_avx2],
        }
        assert lines[-len(expected[target]) :] == expected[target], shown.stdout
        if target.startswith("test"):
            assert ".venv/bin/python -m ruff format --check ." in lines


def test_the_8_gpu_commands_set_up_the_reference_s_run():
    """The headline training command and its --resume: 8 processes of 2 images make the reference's batch of 16 at
    its learning rate, over its 12 epochs of COCO, writing where the command says; --resume continues from there."""
    for wanted, resume in (("--num-gpus : train.output_dir", False), ("--num-gpus --resume : train.output_dir", True)):
        [tokens] = readme_commands(f"tools/train_net.py [.py] --config-file {wanted}")
        args = argument_parser().parse_args(run_argv(tokens))
        cfg = LazyConfig.apply_overrides(LazyConfig.load(str(REPO_ROOT / args.config_file)), args.opts)
        assert (args.num_gpus, args.resume) == (8, resume)
        assert cfg.dataloader.train.total_batch_size == 16 and cfg.optimizer.lr == 0.01
        assert (cfg.train.max_iter, cfg.model.tal_start_iter) == (12 * 7330, 4 * 7330)
        assert cfg.train.output_dir == option_value(args.opts, "train.output_dir")


def option_value(opts, key):
    return next(o.split("=", 1)[1] for o in opts if o.startswith(key + "="))


def test_fewer_gpus_scale_batch_and_learning_rate():
    """The N-GPU commands: 2 images per GPU, the learning rate linear in the batch from the reference's 16; with YAML,
    Detectron2's REFERENCE_WORLD_SIZE scaling (batch, learning rate, iterations, ATSS warm-up)."""
    [lazy] = readme_commands(next(f for f in COVERAGE if "train.reference_batch_size" in f))
    args = argument_parser().parse_args(run_argv(lazy))
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(REPO_ROOT / args.config_file)), args.opts)
    batch = cfg.dataloader.train.total_batch_size
    assert batch == 2 * args.num_gpus
    scale_learning_rate(cfg)
    assert cfg.optimizer.lr == pytest.approx(0.01 * batch / 16)

    [yaml] = readme_commands(next(f for f in COVERAGE if "SOLVER.REFERENCE_WORLD_SIZE" in f))
    args = argument_parser().parse_args(run_argv(yaml))
    cfg = get_cfg()
    add_tood_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / args.config_file))
    cfg.merge_from_list(args.opts)
    scaled = Trainer.auto_scale_workers(cfg, args.num_gpus)
    factor = args.num_gpus / 8
    assert scaled.SOLVER.IMS_PER_BATCH == 2 * args.num_gpus
    assert scaled.SOLVER.BASE_LR == pytest.approx(0.01 * factor)
    assert scaled.SOLVER.MAX_ITER == round(87960 / factor)
    assert scaled.MODEL.TOOD.TAL_START_ITER == round(29320 / factor)


# --- The scratch folder that README's commands run in -----------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder laid out as README assumes: ``configs/``, the downloaded checkpoints (stand-ins with random weights),
    a COCO-format dataset of NUM_CLASSES categories in ``mine/``, ``photo.jpg`` and ``photos/``."""
    root = tmp_path_factory.mktemp("readme")
    (root / "configs").symlink_to(REPO_ROOT / "configs")

    source = get_shapes_dataset(num_images=6, seed=11, image_size=64, root=tmp_path_factory.mktemp("shapes"))
    coco = json.loads((source / "annotations.json").read_text())
    categories = coco["categories"][:NUM_CLASSES]
    kept = {c["id"] for c in categories}
    annotations = [a for a in coco["annotations"] if a["category_id"] in kept]
    (root / "mine" / "annotations").mkdir(parents=True)
    shutil.copytree(source / "images", root / "mine" / "images")
    for split, images in (("train", coco["images"][:5]), ("val", coco["images"][5:])):
        ids = {i["id"] for i in images}
        split_json = dict(coco, images=images, categories=categories)
        split_json["annotations"] = [a for a in annotations if a["image_id"] in ids]
        (root / "mine" / "annotations" / f"{split}.json").write_text(json.dumps(split_json))
    (root / "photos").mkdir()
    for i, image in enumerate(coco["images"][:2]):
        shutil.copy(source / "images" / image["file_name"], root / ("photo.jpg" if i == 0 else f"photos/{i}.jpg"))

    # The published mmdetection checkpoint: a TOOD R-50 with random weights, in mmdetection's names.
    [convert] = readme_commands("tools/convert_mmdet_to_d2.py --config --input --output")
    cfg = LazyConfig.load(str(REPO_ROOT / option(convert, "--config")))
    cfg.model.tal_start_iter = 0
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    mmdet = {MMDET_TOOD_NAME_MAP.inverse(k): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": mmdet, "meta": {}}, root / option(convert, "--input"))
    # torchvision's ImageNet ResNet-50, random weights.
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), root / "resnet50-0676ba61.pth")
    return root


@pytest.fixture(scope="module", autouse=True)
def _datasets_registered_here_only():
    """README's dataset names, registered by the commands run here, are not left registered for other tests."""

    def drop():
        for name in ("mine_train", "mine_val"):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
            if name in MetadataCatalog.list():
                MetadataCatalog.remove(name)

    drop()
    yield
    drop()


@pytest.fixture(scope="module")
def converted(scratch):
    """README's conversion of the published checkpoint, run in the scratch folder: the converted file's path."""
    [tokens] = readme_commands("tools/convert_mmdet_to_d2.py --config --input --output")
    with contextlib.chdir(scratch):
        assert convert_mmdet_to_d2.main(run_argv(tokens)) == 0
    return scratch / option(tokens, "--output")


@pytest.fixture(scope="module")
def imagenet(scratch):
    """README's conversion of torchvision's ResNet-50, run in the scratch folder: the converted file's path."""
    commands = readme_commands("tools/convert_torchvision_resnet.py")
    tokens = next(t for t in commands if t[2] == "resnet50-0676ba61.pth")
    with contextlib.chdir(scratch):
        convert_torchvision_resnet.main(run_argv(tokens))
    return scratch / tokens[3]


def train_net(scratch, tokens, *extra):
    """tools/train_net.py's main on README's command, in the scratch folder; the run's output folder."""
    with contextlib.chdir(scratch):
        args = argument_parser().parse_args(run_argv(tokens, *extra))
        main(args)
    output = dict(o.split("=", 1) for o in args.opts)["train.output_dir"]
    return scratch / output


@pytest.fixture(scope="module")
def fine_tuned(scratch, converted):
    [tokens] = readme_commands(next(f for f in COVERAGE if "--register-coco" in f and "train.init_checkpoint" in f))
    return train_net(scratch, tokens, *TINY_TRAINING, *TINY_TEST)


def test_convert_a_published_checkpoint(scratch, converted):
    """The converted file holds the published weights under the names of the config's model."""
    [tokens] = readme_commands("tools/convert_mmdet_to_d2.py --config --input --output")
    published = torch.load(scratch / option(tokens, "--input"))["state_dict"]
    ours = torch.load(converted)["model"]
    assert len(ours) == len(published) == 330
    for name, tensor in ours.items():
        assert torch.equal(tensor, published[MMDET_TOOD_NAME_MAP.inverse(name)]), name


def test_imagenet_initialisation(scratch, imagenet):
    """Each conversion command writes the file a zoo config starts from; the R-50 one, run here, loads into it."""
    commands = readme_commands("tools/convert_torchvision_resnet.py")
    expected = {LazyConfig.load(str(p)).train.init_checkpoint for p in (REPO_ROOT / "configs").glob("tood_*.py")}
    assert {tokens[3] for tokens in commands} == expected - {""}
    cfg = LazyConfig.load(str(REPO_ROOT / "configs" / "tood_R_50_1x.py"))
    assert scratch / cfg.train.init_checkpoint == imagenet
    cfg.model.tal_start_iter = 0
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(str(imagenet))
    weights = torch.load(scratch / "resnet50-0676ba61.pth")
    assert torch.equal(model.backbone.bottom_up.res5[2].conv3.weight, weights["layer4.2.conv3.weight"])


def test_train_on_your_own_dataset(scratch, imagenet):
    """The own-dataset command from the ImageNet backbone passes the checks a run starts with, in a folder laid out
    as README says: the datasets register, the epoch length is counted from the annotation file, and a short run is
    told which parts of the schedule it does not reach. (tests/engine/test_schedule.py trains this form.)"""
    own = next(f for f in COVERAGE if "--register-coco" in f and "train.init_checkpoint" not in f)
    [tokens] = readme_commands(own)
    with contextlib.chdir(scratch):
        cfg, notes = load_config(argument_parser().parse_args(run_argv(tokens, *TINY_TRAINING)))
        assert check_weights_file(cfg.train.init_checkpoint, training=True) is None  # README's conversion wrote it
    [(_, train_json, _), _] = registered(tokens)
    with_box = len({a["image_id"] for a in json.loads((scratch / train_json).read_text())["annotations"]})
    assert cfg.train.iters_per_epoch == math.ceil(with_box / 2) and cfg.model.num_classes == NUM_CLASSES
    notes = "\n".join(notes)
    assert f"ceil({with_box} images / batch 2) = {math.ceil(with_box / 2)} iterations" in notes
    assert "lies past train.max_iter=1: not reached" in notes


def test_fine_tune_from_the_converted_coco_model(scratch, converted, fine_tuned):
    """Every tensor of the 80-class COCO model is loaded but the classifier, which keeps its initialisation (a
    warning lists it); the frozen stem is still the COCO model's after training."""
    log = (fine_tuned / "log.txt").read_text()
    assert f"head.cls_score.weight: (80, 256, 3, 3) in the checkpoint, ({NUM_CLASSES}, 256, 3, 3) in the model" in log
    assert "keep their initialisation" in log
    final = torch.load(fine_tuned / "model_final.pth")["model"]
    coco = torch.load(converted)["model"]
    assert final["head.cls_score.weight"].shape[0] == NUM_CLASSES
    assert torch.equal(final["backbone.bottom_up.stem.conv1.weight"], coco["backbone.bottom_up.stem.conv1.weight"])
    assert not torch.equal(final["backbone.fpn_output3.weight"], coco["backbone.fpn_output3.weight"])  # trained


def test_evaluate_the_converted_model_with_yaml(scratch, converted):
    """README's YAML --eval-only command, up to evaluation: its config builds the model that the converted file fits
    exactly (loaded strictly, as evaluation loads), every tensor taken from the file."""
    [tokens] = readme_commands("tools/train_net.py [.yaml] --config-file --eval-only : MODEL.WEIGHTS")
    args = argument_parser().parse_args(run_argv(tokens))
    assert args.eval_only
    cfg = get_cfg()
    add_tood_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / args.config_file))
    cfg.merge_from_list([*args.opts, "MODEL.DEVICE", "cpu"])
    model = Trainer.build_model(cfg)
    with contextlib.chdir(scratch):
        assert Path(cfg.MODEL.WEIGHTS).resolve() == converted.resolve()
        TOODCheckpointer(model, strict=True).load(cfg.MODEL.WEIGHTS)
        saved = torch.load(cfg.MODEL.WEIGHTS, weights_only=False)["model"]
    state = model.state_dict()
    assert sorted(saved) == sorted(state)
    assert all(torch.equal(state[k], torch.as_tensor(v)) for k, v in saved.items())


def test_demo(scratch, converted, fine_tuned):
    """Both demo commands draw on every input; the registered dataset's categories label the fine-tuned model's."""
    for tokens in bash_commands():
        if tokens[:2] != [PYTHON, "tools/demo.py"]:
            continue
        with contextlib.chdir(scratch):
            written = demo.main(demo.argument_parser().parse_args(run_argv(tokens, *TINY_TEST)))
        inputs = demo.argument_parser().parse_args(run_argv(tokens)).input
        expected = sorted({Path(p).name for pattern in inputs for p in scratch.glob(pattern)})
        assert sorted(Path(p).name for p in written) == expected and len(expected) >= 1
        for path in written:
            assert cv2.imread(str(scratch / path)).shape == (64, 64, 3)
    names = [c["name"] for c in json.loads((scratch / "mine/annotations/val.json").read_text())["categories"]]
    assert dataset_metadata("mine_val").thing_classes == names


def test_python_snippets(scratch, converted):
    """Each ```python block predicts on photo.jpg with the converted COCO model."""
    coco = torch.load(converted)["model"]
    photo = cv2.imread(str(scratch / "photo.jpg"))
    for code in python_blocks():
        namespace = {}
        with contextlib.chdir(scratch):
            exec(compile(code, "README.md", "exec"), namespace)
        instances, model = namespace["instances"], namespace["predictor"].model
        assert isinstance(instances, Instances) and instances.image_size == photo.shape[:2]
        state = model.state_dict()
        for name in ("backbone.bottom_up.stem.conv1.weight", "head.cls_score.weight"):
            assert torch.equal(state[name].cpu(), coco[name]), name
        if "names" in namespace:
            assert len(namespace["names"]) == len(instances)
