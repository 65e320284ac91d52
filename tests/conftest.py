import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    """Folder of the official implementation's golden tensors (tests/golden, see its README)."""
    return GOLDEN


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Trajectory caches written by tests go to a temporary folder, never ~/.cache."""
    os.environ["VARE_CACHE_DIR"] = str(tmp_path_factory.mktemp("vare_cache"))
    yield


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
