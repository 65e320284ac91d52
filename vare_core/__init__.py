"""VARE core library: Infinity-family VAR text-to-image models and S-VARE concept erasure.

Never imports ComfyUI. Usage: README.md, "The Python API"; the packages and their layers:
docs/architecture.md.
"""
__version__ = "0.1.0"
