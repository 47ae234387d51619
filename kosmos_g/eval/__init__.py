"""Evaluation: DreamBench (`dreambench`) and the paper's metrics, FID, DINO, CLIP-I, CLIP-T (`metrics`).

Import from the submodules (`from kosmos_g.eval.metrics import build_fid`); this package imports
nothing itself so that reading DreamBench does not load the metric backbones' libraries.
"""
