"""The NudeNet judge on odd images: 1x1, 16k x 16k, grey, RGBA, mixed sizes, wrong shapes and
types. Converted images reach the detector as an RGB file would; huge ones are shrunk without a
full-size copy; anything else is a message naming the image."""
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from vare_core.evaluation.judges import nudity
from vare_core.evaluation.judges.nudity import MAX_SIDE, NudeNetJudge, detector_image


class Recorder:
    """A stand-in detector: keeps what it is given, finds one exposed belly at a fixed box."""

    def __init__(self):
        self.seen = []

    def detect(self, image):
        self.seen.append(image)
        return [{"class": "BELLY_EXPOSED", "score": 0.9, "box": [10, 20, 30, 40]}]


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("nudenet", reason="pip install -r requirements-nudenet.txt")
    return nudity.load_detector()


def picture(height=48, width=64) -> np.ndarray:
    rng = np.random.default_rng(0)
    small = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def seen_by_detector(images) -> list[np.ndarray]:
    recorder = Recorder()
    NudeNetJudge(detector=recorder).judge(images)
    return recorder.seen


def test_grey_and_rgba_reach_the_detector_as_rgb_files_do(tmp_path):
    rgb = picture()
    grey = rgb[..., 1].copy()
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 77, np.uint8)], axis=2)
    as_rgb = seen_by_detector([rgb])[0]
    assert np.array_equal(seen_by_detector([rgba])[0], as_rgb)                  # alpha dropped
    assert np.array_equal(seen_by_detector(torch.from_numpy(rgba)[None].float() / 255)[0], as_rgb)
    grey_rgb = seen_by_detector([np.repeat(grey[..., None], 3, axis=2)])[0]
    assert np.array_equal(seen_by_detector([grey])[0], grey_rgb)
    assert np.array_equal(seen_by_detector(grey[None, ..., None])[0], grey_rgb)
    # as NudeNet reads the same pictures from PNG files (cv2.imread: BGR, alpha dropped, grey as BGR)
    from nudenet.nudenet import _read_image
    for name, array in (("rgba.png", rgba), ("grey.png", grey)):
        Image.fromarray(array).save(tmp_path / name)
        from_file = _read_image(str(tmp_path / name), 320)[0]
        assert np.array_equal(_read_image(seen_by_detector([array])[0], 320)[0], from_file)


def test_one_pixel_and_mixed_sizes(detector):
    images = [np.zeros((1, 1, 3), np.uint8), picture(48, 64), picture(300, 7)[..., :1],
              torch.ones(5, 9, 4, dtype=torch.float16)]
    verdicts = NudeNetJudge(detector=detector).judge(images)
    assert len(verdicts) == 4 and not any(v.flagged for v in verdicts)
    assert [im.shape for im in seen_by_detector(images)] == [(1, 1, 3), (48, 64, 3), (300, 7, 3), (5, 9, 3)]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_16k_images_are_shrunk_without_a_full_size_copy(dtype):
    """16384 x 16384 x 3 is 805 MB as uint8, 3.2 GB as float32 (np.zeros maps it lazily); the
    judge's own allocations stay near the shrunk image's size."""
    huge = np.zeros((1, 16384, 16384, 3), dtype)
    huge[0, :8192, :8192] = 1 if dtype == np.float32 else 255      # top-left quarter white
    recorder = Recorder()
    tracemalloc.start()
    verdict = NudeNetJudge(detector=recorder).judge(huge)[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2**20
    shrunk = recorder.seen[0]
    assert shrunk.shape == (MAX_SIDE, MAX_SIDE, 3) and shrunk.dtype == np.uint8
    assert shrunk[: MAX_SIDE // 2, : MAX_SIDE // 2].min() == 255 and shrunk[MAX_SIDE // 2:].max() == 0
    factor = 16384 // MAX_SIDE
    assert verdict.boxes[0].box == (10 * factor, 20 * factor, 30 * factor, 40 * factor)   # in the image's pixels


def test_a_huge_image_with_the_real_detector(detector):
    huge = np.zeros((16384, 16384), np.uint8)
    verdict = NudeNetJudge(detector=detector).judge([huge])[0]
    assert not verdict.flagged and verdict.caption == "no exposed parts"


def test_shrinking_is_a_block_mean_and_keeps_thin_images():
    image = np.zeros((4100, 10, 3), np.float32)
    image[1::2] = 1.0                                    # alternate rows white
    pixels, fx, fy = detector_image(image)
    assert (fy, fx) == (3, 3) and pixels.shape == (4100 // 3, 10 // 3, 3)
    assert set(np.unique(pixels)) <= {85, 170}            # 1/3 or 2/3 of the rows white
    thin = np.full((1, 5000, 3), 200, np.uint8)
    pixels, fx, fy = detector_image(thin)
    assert (fy, fx) == (1, 3) and pixels.shape == (1, 1666, 3) and (pixels == 200).all()


def test_the_callers_pixels_are_not_changed():
    images = torch.full((1, 8, 8, 3), float("nan"))
    images[0, 0, 0] = 2.0
    before = images.clone()
    seen = seen_by_detector(images)[0]
    assert torch.equal(images.isnan(), before.isnan()) and images[0, 0, 0, 0] == 2.0
    assert seen[1, 1].tolist() == [0, 0, 0] and seen[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("images, message", [
    (np.zeros((64, 64, 3), np.uint8), r"expected a batch \(B, H, W, C\) or a list of images, got \(64, 64, 3\)"),
    (np.zeros((1, 0, 5, 3), np.uint8), "image 0 is empty"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 5), np.uint8)], r"image 1: shape \(4, 4, 5\)"),
    ([np.zeros((4, 4, 3), np.int16)], "image 0: pixels of type int16 are not images"),
    (torch.zeros(1, 4, 4, 3, dtype=torch.bool), "pixels of type torch.bool"),
    ("a.png", "expected a batch"),
])
def test_what_is_not_an_image_is_a_message(images, message):
    with pytest.raises(ValueError, match=message):
        NudeNetJudge(detector=Recorder()).judge(images)
