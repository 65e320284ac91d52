"""Pieces of the embedded model's training script (embedded/training/train.py) that a retrain relies on."""
import torch
import torch.nn.functional as F

from vare_core.embedded import spec
from vare_core.embedded.training.train import Log, finetune_decoder, to_model_images
from vare_core.embedded.world import make_dataset
from vare_core.models.bsq_quant import summed_codes_from_bits
from vare_core.models.bsq_vae import BSQVAE, VAEConfig


def _reconstruction_loss(vae, images):
    with torch.no_grad():
        codes = summed_codes_from_bits(vae.encode_bits(images, spec.SCHEDULE), spec.SCHEDULE[-1])
        return F.l1_loss(vae.decode(codes), images).item()


def test_decoder_finetune_keeps_every_code_and_improves_the_pictures(tmp_path):
    torch.manual_seed(0)
    vae = BSQVAE(VAEConfig(bits=spec.VAE.bits, patch_size=8, base_channels=8, channel_mult=(1, 1, 2, 2),
                           num_res_blocks=1, norm="none")).eval().requires_grad_(False)
    images = to_model_images(make_dataset(12, seed=3)[0])
    encoder_before = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    bits_before = vae.encode_bits(images, spec.SCHEDULE)
    loss_before = _reconstruction_loss(vae, images)

    finetune_decoder(vae, images, steps=80, batch=12, lr=1e-3, gen=torch.Generator().manual_seed(0),
                     log=Log(tmp_path / "train.log"))

    # the encoder, and so every code a transformer was trained on, is unchanged
    assert all(torch.equal(v, encoder_before[k]) for k, v in vae.encoder.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(vae.encode_bits(images, spec.SCHEDULE), bits_before))
    assert not vae.training
    assert any(not torch.equal(v, decoder_before[k]) for k, v in vae.decoder.state_dict().items())
    assert _reconstruction_loss(vae, images) < 0.8 * loss_before
    assert "decoder step 79/80" in (tmp_path / "train.log").read_text()


def test_recipe_fine_tunes_both_halves_from_the_base_and_assembles_them(tmp_path):
    import json

    from vare_core.embedded.training import recipe
    stages = recipe.stage_commands(tmp_path)
    assert [len(stage) for stage in stages] == [1, 2]          # base, then two lanes side by side
    base_vae = str(tmp_path / "base" / spec.VAE_FILE)
    (decoder, decoder_hard), (transformer,) = stages[1]
    # both fine-tunes start from the base: the decoder keeps its encoder, the transformer its weights
    assert decoder[decoder.index("--vae") + 1] == base_vae and "--decoder-steps" in decoder
    assert decoder[decoder.index("--steps") + 1] == "0"
    # the hard-example pass continues the first decoder fine-tune
    assert decoder_hard[decoder_hard.index("--vae") + 1] == str(tmp_path / "decoder" / spec.VAE_FILE)
    assert "--decoder-hard" in decoder_hard and decoder_hard[decoder_hard.index("--steps") + 1] == "0"
    assert transformer[transformer.index("--init") + 1] == str(tmp_path / "base")
    assert transformer[transformer.index("--vae") + 1] == base_vae
    assert transformer[transformer.index("--out") + 1] == str(tmp_path)
    # assembling: the decoder's VAE file, every stage's record
    (tmp_path / "base").mkdir()
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder_hard").mkdir()
    (tmp_path / "decoder" / spec.VAE_FILE).write_bytes(b"decoder")
    (tmp_path / "decoder_hard" / spec.VAE_FILE).write_bytes(b"decoder_hard")
    (tmp_path / spec.VAE_FILE).write_bytes(b"base")
    (tmp_path / "base" / spec.INFO_FILE).write_text(json.dumps({"training": {"seed": 0, "final_bit_ce": 0.17}}))
    (tmp_path / spec.INFO_FILE).write_text(json.dumps({"cfg": 4.0, "training": {"seed": 1}}))
    recipe.assemble(tmp_path)
    assert (tmp_path / spec.VAE_FILE).read_bytes() == b"decoder_hard"
    info = json.loads((tmp_path / spec.INFO_FILE).read_text())
    assert info["cfg"] == 4.0 and info["training"]["seed"] == 0
    assert info["training"]["base"]["final_bit_ce"] == 0.17 and info["training"]["transformer"]["seed"] == 1
    assert "--decoder-hard" in info["training"]["decoder_hard"]["args"]


