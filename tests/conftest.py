import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and developers have the shared reference data beside the checkout; TOOD_ORACLE_DIR overrides.
ORACLE_DIR = Path(os.environ.get("TOOD_ORACLE_DIR", REPO_ROOT.parent / "shared" / "oracle"))


def _load_oracle(name):
    """The reference file ``name``; a user's clone without it skips the test, CI (``CI`` set) fails it."""
    path = ORACLE_DIR / name
    if not path.is_file():
        reason = f"reference file {path} is absent (set TOOD_ORACLE_DIR to the folder holding {name})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must have ../shared/oracle beside the checkout", pytrace=False)
        pytest.skip(reason)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def head_oracle():
    """mmdetection 3.3's TOOD head outputs, targets, losses and gradients (see shared/oracle/README.md)."""
    return _load_oracle("tood_head_mmdet_seed0.pt")


@pytest.fixture(scope="session")
def e2e_oracle():
    """mmdetection 3.3's full TOOD R-50 detector on the astronaut photo (see shared/oracle/README.md)."""
    return _load_oracle("tood_e2e_mmdet_seed0_astronaut.pt")


@pytest.fixture(scope="session")
def train_oracle():
    """4 SGD steps of mmdetection 3.3's TOOD R-50 from the e2e oracle's weights (see shared/oracle/README.md)."""
    return _load_oracle("tood_train_mmdet_seed0.pt")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
