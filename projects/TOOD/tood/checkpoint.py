"""Checkpoints that a crash cannot corrupt, and loading that says what does not fit.

:class:`TOODCheckpointer` is Detectron2's ``DetectionCheckpointer`` plus:

* atomic files: a checkpoint, and then ``last_checkpoint``, is written to a temporary file in the same folder,
  flushed to disk and renamed over its name (fvcore writes in place). A crash or kill at any moment leaves each
  file either as it was or complete, and ``last_checkpoint`` names only complete files;
* no checkpoint of weights holding NaN or inf, so that the last checkpoint of a diverged run is a good one;
* strict loading when resuming (and, with ``strict=True``, when evaluating): a checkpoint whose tensors do not fit
  the model is refused with the tensors that differ and what to do; a checkpoint of which no tensor fits is
  always refused.

Every job starts from its weights one way: :func:`weights_to_load` decides which file a job loads and checks it
(the pre-flight check of a run calls it before anything is built), :func:`load_weights` loads it. A training job's
checkpointer is built with its inner loop (:func:`tood.engine.train_loop.build_trainer`); an evaluation's or a
prediction's by :func:`load_trained_model`.

Checkpoints go to local folders (``save_dir`` is a path, not a PathManager URL).
"""

import glob
import os
import tempfile
from typing import Callable, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "TOODCheckpointer",
    "atomic_write",
    "check_weights_file",
    "last_checkpoint",
    "load_trained_model",
    "load_weights",
    "weights_to_load",
]

_PARTIAL = ".partial"  # suffix of the temporary files of atomic_write
_LISTED = 10  # tensors named in a mismatch message


def atomic_write(path: str, write: Callable) -> None:
    """Creates or replaces ``path`` with what ``write(binary file)`` writes, all at once.

    The data goes to a hidden ``.NAME.*.partial`` file in the same folder (a rename is atomic only within one file
    system), is flushed and fsynced, and the file is renamed over ``path``; the folder is then fsynced, which makes
    the rename itself durable.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=_PARTIAL, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _shapes(items: List[Tuple[str, tuple, tuple]]) -> List[str]:
    return [f"  {k}: {tuple(c)} in the checkpoint, {tuple(m)} in the model" for k, c, m in items[:_LISTED]]


def _examples(keys: List[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_LISTED]) + (f", ... ({len(keys)} in all)" if len(keys) > _LISTED else "")


class TOODCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, finite weights and explained loading (see the module docstring)."""

    def __init__(self, model, save_dir: str = "", *, strict: bool = False, save_to_disk=None, **checkpointables):
        """
        Args:
            model, save_dir, save_to_disk, checkpointables: as :class:`DetectionCheckpointer`.
            strict: refuse any checkpoint that does not fit the model exactly, also when only initialising weights
                (evaluation). Resuming (loading the checkpointables too) is always strict. Otherwise tensors of
                another shape keep their initialisation, with a warning, as fine-tuning to other classes needs.
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict
        self._loading = ("", strict)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        bad = [k for k, v in data["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            last = self.get_checkpoint_file() if self.has_checkpoint() else "none"
            raise FloatingPointError(
                f"Not saving {save_file}: the weights hold NaN or inf ({_examples(bad)}). "
                f"The last good checkpoint is {last}."
            )
        # Leftovers of writes that a kill interrupted.
        for partial in glob.glob(os.path.join(glob.escape(self.save_dir), f".*{_PARTIAL}")):
            os.remove(partial)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename.encode()))

    def last_iteration(self) -> int:
        """The iteration stored in the checkpoint that ``last_checkpoint`` names (-1 if none)."""
        return saved_iteration(self.get_checkpoint_file()) if self.has_checkpoint() else -1

    def load(self, path: str, checkpointables=None):
        # fvcore's resume_or_load passes checkpointables=None when resuming and [] when only loading weights.
        self._loading = (path, self.strict or checkpointables is None)
        return super().load(path, checkpointables=checkpointables)

    def _load_model(self, checkpoint):
        num_in_checkpoint = len(checkpoint["model"])
        model_keys = list(self.model.state_dict())
        incompatible = super()._load_model(checkpoint)
        path, strict = self._loading
        shapes, missing = incompatible.incorrect_shapes, incompatible.missing_keys
        unexpected = incompatible.unexpected_keys
        if num_in_checkpoint - len(unexpected) - len(shapes) <= 0 < len(model_keys):
            raise ValueError(
                f"No tensor of {path} fits the model: it holds {_examples(unexpected)}, the model has "
                f"{_examples(model_keys)}. It is a checkpoint of another architecture, or needs converting first "
                "(tools/convert_mmdet_to_d2.py for mmdetection TOOD weights, tools/convert_torchvision_resnet.py "
                "for torchvision ResNets)."
            )
        if not (shapes or (strict and (missing or unexpected))):
            return incompatible
        lines = [f"Checkpoint {path} does not fit the model built from the config:", *_shapes(shapes)]
        if len(shapes) > _LISTED:
            lines.append(f"  ... {len(shapes) - _LISTED} more tensors of other shapes")
        if missing:
            lines.append(f"  not in the checkpoint: {_examples(missing)}")
        if unexpected:
            lines.append(f"  not in the model: {_examples(unexpected)}")
        classes = {c[0] for k, c, _ in shapes if k.endswith("cls_score.weight")}
        if classes:
            lines.append(
                f"Its classifier predicts {classes.pop()} classes: to use it as it is, set model.num_classes to that; "
                f"to train another number of classes from it, use train.init_checkpoint={path} with a new "
                "train.output_dir (the classifier is then initialised afresh)."
            )
        else:
            lines.append(
                "It was saved from another model: use the config (and overrides) it was trained with, or a new "
                "train.output_dir when this config is meant."
            )
        if strict:
            raise ValueError("\n".join(lines))
        self.logger.warning("\n".join(lines + ["The tensors of other shapes keep their initialisation."]))
        return incompatible


def last_checkpoint(save_dir: str) -> str:
    """The checkpoint that ``save_dir``'s ``last_checkpoint`` names; "" if there is none."""
    tag = os.path.join(save_dir, "last_checkpoint") if save_dir else ""
    if not os.path.isfile(tag):
        return ""
    with open(tag) as f:
        return os.path.join(save_dir, f.read().strip())


