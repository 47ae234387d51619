"""The configuration schema: dataclasses that Hydra composes YAML into, and that validate themselves.

Hydra merges `configs/train.yaml` and the chosen group files (`stage/`, `model/`, `data/`,
`trainer/`) onto `TrainConfig`, so an unknown key or a wrong type fails at composition.
`OmegaConf.to_object` then builds these dataclasses, which runs every `__post_init__` check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kosmos_g.data.format import SAMPLE_KINDS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
STAGES = ("mllm", "align", "instruct")
RECON_WEIGHTINGS = ("official", "per_sample")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then polynomial decay (the paper's recipe for all stages)."""

    lr: float = 1e-3
    """Peak learning rate after warm-up."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam betas."""
    eps: float = 1e-6
    """Adam epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay; not applied to biases, norms, embeddings or learned queries."""
    warmup_steps: int = 375
    """Linear warm-up steps from 0 to `lr`."""
    decay_power: float = 1.0
    """Exponent of the polynomial decay from `lr` to `end_lr` at `trainer.max_steps` (1 = linear)."""
    end_lr: float = 0.0
    """Learning rate reached at the last step."""
    grad_clip: float = 2.0
    """Clip the global gradient norm to this value (0 disables)."""

    def __post_init__(self):
        _check(self.lr > 0, f"stage.optim.lr must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"stage.optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _check(self.warmup_steps >= 0, "stage.optim.warmup_steps must be >= 0")
        _check(0 <= self.end_lr <= self.lr, "stage.optim.end_lr must be in [0, lr]")
        _check(self.grad_clip >= 0, "stage.optim.grad_clip must be >= 0 (0 disables clipping)")


@dataclass
class StageConfig:
    """What one training stage does: its name, optimiser and loss settings."""

    name: str = MISSING
    """One of mllm, align, instruct (set by the `stage=` group choice)."""
    batch_size: int = 8
    """Per-device micro-batch: the samples one forward holds. With `global_batch_size` set, the largest one
    that fits a device: at start-up it is lowered, if needed, to divide this device's share evenly."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all devices (stage mllm: tokens, in rows of `data.max_text_tokens`).
    The micro-batch and `accumulate_grad_batches` follow from it for the world size at launch. None: the
    global batch is batch_size x devices, without accumulation."""
    accumulate_grad_batches: int = 1
    """Derived from `global_batch_size` at start-up (micro-batches per optimizer step); do not set it."""
    pack_length: Optional[int] = None
    """mllm: pack whole documents into rows of this many tokens (the paper: 2048), `batch_size` rows per
    micro-batch; each document attends and counts positions within itself. None: one document per row."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    target_weight: float = 1.0
    """align: weight of MSE(M(s), CLIP-text(caption))."""
    recon_weight: float = 1.0
    """align: weight of the reconstruction term, computed as `recon_weighting` says."""
    recon_weighting: str = "official"
    """align: official = MSE(N(M(s)), s) averaged over the whole right-padded batch [B, L, d_llm], pad
    positions included, times 77 / L (L: the batch's padded length), as the original code computes it.
    per_sample = each caption's MSE over its real tokens only, times 77 / its own length, averaged over the
    batch: pad states (which carry no caption) are not reconstructed and a caption's weight does not depend
    on the longest caption it is batched with (official weighs a real token of a len-token caption
    (len / L)^2 as much as per_sample does)."""
    cfg_dropout: float = 0.1
    """instruct: probability that a condition is replaced by the empty prompt's (classifier-free guidance)."""
    sample_every_n_steps: int = 0
    """instruct: log a grid of generated samples every N steps (0 disables)."""

    def __post_init__(self):
        _check(self.name in STAGES, f"stage.name must be one of {', '.join(STAGES)}; got {self.name!r}")
        _check(self.batch_size > 0, "stage.batch_size must be > 0")
        _check(self.global_batch_size is None or self.global_batch_size > 0, "stage.global_batch_size must be > 0")
        _check(self.target_weight >= 0 and self.recon_weight >= 0, "stage loss weights must be >= 0")
        _check(self.recon_weighting in RECON_WEIGHTINGS, f"stage.recon_weighting must be one of "
               f"{', '.join(RECON_WEIGHTINGS)}, got {self.recon_weighting!r}")
        _check(0 <= self.cfg_dropout < 1, "stage.cfg_dropout must be in [0, 1)")


@dataclass
class LLMConfig:
    """The MLLM's decoder: the original Kosmos-G / Kosmos-2 one (transformers' Kosmos-2 text model), with
    pre-LN + sub-LN blocks, GELU FFN, sinusoidal positions, embeddings scaled by sqrt(hidden_size) and an
    output projection tied to them. The vocabulary size is the tokenizer's (64007 for the paper's)."""

    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    ffn_dim: int = 8192
    """Width of each block's GELU feed-forward."""
    dropout: float = 0.1
    """Dropout on embeddings and block outputs while training (the paper: 0.1)."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities while training (the paper: 0.1)."""
    layer_norm_eps: float = 1e-5
    max_positions: int = 2048
    """Context length in tokens (the paper trains on 2048-token samples)."""
    tokenizer_path: Optional[str] = None
    """A folder with the original `sentencepiece.bpe.model` (+ dict.txt), or one written by `save_pretrained`
    of an MLLM tokenizer. None builds a small tokenizer from the tiny corpus (tiny preset only)."""

    def __post_init__(self):
        _check(self.hidden_size % self.num_heads == 0,
               f"model.llm.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        _check(self.num_layers > 0 and self.max_positions > 0 and self.ffn_dim > 0, "model.llm sizes must be > 0")
        _check(0 <= self.dropout < 1 and 0 <= self.attention_dropout < 1,
               "model.llm.dropout and model.llm.attention_dropout must be in [0, 1)")
        _check(self.layer_norm_eps > 0, "model.llm.layer_norm_eps must be > 0")


@dataclass
class AlignerConfig:
    """AlignerNet (the original's sub-LN encoder/decoder layers): M maps MLLM states to the U-Net's CLIP-text
    space, N reconstructs them. The paper preset is the original's size: M 225.5M, N 250.6M parameters."""

    num_heads: int = 12
    ffn_size: int = 3072
    encoder_layers: int = 12
    decoder_layers: int = 12
    num_queries: int = 77
    """The U-Net condition length (SD v1.5: 77): M's output rows. The CLIP text length follows it
    (`model.clip_max_tokens`, derived): stage 2's targets must have as many rows as M's output."""
    max_source_positions: int = 32768
    """Rows of the learned position tables and of N's query table (the original code uses 32768). Positions
    are counted from row 2 (fairseq's convention), so M and N take at most max_source_positions - 2 states."""
    dropout: float = 0.0
    query_init_std: float = 1.0
    """Initial scale of the learned queries (the original: 1.0). They start M's and N's residual streams: with few
    layers std-1 queries outweigh what the layers add and M's output stays nearly constant (the tiny preset: 0.02)."""

    def __post_init__(self):
        _check(self.encoder_layers > 0 and self.decoder_layers > 0, "model.aligner layer counts must be > 0")
        _check(self.query_init_std > 0, "model.aligner.query_init_std must be > 0")
        _check(self.num_queries > 0, "model.aligner.num_queries must be > 0")


@dataclass
class VisionConfig:
    """The CLIP ViT (transformers' Kosmos-2 vision model, QuickGELU) and the connector that turns its tokens into
    `num_image_tokens` decoder inputs. The defaults are OpenAI CLIP ViT-L/14 at 224 px, the paper's tower."""

    img_size: int = 224
    """Input resolution; CLIP-normalised crops of this size are fed to the tower."""
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    """Width of each ViT block's QuickGELU MLP."""
    weights_path: Optional[str] = None
    """Local CLIP weights of the image tower: an open_clip / OpenAI state dict (`ViT-L-14-sd.pt`), OpenAI's
    TorchScript `ViT-L-14.pt`, or a transformers CLIP folder/file. None: random init (tiny preset)."""
    unlocked_last_blocks: int = 1
    """Stages mllm/instruct train this many last ViT blocks (the paper: 1)."""
    unlock_final_norm: bool = True
    """...and the final LayerNorm (post_layernorm)."""
    num_image_tokens: int = 64
    """Connector latent queries: the slots per image in the MLLM input (the paper: 64)."""

    def __post_init__(self):
        _check(min(self.img_size, self.patch_size, self.hidden_size, self.num_layers, self.num_heads, self.ffn_dim,
                   self.num_image_tokens) > 0, "model.vision sizes must be > 0")
        _check(self.img_size % self.patch_size == 0,
               f"model.vision.img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        _check(self.hidden_size % self.num_heads == 0,
               f"model.vision.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        _check(0 <= self.unlocked_last_blocks <= self.num_layers,
               f"model.vision.unlocked_last_blocks must be in [0, num_layers={self.num_layers}]")


@dataclass
class TinyClipTextConfig:
    """Sizes of the CLIP text encoder built when `model.diffusion_path` is None (tiny preset)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128


@dataclass
class ModelConfig:
    """Every network of Kosmos-G and where its weights come from."""

    name: str = MISSING
    """Preset name (tiny, paper)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    diffusion_path: Optional[str] = None
    """A local Stable Diffusion v1.5-layout folder (text_encoder/, tokenizer/, unet/, vae/, scheduler/).
    None builds tiny random components from `tiny_clip_text` into the run's assets folder."""
    tiny_clip_text: TinyClipTextConfig = field(default_factory=TinyClipTextConfig)
    diffusion_dtype: str = "float32"
    """dtype of the frozen U-Net/VAE/CLIP-text (float32, float16, bfloat16): half precision halves their memory."""
    vae_image_size: int = 512
    """The resolution the U-Net/VAE work at (SD v1.5: 512; the tiny preset: 32). `data.vae_image_size` follows
    it unless set, and the tiny random SD folder (`model.diffusion_path=null`) is built for it."""

    @property
    def clip_max_tokens(self) -> int:
        """CLIP text length including <bos>/<eos> (captions keep at most 75 tokens, as in the paper): the U-Net
        condition length, `model.aligner.num_queries`, since M must produce one vector per CLIP token."""
        return self.aligner.num_queries

    def __post_init__(self):
        _check(self.vae_image_size > 0 and self.vae_image_size % 8 == 0,
               f"model.vae_image_size must be a positive multiple of 8 (the VAE downsamples by 8), "
               f"got {self.vae_image_size}")
        _check(self.aligner.max_source_positions >= self.llm.max_positions + 2,
               f"model.aligner.max_source_positions ({self.aligner.max_source_positions}) must be at least "
               f"model.llm.max_positions + 2 ({self.llm.max_positions + 2}): the aligner's positions start at row 2")
        _check(self.diffusion_dtype in ("float32", "float16", "bfloat16"),
               f"model.diffusion_dtype must be float32, float16 or bfloat16, got {self.diffusion_dtype!r}")


DEFAULT_MIXTURE = {
    "mllm": {"text": 1.0, "caption": 1.0, "interleaved": 1.0},
    "align": {"caption": 1.0},
    "instruct": {"caption": 1.0, "edit": 2.0, "subject": 2.0},  # the paper's 1 : 2 : 2
}


def available_cpus() -> int:
    """CPU cores this process may use (the affinity mask, which containers and SLURM set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


SMALL_IMAGES = 64
"""Up to this target size (tiny) no DataLoader worker by default (the demo sets one: stage 1 ran 14% faster)."""


def _per_kind() -> Dict[str, Optional[str]]:
    # Every kind is a key from the start, so `data.shards.caption=...` sets it (Hydra's struct mode would
    # refuse to add a key to an empty dict without `+`).
    return {kind: None for kind in SAMPLE_KINDS}


TINY_WORLD_COMMAND = "python -m kosmos_g.tinyworld.data --out {root}"  # data=tiny's shards (the core never writes them)


@dataclass
class DataConfig:
    """Where the training shards are (docs/data-format.md) and how they are mixed and read.

    `null` sizes are derived (`derive`): image size and text length from the model preset, workers and the
    shuffle buffer from the image size and this machine's cores. The resolved values are in `<stage>/config.yaml`.
    """

    name: str = MISSING
    root: str = MISSING
    """Folder holding one subfolder of .tar shards per sample kind: <root>/caption/*.tar, <root>/edit/*.tar..."""
    shards: Dict[str, Optional[str]] = field(default_factory=_per_kind)
    """Per-kind override of <root>/<kind>: a folder of .tar files or a webdataset brace pattern, e.g.
    `data.shards.caption=/data/coco` or `'data.shards.caption=/data/laion/{00000..09999}.tar'`."""
    mixture: Dict[str, Dict[str, float]] = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_MIXTURE.items()})
    """Per stage, the sampling weight of each sample kind."""
    num_workers: Optional[int] = None
    """DataLoader worker processes per device. null: 0 for images up to 64 px (tiny), else min(4, cores - 1)."""
    shuffle_buffer: Optional[int] = None
    """Raw samples shuffled per kind and reader. null: 64 for images up to 64 px (tiny), else 2000."""
    max_text_tokens: Optional[int] = None
    """Longer documents are skipped and counted (reason `too_long`). null: model.llm.max_positions."""
    entity_drop_prob: float = 0.5
    """Stage 3 (the official `--random-drop-caption-prob 0.5`): the probability that a subject sample's entity
    words are all dropped (one draw per sample) and that an edit sample's input caption is dropped."""
    vae_image_size: Optional[int] = None
    """Target images: centre crop to this size, scaled to [-1, 1], for the VAE. null: model.vae_image_size."""
    clip_text_cache: Optional[str] = None
    """stage=align: a `python -m kosmos_g.data.cache clip-text` folder for the caption shards; cached
    targets replace the CLIP text encoder's forward (samples missing from it are encoded live)."""
    vae_latent_caches: Dict[str, Optional[str]] = field(default_factory=_per_kind)
    """stage=instruct: per kind, a `python -m kosmos_g.data.cache vae-latents` folder; cached VAE moments
    replace the VAE encoder's forward for those targets."""

    def __post_init__(self):
        for key in ("shards", "vae_latent_caches"):
            unknown = sorted(set(getattr(self, key)) - set(SAMPLE_KINDS))
            _check(not unknown, f"data.{key} has unknown kinds {unknown}; kinds are {', '.join(SAMPLE_KINDS)}")
            setattr(self, key, {k: v for k, v in getattr(self, key).items() if v})  # only the kinds that are set
        _check(self.num_workers is None or self.num_workers >= 0, "data.num_workers must be >= 0 (or null)")
        _check(self.max_text_tokens is None or self.max_text_tokens >= 4, "data.max_text_tokens must be >= 4")
        _check(self.vae_image_size is None or (self.vae_image_size > 0 and self.vae_image_size % 8 == 0),
               f"data.vae_image_size must be a positive multiple of 8 (or null), got {self.vae_image_size}")
        _check(0 <= self.entity_drop_prob <= 1, "data.entity_drop_prob must be in [0, 1]")
        for stage, mix in self.mixture.items():
            _check(stage in STAGES, f"data.mixture has unknown stage {stage!r}; stages are {', '.join(STAGES)}")
            _check(all(k in SAMPLE_KINDS for k in mix),
                   f"data.mixture.{stage} has unknown kinds {sorted(set(mix) - set(SAMPLE_KINDS))}; "
                   f"kinds are {', '.join(SAMPLE_KINDS)}")
            _check(sum(mix.values()) > 0 and all(w >= 0 for w in mix.values()),
                   f"data.mixture.{stage} weights must be >= 0 with a positive sum")

    def derive(self, model: Optional["ModelConfig"] = None) -> "DataConfig":
        """Fill every null setting from the model preset and this machine. Without a model (a DataConfig built
        on its own, e.g. in tests): 512 px, 128 tokens, no worker processes, a 256-sample buffer."""
        if model is None:
            for key, value in (("vae_image_size", 512), ("max_text_tokens", 128), ("num_workers", 0),
                               ("shuffle_buffer", 256)):
                if getattr(self, key) is None:
                    setattr(self, key, value)
            return self
        if self.vae_image_size is None:
            self.vae_image_size = model.vae_image_size
        if self.max_text_tokens is None:
            self.max_text_tokens = model.llm.max_positions
        small = self.vae_image_size <= SMALL_IMAGES
        if self.num_workers is None:
            per_device = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
            self.num_workers = 0 if small else max(0, min(4, per_device - 1))
        if self.shuffle_buffer is None:
            self.shuffle_buffer = 64 if small else 2000
        return self


STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
# The paper preset's repeated blocks: Kosmos-2 text blocks and ViT layers, the aligner's encoder/decoder layers.
DEFAULT_WRAP_LAYERS = ["Kosmos2TextBlock", "Kosmos2VisionEncoderLayer", "AlignerEncoderLayer", "AlignerDecoderLayer"]


@dataclass
class TrainerConfig:
    """Arguments for `lightning.Trainer` and the distributed strategy (`kosmos_g/scale.py`, docs/scaling.md)."""

    name: str = MISSING
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    """auto (one device; several devices become ddp), ddp, or fsdp."""
    precision: str = "32-true"
    """Lightning precision: 32-true, bf16-mixed (A100/H100), 16-mixed (V100: fp16 with a gradient scaler)."""
    max_steps: int = 200
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    """Write checkpoints/step-N.ckpt and last.ckpt every N steps; also the data stream's re-seed interval."""
    deterministic: bool = False
    activation_checkpointing: bool = False
    """Recompute the MLLM's decoder layers, ViT blocks and aligner layers in backward: less memory, ~30% more compute.
    Under fsdp the strategy does it instead, on `checkpoint_layers`."""
    max_bad_steps: int = 10
    """A non-finite loss or gradient skips the step; this many in a row stops the run with an error."""
    find_unused_parameters: bool = True
    """ddp: tolerate parameters that get no gradient in a step (DDP otherwise raises on them)."""
    process_group_backend: Optional[str] = None
    """nccl / gloo; None lets Lightning choose (nccl on GPUs, gloo on CPU)."""
    fsdp_sharding: str = "FULL_SHARD"
    """fsdp: FULL_SHARD (ZeRO-3), SHARD_GRAD_OP (ZeRO-2), HYBRID_SHARD (full shard in a node, replicas across), NO_SHARD."""
    fsdp_wrap_layers: List[str] = field(default_factory=lambda: list(DEFAULT_WRAP_LAYERS))
    """fsdp: class names of the layers that become their own FSDP unit (all-gathered one at a time)."""
    checkpoint_layers: List[str] = field(default_factory=lambda: list(DEFAULT_WRAP_LAYERS))
    """fsdp + activation_checkpointing: class names recomputed in backward (may add e.g. BasicTransformerBlock)."""
    fsdp_ignored_modules: List[str] = field(default_factory=lambda: ["diffusion", "text_encoder"])
    """fsdp: LightningModule attributes left out of FSDP (frozen, replicated on every GPU): the U-Net/VAE and
    the CLIP text encoder, which never train, so sharding them would only add all-gathers."""
    fsdp_cpu_offload: bool = False
    """fsdp: keep sharded parameters (and their optimizer state) in CPU memory."""
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """On any of these signals: finish the step, write checkpoints/last.ckpt, exit cleanly (no export)."""
    exact_data_resume: bool = True
    """Resuming between two checkpoint_every_n_steps boundaries (a preemption checkpoint) replays the data
    stream from the boundary without training on it, so the batches are exactly an uninterrupted run's."""

    def __post_init__(self):
        _check(self.max_bad_steps > 0, "trainer.max_bad_steps must be > 0")
        _check(self.max_steps > 0, "trainer.max_steps must be > 0")
        _check(self.log_every_n_steps > 0, "trainer.log_every_n_steps must be > 0")
        _check(self.checkpoint_every_n_steps > 0, "trainer.checkpoint_every_n_steps must be > 0")
        _check(self.strategy in STRATEGIES,
               f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        _check(str(self.precision) in PRECISIONS,
               f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.fsdp_sharding in FSDP_SHARDING,
               f"trainer.fsdp_sharding must be one of {', '.join(FSDP_SHARDING)}, got {self.fsdp_sharding!r}")
        _check(self.num_nodes > 0, "trainer.num_nodes must be > 0")
        import signal
        bad = [s for s in self.preempt_signals if not isinstance(getattr(signal, str(s), None), signal.Signals)]
        _check(not bad, f"trainer.preempt_signals has unknown signals {bad}; use names such as SIGTERM, SIGUSR1")


@dataclass
class EvalConfig:
    """Validation while training stage=instruct: DreamBench-protocol scores on a small subset, to TensorBoard."""

    every_n_steps: int = 0
    """Run the validation every N training steps (0 disables it)."""
    dreambench_root: Optional[str] = None
    """The DreamBench folder (30 subject folders + prompts_and_classes.txt), e.g. ../shared/dreambench."""
    clip_path: Optional[str] = None
    """Local CLIP folder (transformers CLIPModel + processor) for CLIP-I / CLIP-T."""
    dino_path: Optional[str] = None
    """Local DINO ViT-S/16 weights file for the DINO score."""
    subjects: int = 2
    """Subjects (in DreamBench order) used by the validation subset."""
    prompts: int = 2
    """Prompts per subject in the subset."""
    steps: int = 10
    """Sampler steps per image during validation."""
    guidance: float = 6.0

    def __post_init__(self):
        _check(self.every_n_steps >= 0, "eval.every_n_steps must be >= 0 (0 disables validation)")
        _check(self.subjects >= 1 and self.prompts >= 1 and self.steps >= 1,
               "eval.subjects, eval.prompts and eval.steps must be >= 1")
        if self.every_n_steps:
            missing = [k for k in ("dreambench_root", "clip_path", "dino_path") if not getattr(self, k)]
            _check(not missing, f"eval.every_n_steps={self.every_n_steps} needs local paths for "
                                f"{', '.join('eval.' + k for k in missing)} (nothing is downloaded)")


@dataclass
class TrainConfig:
    """One training run of one stage: `python train.py stage=<mllm|align|instruct> [overrides]`."""

    stage: StageConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_name: str = "tiny"
    """Experiment name; all stages of one experiment live in `<runs_dir>/<run_name>/`."""
    runs_dir: str = "runs"
    """Root folder of all runs (relative paths are relative to the working directory)."""
    init_from: str = "auto"
    """Where earlier stages' weights come from: `auto` (this run's exports), `none` (fresh init; only
    valid for stage=align with a random MLLM, or stage=mllm), or a path: an export folder, or a run's
    stage folder's parent (`runs/<name>`)."""
    resume: str = "auto"
    """`auto`: continue from this stage's `checkpoints/last.ckpt` when it exists; `none`: start over
    (existing checkpoints are moved aside, never deleted); or a path to a .ckpt file."""
    seed: int = 0

    def __post_init__(self):
        _check(bool(self.run_name) and "/" not in self.run_name,
               f"run_name must be a non-empty name without '/', got {self.run_name!r}")
        self.data.derive(self.model)  # first: the batch derivation reads data.max_text_tokens
        from kosmos_g.batching import derive_batch  # its own module: keeps this one to the schema

        derive_batch(self)


def register_configs() -> None:
    """Register the schema so `configs/train.yaml` can name it first in its defaults list."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve and build the dataclasses (running every `__post_init__` check)."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. a missing mandatory value or a bad interpolation
        raise ConfigError(str(e)) from e


def load_config(overrides: list[str] = (), config_dir: Path = CONFIG_DIR) -> TrainConfig:
    """Compose `configs/train.yaml` with command-line style overrides, as `train.py` does (for tests, notebooks)."""
    from kosmos_g.overrides import check_override_keys, quote_braces

    overrides = quote_braces(list(overrides))
    check_override_keys(overrides, config_dir)
    register_configs()
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        try:
            cfg = compose("train", overrides=overrides)
        except Exception as e:  # Hydra puts the useful part ("could not be converted to Float") in the cause
            raise ConfigError(f"{e}: {e.__cause__}" if e.__cause__ else str(e)) from e
    return to_train_config(cfg)
