"""Networks: one file per model (mllm, vision weights, aligner, diffusion) and the tokenizers."""
