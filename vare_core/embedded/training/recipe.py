"""The shipped embedded model (v2.2) in one command, from seeds, on 2 CPU cores (about 2.5 hours):

    python -m vare_core.embedded.training.recipe --out runs/embedded     # then copy runs/embedded/*

Stage 1 (about 96 min): the base model, trained from scratch (VAE with the coarse-code layout,
then transformer + text encoder, 10,000 steps). Stage 2 (about 55 min): two lanes that do not
depend on each other, run side by side with one thread each:
- the VAE's decoder, on the frozen encoder's codes: first on the data's mix (the base decoder,
  trained 1200 short steps, rounds small crosses into four-point stars), then with half of every
  batch from the renders its round trip still draws badly (mostly small yellow crosses on gray);
- the transformer and text encoder at a tenth of the base's learning rate on fresh images, with
  bitwise self-correction (the Infinity recipe) on every scale after the first (the layout code).
The decoder leaves every code as it was, so the two lanes fit together. Each step is a call
of embedded/training/train.py; their logs land in OUT/base, OUT/decoder, OUT/decoder_hard and OUT. CPU
float results depend on the thread count: the thread counts here are the ones the shipped
weights came from.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import spec

BASE = ["--seed", "0", "--coarse-codes", "--steps", "10000", "--threads", "2"]
DECODER = ["--seed", "3", "--decoder-steps", "2500", "--vae-batch", "32", "--vae-images", "16000",
           "--steps", "0", "--threads", "1"]
DECODER_HARD = ["--seed", "4", "--decoder-steps", "1000", "--vae-batch", "32", "--vae-images", "16000",
                "--decoder-lr", "2e-4", "--decoder-hard", "24000", "--decoder-hard-share", "0.5",
                "--steps", "0", "--threads", "1"]
TRANSFORMER = ["--seed", "1", "--coarse-codes", "--steps", "3000", "--lr", "2e-4", "--self-correction", "0.2",
               "--threads", "1"]


def stage_commands(out: Path) -> list[list[list[list[str]]]]:
    """The train.py argument lists: stages, one after the other; in a stage, lanes that run side
    by side; in a lane, calls that run one after the other."""
    base_vae = str(out / "base" / spec.VAE_FILE)
    decoder_lane = [["--out", str(out / "decoder"), "--vae", base_vae, *DECODER],
                    ["--out", str(out / "decoder_hard"), "--vae", str(out / "decoder" / spec.VAE_FILE), *DECODER_HARD]]
    transformer_lane = [["--out", str(out), "--vae", base_vae, "--init", str(out / "base"), *TRANSFORMER]]
    return [[[["--out", str(out / "base"), *BASE]]], [decoder_lane, transformer_lane]]


def _run_lane(calls: list[list[str]]) -> int:
    for args in calls:
        code = subprocess.call([sys.executable, "-m", "vare_core.embedded.training.train", *args])
        if code:
            return code
    return 0


def run_stage(lanes: list[list[list[str]]]) -> None:
    with ThreadPoolExecutor(len(lanes)) as pool:
        codes = list(pool.map(_run_lane, lanes))
    if any(codes):
        raise SystemExit(f"a training stage failed (exit codes {codes}): see the train.log files")


def assemble(out: Path) -> None:
    """The fine-tuned decoder joins the fine-tuned transformer; embedded.json records every stage
    (the decoder's numbers are in OUT/decoder*/train.log)."""
    shutil.copyfile(out / "decoder_hard" / spec.VAE_FILE, out / spec.VAE_FILE)
    info_path = out / spec.INFO_FILE
    info = json.loads(info_path.read_text())
    base = json.loads((out / "base" / spec.INFO_FILE).read_text())
    info["training"] = {"seed": base["training"]["seed"], "recipe": "python -m vare_core.embedded.training.recipe",
                        "base": base["training"], "decoder": {"args": DECODER}, "decoder_hard": {"args": DECODER_HARD},
                        "transformer": info["training"]}
    info_path.write_text(json.dumps(info, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="an empty folder for the new weights and logs")
    args = parser.parse_args(argv)
    for stage in stage_commands(args.out):
        run_stage(stage)
    assemble(args.out)
    print(f"done: {args.out} holds the embedded model (copy {spec.TRANSFORMER_FILE}, {spec.VAE_FILE}, "
          f"{spec.TEXT_ENCODER_DIR}/ and {spec.INFO_FILE} into {spec.WEIGHTS_DIR})")


if __name__ == "__main__":
    main()
