"""Networks: one file per model (mllm, vision weights, aligner, diffusion), their composition (kosmos_g.py: condition) and the tokenizers."""
