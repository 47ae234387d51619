"""Stage 3, `stage=instruct`: score-distillation instruction tuning through the frozen U-Net.

For an interleaved instruction x and its target image y:

    c = M(MLLM(x))                              the U-Net condition, [B, 77, d_clip]
    z = VAE(y);  z_t = noise(z, eps, t)         frozen VAE, DDPM training noise
    loss = MSE(UNet(z_t, t, c), eps)            frozen U-Net; gradients reach c only

Trains the MLLM (decoder, connector, last ViT block + final norm) and aligner M; N is unused and frozen.
With probability `stage.cfg_dropout` a condition is replaced by the null prompt's (`<s>` alone), so the
model also learns the null condition classifier-free guidance needs.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from kosmos_g.assets import corpus, stage_diffusion_folder
from kosmos_g.config import ConfigError, TrainConfig
from kosmos_g.data.cache import FeatureCache, latents_from_moments
from kosmos_g.data.datamodule import KosmosGDataModule, resume_settings, vae_image_transform
from kosmos_g.data.format import Entity, InputCaption, Sample, SubjectImage
from kosmos_g.models.aligner import AlignerNet
from kosmos_g.models.diffusion import FrozenDiffusion
from kosmos_g.models.kosmos_g import condition
from kosmos_g.pipeline import KosmosGPipeline
from kosmos_g.processor import KosmosGProcessor
from kosmos_g.scale import sharded_call
from kosmos_g.stages.base import StageModule, checked_cache, encode_or_skip, means_by_kind
from kosmos_g.stages.common import load_mllm

TIMESTEP_BUCKETS = 4  # loss is also logged per quarter of the noise schedule


def instruction(sample: Sample, rng: random.Random, entity_drop_prob: float,
                caption_drop_prob: float | None = None) -> list:
    """The prompt of a sample as `str | PIL.Image` segments (captions: the text; edits: [input caption],
    source, instruction).

    As the official data loaders do (kosmos-g/unilm/data/vl/openimage_loader.py and
    instructpix2pix_loader.py, both driven by one `--random-drop-caption-prob 0.5`):
    - subject samples: *one* draw per sample decides whether all entity words are dropped (probability
      `entity_drop_prob`), so a prompt names either every subject or none; each subject image is its crop
      or, when there is one, the crop on white, with equal odds;
    - edit samples: the input caption is dropped with `caption_drop_prob` (default: `entity_drop_prob`).
    """
    if sample.kind == "caption":
        return [sample.text]
    caption_drop_prob = entity_drop_prob if caption_drop_prob is None else caption_drop_prob
    # Drawn only when there are entity words: the same random stream as one draw per word for samples
    # with one entity (the tiny world's), so their prompts are as before.
    has_entities = any(isinstance(seg, Entity) for seg in sample.segments)
    drop_entities = has_entities and rng.random() < entity_drop_prob
    out = []
    for seg in sample.segments:
        if isinstance(seg, Entity):
            if not drop_entities:
                out.append(seg.text)
        elif isinstance(seg, InputCaption):
            if rng.random() >= caption_drop_prob:
                out.append(seg.text)
        elif isinstance(seg, SubjectImage):
            out.append(seg.on_white if seg.on_white is not None and rng.random() < 0.5 else seg.image)
        else:
            out.append(seg)
    return out


def with_row(batch: dict, extra: dict, pad_id: int) -> dict:
    """The processor batch `batch` with the one-row batch `extra` (no images) appended as its last row; the
    shorter is right-padded (attention 0), so every row computes what it would alone."""
    length = max(batch["input_ids"].shape[1], extra["input_ids"].shape[1])
    out = dict(batch)
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("image_mask", 0)):
        rows = [t.to(batch[key].device).long() for t in (batch[key], extra[key])]  # F.pad does not take bool
        out[key] = torch.cat([F.pad(t, (0, length - t.shape[1]), value=value) for t in rows]).to(batch[key].dtype)
    return out


class InstructFeatures:
    def __init__(self, processor: KosmosGProcessor, image_size: int, max_text_tokens: int, entity_drop_prob: float,
                 caches: dict[str, FeatureCache] | None = None):
        self.processor, self.max_text_tokens, self.entity_drop_prob = processor, max_text_tokens, entity_drop_prob
        self.target_transform = vae_image_transform(image_size)
        self.caches = caches or {}  # precomputed VAE moments of the targets, per kind (data.vae_latent_caches)

    def __call__(self, sample: Sample, rng: random.Random) -> dict:
        prompt = instruction(sample, rng, self.entity_drop_prob)
        encoded = encode_or_skip(self.processor, prompt, self.max_text_tokens)
        cache = self.caches.get(sample.kind)
        return {"encoded": encoded, "target": self.target_transform(sample.target.convert("RGB")),
                "moments": cache.get(sample.key) if cache is not None else None,
                "kind": sample.kind, "prompt": prompt}

    def collate(self, features: list[dict]) -> dict:
        batch = self.processor.collate([f["encoded"] for f in features])
        batch["target_pixels"] = torch.stack([f["target"] for f in features])
        batch["kinds"] = [f["kind"] for f in features]
        batch["prompts"] = [f["prompt"] for f in features]
        if all(f["moments"] is not None for f in features):  # a fully cached batch skips the VAE encoder
            batch["target_moments"] = torch.stack([f["moments"] for f in features])
        return batch


class ScoreDistillTuner(StageModule):
    def __init__(self, mllm, processor: KosmosGProcessor, aligner: AlignerNet, diffusion: FrozenDiffusion,
                 cfg: TrainConfig):
        super().__init__(cfg)
        self.processor = processor
        self.mllm, self.aligner, self.diffusion = mllm, aligner, diffusion
        # Freezing, explicit as in diffusers' train_text_to_image.py. Trains: the MLLM but the ViT's first blocks,
        # and M. Frozen: the ViT's first blocks, N (not part of the stage-3 graph), the unet and the vae.
        self.mllm.requires_grad_(True)
        self.mllm.lock_vision(cfg.model.vision.unlocked_last_blocks, cfg.model.vision.unlock_final_norm)
        self.aligner.lock_reconstruction()
        self.diffusion.lock()  # unet and vae: no gradients, eval mode, never optimised
        self.mllm.set_activation_checkpointing(cfg.trainer.activation_checkpointing)
        self.aligner.set_activation_checkpointing(cfg.trainer.activation_checkpointing)
        self.empty_prompt = processor.collate([processor.null_prompt()])  # the null condition's input, `<s>`
        self.sample_prompts: list | None = None  # fixed at the first batch, reused for every sample grid

    def cfg_drop_mask(self, batch_size: int) -> torch.Tensor:
        """True where the condition is replaced by the null one (probability `stage.cfg_dropout`)."""
        return torch.rand(batch_size, device=self.device) < self.cfg.stage.cfg_dropout

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.sample_prompts is None:
            self.sample_prompts = batch["prompts"][:4]
        diffusion = self.diffusion  # the frozen unet, vae and noise_scheduler; each call below is a few diffusers lines

        # 1. Latents of the targets: vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor, no grad
        #    (drawn from the cached posterior moments instead when the batch has them: no vae forward then).
        if "target_moments" in batch:
            latents = latents_from_moments(batch["target_moments"], diffusion.scaling_factor)
        else:
            latents = diffusion.encode_images(batch["target_pixels"])
        # 2. Noise: noise = randn, timesteps uniform in [0, 1000), noise_scheduler.add_noise(latents, noise, timesteps).
        noisy_latents, noise, timesteps = diffusion.add_noise(latents)

        # 3. The condition M(MLLM(x)) [B, 77, d_clip]. The null condition M(MLLM(`<s>`)) is computed at every
        #    step, as one more row of the same forward, and broadcast to the dropped conditions: under FSDP every
        #    forward all-gathers, so every rank must run the same forwards whatever its random drops (an extra
        #    pass on some ranks only deadlocks the collectives). The null condition trains as well.
        rows = with_row(batch, self.empty_prompt, self.processor.tokenizer.pad_token_id)
        both = condition(self.mllm, self.aligner, rows)                              # [B + 1, 77, d_clip]
        cond, null = both[:-1], both[-1:]
        drop = self.cfg_drop_mask(len(cond))                                          # classifier-free guidance
        encoder_hidden_states = torch.where(drop[:, None, None], null.expand_as(cond), cond)

        # 4. unet(noisy_latents, timesteps, encoder_hidden_states).sample: frozen, gradients reach the condition only.
        model_pred = diffusion.predict_noise(noisy_latents, timesteps, encoder_hidden_states)
        # 5. Loss: MSE to the noise (epsilon prediction), per image, then the batch mean.
        per_sample = F.mse_loss(model_pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = per_sample.mean()

        logs = {"train/loss": loss, "instruct/cfg_dropped": drop.float().mean()}
        bucket = timesteps * TIMESTEP_BUCKETS // diffusion.num_train_timesteps
        logs |= means_by_kind("instruct/loss_t", per_sample, {  # noise-schedule quarters present
            str(b): (bucket == b).float() for b in range(TIMESTEP_BUCKETS) if (bucket == b).any()})
        logs |= means_by_kind("instruct/loss_", per_sample, {
            kind: torch.tensor([k == kind for k in batch["kinds"]], device=self.device).float()
            for kind in sorted(set(batch["kinds"]))})
        self.log_dict(logs, prog_bar=True, batch_size=len(per_sample))
        return loss

    def forward(self, fn):
        """`fn()`: hooks run their generation through here (`kosmos_g.scale.sharded_call`), so that under FSDP
        it goes through the root unit's forward, which gathers the weights it needs."""
        return fn()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.cfg.stage.sample_every_n_steps
        if every and self.global_step % every == 0 and self.logger is not None:
            self.log_samples()  # on every rank (sharded forwards are collectives); rank 0 logs

    @torch.no_grad()
    def log_samples(self) -> None:
        """Generate for the fixed sample prompts (each rank its own) and log rank 0's grid to TensorBoard."""
        pipe = self.pipeline().use_scheduler("dpm++")
        pipe.set_progress_bar_config(disable=True)
        was_training = self.training
        self.eval()
        images = sharded_call(self.trainer, lambda: pipe(
            self.sample_prompts, num_inference_steps=10, guidance_scale=4.0, output_type="pt",
            generator=torch.Generator().manual_seed(0)).images)
        self.train(was_training)
        if self.trainer.is_global_zero:
            self.logger.experiment.add_image("samples", make_grid(images.float().cpu(), nrow=len(images)),
                                             self.global_step)

    def pipeline(self) -> KosmosGPipeline:
        d = self.diffusion
        return KosmosGPipeline(mllm=self.mllm, processor=self.processor, aligner=self.aligner, unet=d.unet,
                               vae=d.vae, scheduler=d.noise_scheduler)

    def configure_callbacks(self):
        if not self.cfg.eval.every_n_steps:
            return []
        from kosmos_g.eval.callback import ValidationCallback  # only needed when validation is switched on

        return [ValidationCallback(self.cfg.eval)]

    def export_parts(self) -> dict:
        """The export is a whole `KosmosGPipeline` folder (sampling with DPM-Solver++ by default)."""
        return {".": lambda path: self.pipeline().use_scheduler("dpm++").save_pretrained(path)}


