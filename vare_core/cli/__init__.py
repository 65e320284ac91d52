"""The command line: python -m vare_core {sample, demo, erase, bench-erasure, plan, evaluate} ...

    python -m vare_core sample --model embedded --prompt "a red circle on a white background" \
        --n 8 --seed 0 --out out/
    python -m vare_core sample --model infinity_2b_reg.pth --vae infinity_vae_d32reg.pth \
        --text-encoder models/text_encoders/flan-t5-xl --prompt "a cat" --out out/
    python -m vare_core demo --out out/demo
    python -m vare_core plan --model infinity_2b --height 1024 --width 1024   # memory, no weights
"""
from __future__ import annotations

import argparse
import sys

from . import erase, evaluate, plan, sample
from .common import CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vare_core", description="VARE: VAR text-to-image and concept erasure")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (sample, erase, plan, evaluate):
        command.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    # OSError: files that cannot be read or written; MemoryError: out of memory, with advice
    except (CliError, ValueError, OSError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:      # torch's allocators say "out of memory" as RuntimeError
        from ..devices import is_out_of_memory
        if not is_out_of_memory(err):
            raise
        print(f"error: out of memory ({str(err).splitlines()[0][:160]}); use a smaller --batch, "
              "--height/--width or --dtype fp16/bf16, or free memory and retry", file=sys.stderr)
        return 2
    return 0
