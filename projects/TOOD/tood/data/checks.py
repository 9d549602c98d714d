"""Checks of training data: bad images, annotations and COCO json files are explained or handled as documented.

What happens (docs/troubleshooting.md):

* image file missing, unreadable, truncated, or of another size than its record says: an error naming the file;
  in training with :class:`CheckedDatasetMapper` ``on_bad_image="skip"``, a warning naming it and another image
  instead (Detectron2's MapDataset retries with a random other index);
* annotation json missing, not valid JSON, or not COCO (missing fields, duplicate ids, unknown category ids,
  malformed boxes): an error naming the file, and the image and annotation ids;
* box of zero or negative width or height, or wholly outside its image: dropped; box partly outside its image:
  clipped to it; crowd box: ignored in training (as Detectron2's DatasetMapper); counted in one log line per
  dataset (:func:`check_annotations`);
* image without annotations (or left without boxes): a negative in training when
  ``get_checked_dataset_dicts(filter_empty=False)``; ``filter_empty=True`` (the reference's ``filter_empty_gt``)
  drops images with no annotations or only crowd ones, as Detectron2 does;
* any number of boxes per image: kept (the assigners bound their memory by chunking ground truth).
"""

import difflib
import json
import logging
import math
import numbers
import os
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Union

from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations, print_instances_class_histogram
from detectron2.data.datasets import load_coco_json
from detectron2.data.detection_utils import SizeMismatchError, check_metadata_consistency
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n
from PIL import UnidentifiedImageError

__all__ = [
    "CheckedDatasetMapper",
    "DataError",
    "DatasetNotRegisteredError",
    "check_annotations",
    "check_registered",
    "get_checked_dataset_dicts",
    "load_checked_coco_json",
    "register_checked_coco",
    "validate_coco_json",
]

logger = logging.getLogger(__name__)

# Problems listed in one error; the count of the rest follows.
_MAX_LISTED = 10
# on_bad_image="skip" gives up when this many images fail before any succeeds.
_MAX_SKIPPED_FIRST = 20


class DataError(ValueError):
    """Unusable data; the message names the file, and the annotation where there is one."""


class DatasetNotRegisteredError(KeyError):
    def __str__(self):  # KeyError's own would show the message's repr
        return str(self.args[0])


def check_registered(names: Union[str, Sequence[str]], where: str = "dataset names") -> None:
    """Raises :class:`DatasetNotRegisteredError`, with close matches and the registered names, for an unknown name."""
    registered = DatasetCatalog.list()
    for name in [names] if isinstance(names, str) else names:
        if name in registered:
            continue
        close = difflib.get_close_matches(name, registered, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise DatasetNotRegisteredError(
            f"Dataset '{name}' ({where}) is not registered.{hint} Register a COCO-format dataset with "
            f"tools/train_net.py --register-coco {name} JSON_FILE IMAGE_ROOT (in code: "
            f"tood.data.checks.register_checked_coco). Registered datasets: {', '.join(sorted(registered))}."
        )


# --- COCO json ---------------------------------------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_entries(problems: List[str], entries, what: str, required: Dict[str, type]) -> Dict:
    """Entries by id; appends a problem for each entry without a required field, or with a duplicate id."""
    by_id = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"{what}[{i}] is not an object")
            continue
        missing = [k for k, t in required.items() if not isinstance(entry.get(k), t) or isinstance(entry[k], bool)]
        if missing:
            problems.append(f"{what}[{i}] (id {entry.get('id')}) has no valid {', '.join(missing)}")
        elif entry["id"] in by_id:
            problems.append(f"{what} id {entry['id']} is used twice")
        else:
            by_id[entry["id"]] = entry
    return by_id


