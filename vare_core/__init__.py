"""VARE core library: Infinity-family VAR text-to-image models and S-VARE concept erasure.

Never imports ComfyUI. See README.md for usage.
"""
__version__ = "0.1.0"
