"""Kosmos-G: image generation from interleaved text-and-image prompts (see README.md).

The main classes are importable from here (`from kosmos_g import KosmosGPipeline`). They load lazily, so
`import kosmos_g.config` (Hydra only) stays cheap and does not pull in torch, transformers or diffusers.
"""

import importlib

_EXPORTS = {
    "KosmosGPipeline": "kosmos_g.pipeline",
    "condition": "kosmos_g.pipeline",
    "KosmosGProcessor": "kosmos_g.processor",
    "MultimodalLM": "kosmos_g.models.mllm",
    "build_mllm": "kosmos_g.models.mllm",
    "AlignerNet": "kosmos_g.models.aligner",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kosmos_g' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