def validate_coco_json(json_file: str) -> List[str]:
    """What makes ``json_file`` unusable as COCO instances annotations; an empty list if nothing does.

    Checks what Detectron2's ``load_coco_json`` needs, and the boxes: images with ``id``, ``file_name``, ``width``
    and ``height``; categories with ``id`` and ``name``; annotations with a unique ``id``, a ``category_id`` among
    the categories and a ``bbox`` of 4 finite numbers. Annotations of images that are not listed are only warned
    about (Detectron2 ignores them); boxes of zero size or outside their image are :func:`check_annotations`'s.
    """
    try:
        with open(json_file, "rb") as f:
            text = f.read()
    except OSError as e:
        return [f"cannot read {json_file}: {e.strerror or e}"]
    try:
        coco = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if isinstance(e, json.JSONDecodeError):
            where = f"{e.msg} (line {e.lineno}, column {e.colno})"
            if e.pos >= len(text.rstrip()) - 1 or e.msg.startswith("Unterminated string"):
                where += "; the file ends early: truncated?"
        else:
            where = str(e)
        return [f"{json_file} is not valid JSON: {where}"]
    if not isinstance(coco, dict):
        return [f"{json_file} holds a JSON {type(coco).__name__}, not a COCO object with images and categories"]
    problems = []
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            problems.append(f"{json_file} has no '{key}' list")
    if "annotations" in coco and not isinstance(coco["annotations"], list):
        problems.append(f"{json_file}: 'annotations' is not a list")
    if problems:
        return problems
    images = _check_entries(
        problems, coco["images"], "images", {"id": int, "file_name": str, "width": (int, float), "height": (int, float)}
    )
    categories = _check_entries(problems, coco["categories"], "categories", {"id": int, "name": str})
    if not categories:
        problems.append("no categories")
    seen, orphans = set(), []
    for i, ann in enumerate(coco.get("annotations", [])):
        if not isinstance(ann, dict):
            problems.append(f"annotations[{i}] is not an object")
            continue
        name = f"annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        if "id" not in ann:
            problems.append(f"annotations[{i}] has no id")
        elif ann["id"] in seen:
            problems.append(f"annotation id {ann['id']} is used twice")
        seen.add(ann.get("id"))
        if ann.get("image_id") not in images:
            orphans.append(str(ann.get("id")))
        if ann.get("category_id") not in categories:
            problems.append(
                f"{name}: category_id {ann.get('category_id')!r} is not among the categories {sorted(categories)}"
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(x) for x in bbox)):
            problems.append(f"{name}: bbox {bbox!r} is not [x, y, width, height] of 4 finite numbers")
    if orphans:
        logger.warning(
            f"{json_file}: {len(orphans)} annotations refer to images that are not listed (ignored), "
            f"e.g. annotation ids {', '.join(orphans[:5])}"
        )
    return [f"{json_file}: {p}" for p in problems]


