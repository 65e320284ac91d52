"""How the embedded model is trained: one run (train.py), the shipped chain of runs (recipe.py),
the VAE's first-scale layout (coarse_codes.py) and the shapes classifier (train_classifier.py)."""
