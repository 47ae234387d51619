"""Networks: one file per model (mllm, vision, resampler, aligner, diffusion) and the tokenizers."""