def load_checked_coco_json(json_file: str, image_root: str, dataset_name: str) -> List[Dict]:
    """Detectron2's ``load_coco_json`` (keeping annotation ids for later messages); on failure an error that says
    what is wrong with the file (:func:`validate_coco_json`)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Annotation file {json_file} of dataset '{dataset_name}' does not exist")
    try:
        return load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    except Exception as e:
        # The json is read a second time only to explain the failure.
        problems = validate_coco_json(json_file)
        if not problems:
            raise
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(
            f"Dataset '{dataset_name}': {json_file} is not usable COCO annotations:\n  "
            + "\n  ".join(problems[:_MAX_LISTED])
            + more
        ) from e


def register_checked_coco(name: str, json_file: str, image_root: str) -> None:
    """``register_coco_instances(name, {}, json_file, image_root)`` with the files checked: their absence now, the
    json's content when the dataset is first loaded (:func:`load_checked_coco_json`)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Cannot register dataset '{name}': annotation file {json_file} does not exist")
    if not os.path.isdir(image_root):
        raise NotADirectoryError(f"Cannot register dataset '{name}': image folder {image_root} does not exist")
    DatasetCatalog.register(name, lambda: load_checked_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


# --- annotations of dataset dicts --------------------------------------------------------------------------


def _where(record: Dict, index: int, anno: Dict) -> str:
    ann = f"annotation id {anno['id']}" if "id" in anno else f"annotation #{index}"
    return f"{record.get('file_name')} (image id {record.get('image_id')}), {ann}"


def _xyxy(record: Dict, index: int, anno: Dict) -> List[float]:
    bbox, mode = anno.get("bbox"), anno.get("bbox_mode")
    try:
        values = [float(x) for x in bbox]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4 or not all(math.isfinite(x) for x in values):
        raise DataError(f"{_where(record, index, anno)}: bbox {bbox!r} is not 4 finite numbers")
    if mode not in (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS):
        raise DataError(f"{_where(record, index, anno)}: bbox_mode {mode!r} is not XYXY_ABS or XYWH_ABS")
    return BoxMode.convert(values, mode, BoxMode.XYXY_ABS)


def check_annotations(dataset_dicts: List[Dict], num_classes: Optional[int] = None, dataset: str = "") -> List[Dict]:
    """Applies the box policy of the module docstring to Detectron2 dataset dicts; logs what it changed.

    Args:
        dataset_dicts: records with "annotations" (records without are returned as they are).
        num_classes: the contiguous category ids must lie in ``[0, num_classes)``; not checked if None.
        dataset: name(s) for the log.

    Returns:
        The records, copied where an annotation was dropped or clipped (the input is not modified); kept boxes of
        changed records are XYXY_ABS.

    Raises:
        DataError: naming the file, image and annotation, for a malformed box or an unknown category.
    """
    counts, examples = Counter(), defaultdict(list)

    def note(what, where):
        counts[what] += 1
        if len(examples[what]) < 3:
            examples[what].append(where)

    out = []
    for record in dataset_dicts:
        annos = record.get("annotations")
        if annos is None:
            out.append(record)
            continue
        kept, changed = [], False
        for index, anno in enumerate(annos):
            box = _xyxy(record, index, anno)
            category = anno.get("category_id")
            if num_classes is not None and not (isinstance(category, numbers.Integral) and 0 <= category < num_classes):
                raise DataError(
                    f"{_where(record, index, anno)}: category_id {category!r} is not one of the dataset's "
                    f"{num_classes} classes (contiguous ids 0..{num_classes - 1})"
                )
            if anno.get("iscrowd", 0):
                counts["crowd"] += 1
                kept.append(anno)
                continue
            x0, y0, x1, y1 = box
            if x1 <= x0 or y1 <= y0:
                note("degenerate", _where(record, index, anno))
                changed = True
                continue
            width, height = record.get("width"), record.get("height")
            if width and height:
                clipped = [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]
                if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                    note("outside", _where(record, index, anno))
                    changed = True
                    continue
                if clipped != box:
                    note("clipped", _where(record, index, anno))
                    anno = dict(anno, bbox=clipped, bbox_mode=BoxMode.XYXY_ABS)
                    changed = True
            kept.append(anno)
        if not any(not a.get("iscrowd", 0) for a in kept):
            counts["no boxes"] += 1
        out.append(dict(record, annotations=kept) if changed else record)

    name = f"Dataset {dataset}" if dataset else "Dataset"
    dropped = [
        f"dropped {counts[k]} boxes {what} (e.g. {'; '.join(examples[k])})"
        for k, what in (("degenerate", "of zero or negative size"), ("outside", "wholly outside their image"))
        if counts[k]
    ]
    if counts["clipped"]:
        dropped.append(f"clipped {counts['clipped']} boxes to their image (e.g. {'; '.join(examples['clipped'])})")
    if dropped:
        logger.warning(f"{name}: " + ", ".join(dropped))
    logger.info(
        f"{name}: {len(out)} images, {counts['crowd']} crowd boxes (ignored in training), "
        f"{counts['no boxes']} images without boxes"
    )
    return out


def get_checked_dataset_dicts(names: Union[str, Sequence[str]], filter_empty: bool = True) -> List[Dict]:
    """Detectron2's ``get_detection_dataset_dicts`` with :func:`check_registered` and :func:`check_annotations`.

    Args:
        names: registered dataset name(s).
        filter_empty: drop images without non-crowd boxes (after the checks dropped boxes); False keeps them as
            negatives.
    """
    names = [names] if isinstance(names, str) else list(names)
    check_registered(names)
    dicts = get_detection_dataset_dicts(names, filter_empty=False, check_consistency=False)
    if dicts and "annotations" not in dicts[0]:
        return dicts
    classes = MetadataCatalog.get(names[0]).get("thing_classes")
    if classes is not None:
        check_metadata_consistency("thing_classes", names)
    dicts = check_annotations(dicts, None if classes is None else len(classes), ", ".join(names))
    if filter_empty:
        dicts = filter_images_with_only_crowd_annotations(dicts)
        if not dicts:
            raise DataError(f"No image of {', '.join(names)} has a usable box (filter_empty=True)")
    if classes is not None:
        print_instances_class_histogram(dicts, classes)
    return dicts


# --- images ------------------------------------------------------------------------------------------------


def _describe(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "the file does not exist"
    if isinstance(error, UnidentifiedImageError):
        return "not a readable image (empty, corrupt, or a format PIL cannot read)"
    if isinstance(error, SizeMismatchError):
        return str(error)
    if "truncated" in str(error).lower():
        return f"the file is truncated ({error})"
    return f"{type(error).__name__}: {error}"


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper that names the image it cannot use, and in training may skip it.

    Training also drops boxes of zero or negative size before augmenting (Detectron2's transforms take the
    min and max of the transformed corners, which turns a negative box into a positive one); datasets from
    :func:`get_checked_dataset_dicts` have none left.
    """

    @configurable
    def __init__(self, is_train: bool, *, on_bad_image: str = "raise", **kwargs):
        """
        Args:
            is_train, kwargs: as :class:`DatasetMapper`.
            on_bad_image: an image that is missing, unreadable, truncated or of another size than its record:
                "raise" a :class:`DataError` naming it, or "skip" it with a warning (training only: evaluation
                must see every image).
        """
        super().__init__(is_train, **kwargs)
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        if on_bad_image == "skip" and not is_train:
            raise ValueError("on_bad_image='skip' is for training: evaluation must see every image")
        self.on_bad_image = on_bad_image
        self.num_mapped = self.num_skipped = 0

    def __call__(self, dataset_dict):
        if self.is_train and dataset_dict.get("annotations"):
            dataset_dict = self._without_degenerate_boxes(dataset_dict)
        try:
            mapped = super().__call__(dataset_dict)
        except (OSError, SizeMismatchError) as e:
            file_name, reason = dataset_dict.get("file_name"), _describe(e)
            if self.on_bad_image == "raise":
                hint = " or set dataloader.train.mapper.on_bad_image=skip" if self.is_train else ""
                raise DataError(f"Cannot use image {file_name}: {reason}. Fix or remove it{hint}.") from e
            self.num_skipped += 1
            if self.num_mapped == 0 and self.num_skipped >= _MAX_SKIPPED_FIRST:
                # Nothing readable at all is a wrong path rather than a few bad files.
                raise DataError(
                    f"The first {self.num_skipped} images of this data loader process were all unusable, the last "
                    f"{file_name}: {reason}. Check the dataset's image folder."
                ) from e
            logger.warning(
                f"Skipped image {file_name}: {reason} (on_bad_image='skip'; {self.num_skipped} skipped so far "
                "by this data loader process)"
            )
            return None
        self.num_mapped += 1
        return mapped

    @staticmethod
    def _without_degenerate_boxes(dataset_dict: Dict) -> Dict:
        annos = dataset_dict["annotations"]
        kept = []
        for index, anno in enumerate(annos):
            x0, y0, x1, y1 = _xyxy(dataset_dict, index, anno)
            if x1 > x0 and y1 > y0:
                kept.append(anno)
        if len(kept) == len(annos):
            return dataset_dict
        log_first_n(
            logging.WARNING,
            f"Dropped {len(annos) - len(kept)} boxes of zero or negative size of {dataset_dict.get('file_name')}",
            n=5,
            name=__name__,
        )
        return dict(dataset_dict, annotations=kept)
