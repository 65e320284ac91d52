"""Benchmarks of the embedded shapes world: model quality (model_quality.py), erasure fidelity
(fidelity.py, erasure_bench.py) and prompt attacks (attacks.py)."""
