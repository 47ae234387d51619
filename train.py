"""Train one stage: `python train.py stage=<mllm|align|instruct> [key=value ...]` (see kosmos_g/train.py)."""

from kosmos_g.train import main

if __name__ == "__main__":
    main()
