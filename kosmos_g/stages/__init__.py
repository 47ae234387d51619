"""One LightningModule per training stage: mllm, align, instruct."""
