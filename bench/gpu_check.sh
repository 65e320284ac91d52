#!/usr/bin/env bash
# Every GPU measurement of the pack in one run (bench/gpu_check.py): Infinity-2B sampling in
# bf16 / fp16 / low_vram / with the Concept Guard / at speed fast (and compiled) and the S-VARE erasure with the defaults at 1024², each beside its
# memory plan; the per-scale preview decode; then the plan command's own figures. Planned under
# 10 minutes on one GPU; each row is printed as it is measured and the compiled rows come last,
# so a step stopped at its time limit keeps what it measured and the next step still runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
# each step goes on when the one before stops at its limit: its rows are printed as measured
timeout 480 python bench/gpu_check.py "$@" || echo "gpu_check.py stopped (exit $?): the rows above are what it measured"
timeout 60 python bench/preview_speed.py --device cuda --dtype bf16 --repeats 3 || echo "preview_speed.py stopped (exit $?)"
for model in infinity_2b infinity_8b; do
    python -m vare_core plan --model "$model" --height 1024 --width 1024 | tail -3
done
