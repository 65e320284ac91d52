"""The VARE ComfyUI nodes (V3 API). One file per family; every node parses its inputs, calls
vare_core and reports progress. See docs/nodes.md for the node reference.

    loaders.py     Load VAR Model, VAR Text Encode
    sampling.py    VAR Sampler
    erasure.py     Erasure Prompt Pairs, Train Erasure (S-VARE)
    adapters.py    Apply / Save / Load Erasure Adapter
    guard.py       Concept Guard (erasure while sampling, no training)
    evaluation.py  Erasure Loss Plot, Erasure Check, Before/After Grid
    compat.py      the V3 API (or standin.py outside ComfyUI) and the custom link types
    host.py        model folders, device, progress, interrupts, events
"""
from .adapters import ApplyAdapter, LoadAdapter, SaveAdapter
from .erasure import PromptPairs, TrainErasure
from .evaluation import CompareGrid, ErasureCheck, LossPlot
from .guard import ConceptGuard
from .loaders import LoadModel, TextEncode
from .sampling import Sampler

NODES = [LoadModel, TextEncode, Sampler, PromptPairs, TrainErasure, ApplyAdapter, SaveAdapter,
         LoadAdapter, ConceptGuard, LossPlot, ErasureCheck, CompareGrid]
