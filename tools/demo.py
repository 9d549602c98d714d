#!/usr/bin/env python
"""Run a trained model on images, folders, globs or a video, and write the detections drawn on them.

Detectron2's demo/demo.py for LazyConfig files: the config gives the model, the test-time resize and the
dataset whose class names label the boxes; ``train.init_checkpoint`` (in ``--opts``) gives the weights.

Examples::

    tools/demo.py --config-file configs/quickstart_shapes.py --input photo.jpg 'shots/*.png' folder/ \\
        --output output/demo --opts train.init_checkpoint=output/quickstart/model_final.pth
    tools/demo.py --config-file configs/tood_R_50_1x.py --video-input clip.mp4 --output output/demo \\
        --opts train.init_checkpoint=tood_r50_1x.pth train.device=cpu
"""

import argparse
import glob
import os
from typing import List

import cv2
import torch
import tqdm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer
from train_net import register_coco_datasets

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def dataset_metadata(names):
    """Metadata of the (first) test dataset, with ``thing_classes``."""
    name = names if isinstance(names, str) else names[0]
    metadata = MetadataCatalog.get(name)
    if metadata.get("thing_classes") is None:
        DatasetCatalog.get(name)  # a COCO json dataset sets its class names when it is loaded
    return metadata


class Predictor:
    """The model of a LazyConfig with its weights, on one BGR image (as cv2 reads it), like DefaultPredictor.

    The image is converted to the model's input format and resized by the test loader's augmentations;
    predictions come back in the coordinates of the given image.
    """

    def __init__(self, cfg):
        if not cfg.train.init_checkpoint:
            raise ValueError("No weights: set train.init_checkpoint=/path/to/model.pth")
        self.model = instantiate(cfg.model).to(cfg.train.device).eval()
        DetectionCheckpointer(self.model).load(cfg.train.init_checkpoint)
        self.augmentations = T.AugmentationList(list(instantiate(cfg.dataloader.test.mapper.augmentations)))
        self.input_format = cfg.dataloader.test.mapper.image_format
        self.metadata = dataset_metadata(cfg.dataloader.test.dataset.names)

    @torch.no_grad()
    def __call__(self, image_bgr):
        """(H, W, 3) uint8 BGR -> Instances."""
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        tensor = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))
        inputs = {"image": tensor, "height": image.shape[0], "width": image.shape[1]}
        return self.model([inputs])[0]["instances"].to("cpu")


def expand_inputs(patterns) -> List[str]:
    """Files named, matched by a glob, or found (with an image extension) in a folder, in a stable order."""
    paths = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            paths += sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif glob.has_magic(pattern):
            paths += sorted(glob.glob(pattern))
        else:
            paths.append(pattern)
    return paths


def run_on_images(predictor, paths, output_dir, confidence_threshold) -> List[str]:
    """Draws the detections scoring at least ``confidence_threshold`` on each image; returns the files written."""
    os.makedirs(output_dir, exist_ok=True)
    written = []
    progress = tqdm.tqdm(paths, desc="images", unit="img", disable=len(paths) < 2)
    for path in progress:
        image = read_image(path, format="BGR")
        instances = predictor(image)
        instances = instances[instances.scores >= confidence_threshold]
        visualizer = Visualizer(image[:, :, ::-1], predictor.metadata, instance_mode=ColorMode.IMAGE)
        out_path = os.path.join(output_dir, os.path.basename(path))
        visualizer.draw_instance_predictions(instances).save(out_path)
        progress.set_postfix(detections=len(instances))
        written.append(out_path)
    return written


def run_on_video(predictor, video_path, output_path, confidence_threshold) -> str:
    """Draws the detections on every frame of ``video_path`` into an mp4 at ``output_path``."""
    video = cv2.VideoCapture(video_path)
    if not video.isOpened():
        raise FileNotFoundError(f"Cannot open video {video_path}")
    width, height = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer = cv2.VideoWriter(output_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    visualizer = VideoVisualizer(predictor.metadata, ColorMode.IMAGE)
    try:
        with tqdm.tqdm(total=num_frames, desc="frames", unit="frame") as progress:
            while True:
                ok, frame = video.read()
                if not ok:
                    break
                instances = predictor(frame)
                instances = instances[instances.scores >= confidence_threshold]
                vis = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
                writer.write(vis.get_image()[:, :, ::-1])
                progress.update(1)
    finally:
        video.release()
        writer.release()
    return output_path


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples::" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file of the model")
    parser.add_argument("--input", nargs="+", default=[], help="images, folders of images or quoted globs")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument(
        "--output",
        default="output/demo",
        help="folder for the drawn images or video (default: %(default)s); a file name for one video",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (for its class names, via dataloader.test.dataset.names=NAME)",
    )
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides, key=value")
    return parser


def main(args):
    if not args.input and not args.video_input:
        raise SystemExit("Nothing to do: give --input and/or --video-input")
    setup_logger(name="fvcore")
    logger = setup_logger()
    register_coco_datasets(args.register_coco)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    predictor = Predictor(cfg)

    written = []
    if args.input:
        paths = expand_inputs(args.input)
        if not paths:
            raise FileNotFoundError(f"No image found in {args.input}")
        written += run_on_images(predictor, paths, args.output, args.confidence_threshold)
    if args.video_input:
        output = args.output
        if not output.lower().endswith(".mp4"):
            os.makedirs(output, exist_ok=True)
            output = os.path.join(output, os.path.splitext(os.path.basename(args.video_input))[0] + ".mp4")
        written.append(run_on_video(predictor, args.video_input, output, args.confidence_threshold))
    logger.info(f"Wrote {len(written)} file(s) to {os.path.dirname(written[0]) or '.'}")
    return written


if __name__ == "__main__":
    main(argument_parser().parse_args())
