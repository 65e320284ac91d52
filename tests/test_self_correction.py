"""Bitwise self-correction inputs for training the embedded model (models/self_correction.py)."""
import torch

from vare_core.models.self_correction import self_corrected_batch
from vare_core.models.bsq_quant import residual_quantize, teacher_forcing_inputs

SCHEDULE = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]


def test_nothing_flipped_is_plain_teacher_forcing():
    features = torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    x, labels = self_corrected_batch(features, SCHEDULE, max_flip=0.0)
    bits = residual_quantize(features, SCHEDULE).bits
    assert torch.equal(labels, torch.cat([b.reshape(6, -1, 16) for b in bits], 1))
    assert torch.equal(x, teacher_forcing_inputs(bits, SCHEDULE))


def test_flipped_bits_change_the_inputs_and_later_labels_correct_them():
    features = torch.randn(64, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    clean_x, clean_labels = self_corrected_batch(features, SCHEDULE, max_flip=0.0)
    x, labels = self_corrected_batch(features, SCHEDULE, max_flip=0.3, generator=torch.Generator().manual_seed(2))
    assert x.shape == clean_x.shape and labels.shape == clean_labels.shape
    assert not torch.equal(x, clean_x)
    assert torch.equal(labels[:, :1], clean_labels[:, :1])       # scale 0: nothing before it to flip
    # a later label codes what is still missing after the corrupted scales: it differs from the
    # clean one where earlier bits were flipped, so the model learns to undo them
    assert (labels[:, 1:] != clean_labels[:, 1:]).float().mean() > 0.02
    again, _ = self_corrected_batch(features, SCHEDULE, max_flip=0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again, x)                                 # seeded: reproducible


def test_first_scale_flips_feed_the_flipped_code_and_keep_its_label():
    from vare_core.models.bsq_quant import codes_from_bits, next_scale_input, upsample_codes
    features = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    clean_x, clean_labels = self_corrected_batch(features, SCHEDULE, max_flip=0.0)
    none = torch.zeros(4, 16, dtype=torch.bool)
    assert torch.equal(self_corrected_batch(features, SCHEDULE, 0.0, first_scale_flips=none)[0], clean_x)
    flips = none.clone()
    flips[1, 1] = True                                           # image 1, bit 1
    x, labels = self_corrected_batch(features, SCHEDULE, 0.0, first_scale_flips=flips)
    assert torch.equal(labels[:, :1], clean_labels[:, :1])       # the first scale's label is the truth
    first = clean_labels[:, 0].clone()
    first[1, 1] = 1 - first[1, 1]
    fed = upsample_codes(codes_from_bits(first.view(4, 1, 1, 16)), (8, 8))
    assert torch.equal(x[:, :4], next_scale_input(fed, (2, 2)))  # scale 1 sees the flipped code
    assert torch.equal(x[[0, 2, 3]], clean_x[[0, 2, 3]])         # the others are untouched
    assert not torch.equal(labels[1, 1:], clean_labels[1, 1:])   # later scales correct from it


def test_layout_scales_are_never_flipped_at_random():
    # the first scale of the embedded model is a freely drawn layout code: self-correction must
    # leave it as it is (and so the inputs of scale 1), while later scales still get flips
    features = torch.randn(64, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    clean_x, clean_labels = self_corrected_batch(features, SCHEDULE, max_flip=0.0)
    x, labels = self_corrected_batch(features, SCHEDULE, max_flip=0.3, generator=torch.Generator().manual_seed(5),
                                     layout_scales=1)
    assert torch.equal(x[:, :4], clean_x[:, :4])                 # scale 1 sees the true layout code
    assert torch.equal(labels[:, :1 + 4], clean_labels[:, :1 + 4])
    assert not torch.equal(x[:, 4:], clean_x[:, 4:])             # scale 1 onwards is still flipped
    # without the layout rule the same seed does flip the first scale's code
    flipped, _ = self_corrected_batch(features, SCHEDULE, max_flip=0.3, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(flipped[:, :4], clean_x[:, :4])
