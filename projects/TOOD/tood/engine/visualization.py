"""Drawing a model's detections on images and videos (tools/demo.py, the quick start)."""

import glob
import os
from typing import List

import cv2
import tqdm
from detectron2.data.detection_utils import read_image
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "run_on_images", "run_on_video"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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
