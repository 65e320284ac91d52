import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("VARE_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden() -> Path:
    """Folder of the official implementation's golden tensors (../shared/golden)."""
    if not GOLDEN.is_dir():
        raise FileNotFoundError(f"golden folder not found at {GOLDEN}; set VARE_GOLDEN")
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
