"""Installs the ``tood`` package (projects/TOOD/tood) for TOOD on Detectron2.

Use ``make test`` / ``make quickstart`` (they run tools/setup_env.sh): detectron2 is not on PyPI, so it
cannot be an install requirement here; tools/setup_env.sh provides it and pins torch.
"""

from setuptools import find_packages, setup

setup(
    name="tood",
    version="0.1.0",
    description="TOOD (Task-aligned One-stage Object Detection) for Detectron2",
    license="Apache-2.0",
    package_dir={"": "projects/TOOD"},
    packages=find_packages("projects/TOOD"),
    python_requires=">=3.11",
    install_requires=[
        "torch>=1.10",
        "torchvision>=0.11",
        "numpy",
        "Pillow",
        "pycocotools>=2.0.2",
        "fvcore",
        "opencv-python-headless",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "ruff", "onnx", "onnxruntime", "onnxscript"],
        "export": ["onnx", "onnxruntime", "onnxscript"],
    },
)
