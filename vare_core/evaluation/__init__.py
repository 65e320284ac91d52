"""Evaluation: does an image show a concept (judges/), a prompt set judged with and without an
adapter (prompt_eval.py, run_folder.py), and the shapes world's benchmarks (shapes_world/)."""
