"""vare_core.erasure.session: a training run as the node and `erase` start it: typed progress
events, the memory check on a GPU (faked here: the device and its free memory), and out of memory
turned into advice once the failed run's tensors are gone."""
import weakref

import pytest
import torch

import vare_core.cli as main_cli
import vare_core.generation.pipeline as pipeline_module
from vare_core.erasure import session as session_module
from vare_core.erasure.profile import erasure_profile
from vare_core.erasure.session import TrainingSession, TrainStepProgress, TrajectoriesProgress
from vare_core.testing import tiny_pipeline


@pytest.fixture
def tiny():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


def pairs(pipe):
    return erasure_profile(pipe).pairs("circle", "square", n_per_concept=2, retain=0)


def small_config(pipe, **given):
    return erasure_profile(pipe).config(steps=3, batch_size=2, **given)


@pytest.fixture
def on_a_full_gpu(monkeypatch):
    """The pipeline says it is on a GPU with 1 MiB free (no GPU is touched)."""
    monkeypatch.setattr(pipeline_module.VarPipeline, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * 2**20, 8 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_progress_arrives_as_typed_events_carrying_the_trainers_record(tiny, tmp_path):
    events = []
    session = TrainingSession(tiny, pairs(tiny), small_config(tiny), cache_dir=tmp_path)
    with torch.inference_mode():                  # as ComfyUI runs a node
        result = session.train(progress=events.append)
    trajectories = [e for e in events if isinstance(e, TrajectoriesProgress)]
    steps = [e for e in events if isinstance(e, TrainStepProgress)]
    assert trajectories[-1].done == trajectories[-1].total == 2
    assert [e.step for e in steps] == [1, 2, 3] and {e.steps for e in steps} == {3}
    assert [e.record for e in steps] == result.history and session.last_step == 3
    assert set(steps[0].terms) == {"fce", "pre"} and steps[0].selected_fraction is not None
    assert steps[0].eta == pytest.approx(steps[0].seconds * 2)
    assert result.adapter is not None


def test_the_config_defaults_to_the_models_profile(tiny):
    assert TrainingSession(tiny, pairs(tiny)).config == erasure_profile(tiny).config()


def test_the_memory_check_runs_on_a_gpu_in_one_process_only(tiny, monkeypatch):
    assert TrainingSession(tiny, pairs(tiny)).check_memory() is None          # a CPU
    monkeypatch.setattr(pipeline_module.VarPipeline, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert TrainingSession(tiny, pairs(tiny)).check_memory() is None          # torchrun: not modelled
    monkeypatch.delenv("WORLD_SIZE")
    plan = TrainingSession(tiny, pairs(tiny), small_config(tiny)).check_memory(free_bytes=2**40)
    assert plan.peak > 0


def test_a_run_that_cannot_fit_is_refused_with_the_settings_that_fit(tiny, on_a_full_gpu, monkeypatch):
    trained = []
    monkeypatch.setattr(session_module, "train_erasure", lambda *a, **k: trained.append(1))
    with pytest.raises(ValueError, match=r"this erasure needs about .* GiB at its peak .* is free"):
        TrainingSession(tiny, pairs(tiny), small_config(tiny, train="ca_ffn")).check_memory()
    assert not trained


def test_erase_refuses_a_run_that_cannot_fit_on_the_gpu(tiny, on_a_full_gpu, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(main_cli.erase, "load_from_args", lambda args, **kwargs: tiny)
    monkeypatch.setattr(session_module, "train_erasure", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "erase.safetensors"
    rc = main_cli.main(["erase", "--concept", "circle", "--anchor", "square", "--n-pairs", "2", "--train", "ca_ffn",
                        "--batch-size", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "this erasure needs about" in err and " is free" in err and not out.exists()


def test_out_of_memory_is_released_then_explained(tiny):
    alive_when_released, state = [], []

    def fail(*args, **kwargs):
        tensors = torch.empty(1024, 1024)                   # what a real run holds (optimizer, ...)
        state.append(weakref.ref(tensors))
        kwargs["callback"]({"phase": "train", "step": 2, "steps": 3, "loss": 0.1, "seconds": 0.2,
                            "skipped_steps": 0})
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    session = TrainingSession(tiny, pairs(tiny), small_config(tiny, train="ca_ffn"))
    original, session_module.train_erasure = session_module.train_erasure, fail
    try:
        with pytest.raises(MemoryError, match="out of CPU memory at step 2 .*train = lora.*gradient_checkpointing on"):
            session.train(release_memory=lambda: alive_when_released.append(state[-1]() is not None))
    finally:
        session_module.train_erasure = original
    assert alive_when_released == [False]


def test_erase_says_out_of_memory_with_the_advice(tiny, monkeypatch, tmp_path, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")
    monkeypatch.setattr(main_cli.erase, "load_from_args", lambda args, **kwargs: tiny)
    monkeypatch.setattr(session_module, "train_erasure", fail)
    rc = main_cli.main(["erase", "--concept", "circle", "--anchor", "square", "--n-pairs", "2",
                        "--out", str(tmp_path / "a.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "out of CPU memory while sampling the trajectories" in err and "Change, in this order" in err
