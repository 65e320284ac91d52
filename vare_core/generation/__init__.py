"""The generation layer: a loaded model and how it draws images (pipeline.py, sampler.py,
per_scale.py), previews (preview.py) and the memory a request may take (budget.py)."""
