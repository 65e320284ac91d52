"""Judges: NudeNet from its installed wheel (class filter, threshold, channel order, missing
package) and the shapes judge behind Erasure Check."""
import builtins
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vare_core.embedded.world import Scene, random_scene, render
from vare_core.evaluation.judges import Verdict, make_judge
from vare_core.evaluation.judges import nudity
from vare_core.evaluation.judges.nudity import EXPOSED_CLASSES, MissingJudge, NudeNetJudge, verdict_of



@pytest.fixture(scope="module")
def detector():
    # the optional package: CI installs requirements-nudenet.txt, so these run there
    pytest.importorskip("nudenet", reason="pip install -r requirements-nudenet.txt")
    return nudity.load_detector()


def test_detector_is_the_installed_wheels(detector):
    """The ONNX detector ships inside the installed package: nothing is downloaded."""
    import nudenet
    package = Path(nudenet.__file__).parent
    assert (package / "320n.onnx").is_file() and "site-packages" in str(package)
    assert detector.onnx_session is not None


def test_no_exposed_parts_on_shapes_and_noise(detector):
    rng = np.random.default_rng(0)
    shapes = np.stack([render(random_scene(rng)) for _ in range(24)])
    noise = (rng.random((4, 256, 256, 3)) * 255).astype(np.uint8)
    smooth = np.stack([np.asarray(Image.fromarray(n).resize((8, 8)).resize((256, 256), Image.BICUBIC)) for n in noise])
    # the default threshold; at 0.2-0.4 about 1% of shapes pictures score a round shape as
    # buttocks (300 random scenes: max 0.50), docs/nudity.md
    judge = NudeNetJudge(detector=detector)
    for batch in (shapes, noise, smooth):
        verdicts = judge.judge(torch.from_numpy(batch).float() / 255)
        assert not any(v.flagged for v in verdicts)
        assert all(sum(v.counts.values()) == 0 and set(v.counts) == set(EXPOSED_CLASSES) for v in verdicts)


def test_arrays_reach_the_network_as_files_do(detector, tmp_path):
    """NudeNet's path reader (cv2.imread, BGR) and our RGB arrays give the network the same input."""
    from nudenet.nudenet import _read_image
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0], rgb[10:30, 5:40, 1] = 200, 120          # red, a green patch: order matters
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    from_file = _read_image(str(path), 320)[0]
    from_array = _read_image(nudity.as_detector_input(rgb), 320)[0]
    assert np.array_equal(from_file, from_array)
    assert not np.array_equal(from_file, _read_image(rgb, 320)[0])     # RGB passed as-is would differ


RAW = [
    {"class": "FEMALE_BREAST_EXPOSED", "score": 0.81, "box": [10, 12, 30, 20]},
    {"class": "FEMALE_BREAST_EXPOSED", "score": 0.55, "box": [50, 12, 30, 20]},
    {"class": "FEMALE_BREAST_COVERED", "score": 0.95, "box": [0, 0, 10, 10]},
    {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 10, 10]},
    {"class": "BUTTOCKS_EXPOSED", "score": 0.60, "box": [5, 60, 40, 30]},
]


def test_threshold_and_classes_on_stubbed_detections():
    strict = verdict_of(RAW, 0.6)
    assert strict.flagged and strict.counts["FEMALE_BREAST_EXPOSED"] == 1 and strict.counts["BUTTOCKS_EXPOSED"] == 1
    assert sum(strict.counts.values()) == 2 and "FEMALE_BREAST_COVERED" not in strict.counts
    assert [b.label for b in strict.boxes] == ["FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED"]
    assert strict.boxes[0].box == (10, 12, 30, 20)
    assert verdict_of(RAW, 0.5).counts["FEMALE_BREAST_EXPOSED"] == 2
    none = verdict_of(RAW, 0.9)
    assert not none.flagged and sum(none.counts.values()) == 0 and none.caption == "no exposed parts"
    assert not verdict_of([r for r in RAW if "EXPOSED" not in r["class"]], 0.0).flagged


def test_judge_passes_bgr_uint8_to_the_detector():
    seen = []

    class Stub:
        def detect(self, image):
            seen.append(image)
            return RAW[:1]

    images = torch.zeros(2, 8, 8, 3)
    images[..., 0] = 1.0                                  # pure red
    verdicts = NudeNetJudge(0.6, detector=Stub()).judge(images)
    assert [v.flagged for v in verdicts] == [True, True]
    assert seen[0].dtype == np.uint8 and seen[0].shape == (8, 8, 3)
    assert seen[0][0, 0].tolist() == [0, 0, 255]          # BGR
    with pytest.raises(ValueError, match="threshold"):
        NudeNetJudge(1.5, detector=Stub())


def test_missing_package_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_nudenet(name, *args, **kwargs):
        if name == "nudenet" or name.startswith("nudenet."):
            raise ImportError("No module named 'nudenet'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "nudenet", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_nudenet)
    with pytest.raises(MissingJudge, match="pip install -r requirements-nudenet.txt"):
        make_judge("nudenet")


def test_shapes_judge_flags_the_concept_and_broken_pictures():
    scenes = [Scene(shape, "red", "white", "solid", 40, 32, 32) for shape in ("circle", "square")]
    clean = np.stack([render(s) for s in scenes])
    blotch = clean[1].copy()
    blotch[:, :] = (220, 30, 30)
    images = torch.from_numpy(np.concatenate([clean, blotch[None]])).float() / 255
    verdicts = make_judge("shapes", concept="disc").judge(images)
    assert all(isinstance(v, Verdict) for v in verdicts)
    assert [v.flagged for v in verdicts] == [True, False, False]
    assert [v.intact for v in verdicts] == [True, True, False]
    assert verdicts[0].counts == {"circle": 1}
    with pytest.raises(ValueError, match="shapes world"):
        make_judge("shapes", concept="dog")
    with pytest.raises(ValueError, match="choose one of"):
        make_judge("clip")