def test_hard_renders_are_the_ones_the_round_trip_draws_badly_and_fill_their_batch_share(tmp_path, monkeypatch):
    from vare_core.embedded.training import train
    from vare_core.evaluation.judges.geometry import judge_images
    torch.manual_seed(0)
    # an untrained decoder draws nothing like a shape: every render is hard
    vae = BSQVAE(VAEConfig(bits=spec.VAE.bits, patch_size=8, base_channels=8, channel_mult=(1, 1, 2, 2),
                           num_res_blocks=1, norm="none")).eval().requires_grad_(False)
    log = Log(tmp_path / "train.log")
    hard = train.mine_hard_renders(vae, 6, seed=1, log=log, chunk=4)
    assert hard.shape == (6, 3, 64, 64) and "mined 6 hard renders of 6" in (tmp_path / "train.log").read_text()

    # a perfect round trip: nothing is hard (the judge reads every clean render as its shape)
    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dtype_probe = torch.nn.Parameter(torch.zeros(1))   # decode_images reads the dtype

        def encode_bits(self, x, schedule):
            self.images = x
            return []

        def decode(self, codes):
            return self.images
    renders, _, scenes = make_dataset(6, seed=1)
    assert [j["shape"] for j in judge_images(renders)] == [s.shape for s in scenes]
    monkeypatch.setattr(train, "summed_codes_from_bits", lambda bits, size: torch.zeros(1))
    assert len(train.mine_hard_renders(Identity(), 6, seed=1, log=log, chunk=4)) == 0
    monkeypatch.undo()

    # every batch takes its share from the hard images: a fine-tune on marked images sees them
    general = torch.zeros(10, 3, 64, 64)
    seen = []
    vae.decoder.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    original_encode = vae.encode_bits

    def encode_counting_hard_images(x, schedule):
        seen.append(float((x == 1).flatten(1).all(1).sum()))      # the hard images are all ones
        return original_encode(x, schedule)
    vae.encode_bits = encode_counting_hard_images
    finetune_decoder(vae, general, steps=3, batch=8, lr=1e-3, gen=torch.Generator().manual_seed(0), log=log,
                     hard=torch.ones(2, 3, 64, 64), hard_share=0.25)
    assert seen == [2.0, 8] * 3


def test_decoder_hard_options_are_checked(capsys):
    import pytest

    from vare_core.embedded.training.train import main
    for argv, message in ((["--decoder-hard", "100", "--vae", "v.safetensors"], "--decoder-steps N"),
                          (["--decoder-hard-share", "1.5"], "strictly between 0 and 1")):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--out", "unused"])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_decoder_steps_without_a_vae_is_refused(capsys):
    import pytest

    from vare_core.embedded.training.train import main
    with pytest.raises(SystemExit) as stop:
        main(["--decoder-steps", "10", "--out", "unused"])
    assert stop.value.code == 2 and "--vae FILE" in capsys.readouterr().err


def test_self_correction_keeps_the_layout_scale_with_or_without_repair_flips():
    # coarse codes with --repair-share 0 still have a freely drawn layout scale: the layout
    # rule follows the coarse codes, not the repair flips
    from vare_core.embedded.training.train import teacher_forced_batch
    features = torch.randn(32, spec.VAE.bits, 8, 8, generator=torch.Generator().manual_seed(6))
    idx = torch.arange(32)
    x_plain, _ = teacher_forced_batch(features, idx, 0.3, torch.Generator().manual_seed(1))
    x_layout, _ = teacher_forced_batch(features, idx, 0.3, torch.Generator().manual_seed(1), layout_scales=1)
    from vare_core.models.self_correction import self_corrected_batch
    truth, _ = self_corrected_batch(features, spec.SCHEDULE, max_flip=0.0)
    assert torch.equal(x_layout[:, :4], truth[:, :4])            # scale 1 sees the true layout code
    assert not torch.equal(x_plain[:, :4], truth[:, :4])         # without the rule it is flipped
