"""TOOD: Task-aligned One-stage Object Detection, for Detectron2."""
