"""The embedded "shapes world" model family: the world (world.py), its sizes and files (spec.py)
and the shipped weights (weights/). Its training recipe is in training/; its judges and
benchmarks are in vare_core/evaluation/."""
