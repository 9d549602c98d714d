"""Installs the ``tood`` package (projects/TOOD/tood) for TOOD on Detectron2, and the checkout's ``benchmarks`` and
``studies`` (the measurements that tools/benchmark*.py, tools/analyze_alignment.py and tools/accuracy_study.py run).

Use ``make test`` / ``make quickstart`` (they run tools/setup_env.sh): detectron2 is not on PyPI, so it
cannot be an install requirement here; tools/setup_env.sh provides it and pins torch.
"""

from setuptools import find_packages, setup

setup(
    name="tood",
    version="0.1.0",
    description="TOOD (Task-aligned One-stage Object Detection) for Detectron2",
    license="Apache-2.0",
    package_dir={"": "projects/TOOD", "benchmarks": "benchmarks", "studies": "studies"},
    packages=[*find_packages("projects/TOOD"), "benchmarks", "studies"],
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