def saved_iteration(path: str) -> int:
    """The iteration stored in the checkpoint ``path`` (-1 if none), read without loading its tensors."""
    return int(torch.load(path, map_location="cpu", mmap=True).get("iteration", -1))


def weights_to_load(
    path: str, save_dir: str = "", *, resume: bool = False, training: bool = True, key: str = "train.init_checkpoint"
) -> str:
    """The file a job starts from: with ``resume``, the last checkpoint of ``save_dir`` if there is one; otherwise
    the weights file ``path`` ("" for none), which must exist (:func:`check_weights_file`, with ``training``'s
    advice and ``key``'s name)."""
    resumed = last_checkpoint(save_dir) if resume else ""
    if not resumed:
        check_weights_file(path, training, key)
    return resumed or path


def load_weights(
    checkpointer: TOODCheckpointer, path: str, *, resume: bool = False, key: str = "train.init_checkpoint"
) -> bool:
    """Loads into ``checkpointer``'s model what its job starts from (:func:`weights_to_load`).

    Resuming loads the last checkpoint of the checkpointer's folder with its checkpointables (the trainer's
    iteration, optimizer and schedule), strictly. Otherwise the weights of ``path``: strictly for a strict
    checkpointer (evaluation, prediction); for training, tensors of other shapes keep their initialisation.

    Returns:
        whether it resumed.
    """
    file = weights_to_load(path, checkpointer.save_dir, resume=resume, training=not checkpointer.strict, key=key)
    resuming = resume and checkpointer.has_checkpoint()
    checkpointer.load(file, checkpointables=None if resuming else [])  # None: all of them
    return resuming


def load_trained_model(
    model, path: str, *, save_dir: str = "", resume: bool = False, key: str = "train.init_checkpoint"
):
    """Loads trained weights into ``model`` to evaluate or predict: ``path``'s, or with ``resume`` the last
    checkpoint of ``save_dir``; they must fit it exactly (:func:`load_weights`)."""
    load_weights(TOODCheckpointer(model, save_dir, strict=True), path, resume=resume, key=key)


def check_weights_file(path: str, training: bool, key: str = "train.init_checkpoint") -> None:
    """Raises FileNotFoundError, naming the file and the ways forward, if the local weights file ``path`` is absent.

    Args:
        path: ``train.init_checkpoint``; "" (no weights) and URLs (``detectron2://``, ``https://``) pass.
        training: the advice differs: ImageNet weights to start training from, or a trained model to evaluate.
        key: the config key that names the file (``MODEL.WEIGHTS`` in a YAML config).
    """
    if not path or "://" in path or os.path.isfile(path):
        return
    if training:
        forward = (
            "convert ImageNet weights into it (tools/convert_torchvision_resnet.py, see README's model zoo), "
            f'or train from scratch with {key}="" and trainable norms (e.g. '
            "configs/quickstart_shapes.py's BatchNorm backbone: FrozenBN and frozen-statistics BN only suit "
            "pretrained weights)"
        )
    else:
        forward = (
            f"point {key} at a trained model (e.g. OUTPUT_DIR/model_final.pth, or --resume for the "
            "last checkpoint of train.output_dir), or convert an mmdetection TOOD checkpoint with "
            "tools/convert_mmdet_to_d2.py"
        )
    raise FileNotFoundError(f"{key}={path} does not exist. Either {forward}.")