def build(cfg: TrainConfig, assets: Path, init_export: Path | None, resume_step: int | None = None):
    """The tuner, starting from the align export (MLLM + processor + aligner), and the 1:2:2 DataModule.
    `resume_step`: the optimizer step train.py starts the data stream at (`resume_settings`)."""
    texts = lambda: corpus(cfg.data)  # noqa: E731
    mllm, processor, _ = load_mllm(cfg, assets, init_export, texts)
    aligner = AlignerNet.from_pretrained(init_export / "aligner")
    sd = stage_diffusion_folder(cfg, assets)
    diffusion = FrozenDiffusion.from_pretrained(str(sd), dtype=getattr(torch, cfg.model.diffusion_dtype))
    if aligner.config.clip_dim != diffusion.cross_attention_dim:
        raise ConfigError(f"the aligner in {init_export} outputs width {aligner.config.clip_dim}, but the U-Net in "
                          f"{sd} attends to width {diffusion.cross_attention_dim}: run stage=align against the "
                          "same model.diffusion_path as stage=instruct")
    module = ScoreDistillTuner(mllm, processor, aligner, diffusion, cfg)
    caches = {kind: checked_cache(folder, f"data.vae_latent_caches.{kind}", "vae-latents", "remove the entry",
                                  type="vae-latents", size=cfg.data.vae_image_size)
              for kind, folder in cfg.data.vae_latent_caches.items()}
    features = InstructFeatures(processor, cfg.data.vae_image_size, cfg.data.max_text_tokens,
                                cfg.data.entity_drop_prob, caches)
    data = KosmosGDataModule(cfg.data, "instruct", cfg.stage.batch_size, features, features.collate, cfg.seed,
                             **resume_settings(cfg, resume_step))
    return module, data
