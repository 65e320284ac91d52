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


@pytest.fixture(scope="session")
def default_adapter(tmp_path_factory):
    """default_adapter(concept, anchor): the embedded model's default erasure adapter (the
    family's config and pairs, seed 0: what `erase`, Train Erasure and the demo make), trained
    once per test session (about 100 s on 2 cores) for the tests that judge the same one."""
    trained = {}

    def get(concept: str, anchor: str):
        if (concept, anchor) not in trained:
            from vare_core.erasure.trainer import train_erasure
            from vare_core.generation.pipeline import load_pipeline
            pipe = load_pipeline("embedded", device="cpu")
            pairs, config = default_training_inputs(pipe, concept, anchor)
            trained[concept, anchor] = train_erasure(pipe, pairs, config,
                                                     cache_dir=tmp_path_factory.mktemp("adapter_cache")).adapter
        return trained[concept, anchor]
    return get


def default_training_inputs(pipe, concept: str, anchor: str):
    from vare_core.erasure.profile import erasure_profile
    profile = erasure_profile(pipe)
    return profile.pairs(concept, anchor, pipe=pipe), profile.config()
