"""Teachers: tiny stand-ins for the frozen pretrained parts, trained once in the tiny world.

Kosmos-G keeps CLIP (text tower: the U-Net's condition space and the target of stage 2; both towers:
CLIP-I / CLIP-T in evaluation) and Stable Diffusion v1.5 (VAE + U-Net) frozen. None of them can be
downloaded here, and random ones would make every downstream number meaningless, so
`train_teachers` trains small ones on the world's train split and writes them in the real formats:

    out_dir/clip/    transformers CLIPModel + CLIPProcessor (tokenizer trained on the captions)
                     -> kosmos_g.eval.metrics.load_clip(out_dir / "clip")
    out_dir/sd/      Stable Diffusion v1.5 layout: tokenizer/, text_encoder/ (CLIP's text tower as a
                     CLIPTextModel), vae/, unet/, scheduler/ (DDPM, SD v1.5 betas), model_index.json
                     -> FrozenDiffusion.from_pretrained(out_dir / "sd"),
                        CLIPTextModel.from_pretrained(out_dir / "sd" / "text_encoder"),
                        StableDiffusionPipeline.from_pretrained(out_dir / "sd", safety_checker=None)
    out_dir/oracle/  the attribute oracle (see oracle.py) -> Oracle.from_pretrained(out_dir / "oracle")
    out_dir/teachers.json   the config, seed, size and timings; written last: it marks the folder complete

What each learns from (teacher_data.py: `world_data`, `codec_images`, `closeup_data`): CLIP from the
train split's captioned scenes (1-2 objects) and close-ups of single objects, a share of the captions
cut to one attribute ("a triangle"); the VAE, a pixel codec, from every one-object render (held-out ones included);
the U-Net from the train split's one- and two-object scenes (stage 3 asks it for both). With `heldout=True` CLIP and the
U-Net see the held-out combinations too, like a real SD that has seen every concept.

The order matters: CLIP first (the U-Net is conditioned on its frozen text states), the VAE next (the
U-Net learns its latents), then the U-Net, trained like SD: epsilon prediction on VAE latents,
conditioned on the 77-token last_hidden_state of the caption, the caption dropped to "" 10% of the
time so classifier-free guidance works. Latent statistics and text states are computed once and
cached, which leaves the U-Net's own forward/backward as the only per-step cost.

Everything is built in `out_dir.tmp/` and renamed to `out_dir` when complete; a finished part left
there by an interrupted run is reused. A second call with the same settings returns at once.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.utils import is_accelerate_available
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from kosmos_g.config import AlignerConfig
from kosmos_g.models.diffusion import SD15_SCHEDULER, build_tiny_unet, build_tiny_vae
from kosmos_g.models.tokenizers import train_clip_tokenizer
from kosmos_g.tinyworld.oracle import degrade, train_oracle
from kosmos_g.tinyworld.teacher_data import PARTIALS, closeup_data, codec_images, near_misses, world_data
from kosmos_g.tinyworld.world import Scene

MANIFEST = "teachers.json"
CLIP_MAX_TOKENS = AlignerConfig.num_queries  # the schema default condition length (SD v1.5: 77): captions pad to it
# diffusers asks for `accelerate` unless told not to use low_cpu_mem_usage (as models/diffusion.py does).
LOAD_KW = dict(local_files_only=True, low_cpu_mem_usage=is_accelerate_available())


@dataclass(frozen=True)
class TeacherConfig:
    """Sizes and step counts of the teachers. `BUDGETS` names the two used: default (demo) and quick (tests)."""

    n_captions: int = 1600
    """Captioned train scenes (1-2 objects) added to the 400 one-object train scenes."""
    heldout: bool = True
    """Let CLIP and the U-Net see the test split's held-out combinations too (see `world_data`)."""
    clip_width: int = 64
    """Width of both CLIP towers; the text width is the U-Net's cross_attention_dim (64 = tiny preset)."""
    clip_layers: int = 2
    clip_patch: int = 8
    clip_steps: int = 1000
    """1000, not 500: with the close-ups, 500 steps left their shapes half read (close-up caption retrieval
    65%); at 1000 a linear probe fitted on train pairs reads held-out close-ups' shape 100% of the time.
    The text states carry position more weakly than shape and colour (at 500 steps, changing "top left"
    to "bottom right" moved them 0.010 in mean squared distance, against 0.16 for the shape word), but
    enough: a U-Net trained long enough puts 98% of one-object captions in place (`unet_steps`)."""
    clip_batch: int = 128
    clip_partial: float = 0.3
    """Fraction of captions replaced by one attribute of the scene ("a triangle", "something red"); see
    `train_clip`."""
    clip_lr: float = 1e-3
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 4e-3
    vae_kl: float = 1e-6
    unet_blocks: tuple = (32, 64)
    unet_steps: int = 2400
    """2400, not 1200: position is learnt late. Held-out one-object captions drawn by the U-Net trained on
    1-2 objects, read by the oracle (guidance 4, 100 captions): 1200 steps shape 90 / position 21%; 2400
    steps 98 / 98%; 4800 steps 98 / 100% (colour and background 97-100% throughout; one-object-only
    training at 1200 steps: 97 / 58%). The loss falls from ~0.069 to ~0.030 between steps 1200 and 1800.
    Two-object captions stay hard (both objects right at their places: 2.5 / 4 / 4% at 1200 / 2400 / 4800
    steps; 4% with 3x the captions too): the second object named is drawn worse than the first."""
    unet_batch: int = 32
    unet_lr: float = 3e-3
    unet_max_objects: int = 2
    """Train the U-Net on scenes with at most this many objects: the two-subject targets have two."""
    uncond_prob: float = 0.1
    """Fraction of captions replaced by "" while training the U-Net (what CFG's negative branch sees)."""
    ema_decay: float = 0.995
    oracle_steps: int = 800

    def __post_init__(self):
        if self.unet_max_objects not in (1, 2):
            raise ValueError(f"TeacherConfig.unet_max_objects must be 1 or 2 (the world's scenes), "
                             f"got {self.unet_max_objects}")
        for name in ("clip_partial", "uncond_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"TeacherConfig.{name} is a fraction of captions, so it must be in [0, 1]; "
                                 f"got {getattr(self, name)}")


BUDGETS = {
    "default": TeacherConfig(),
    "quick": TeacherConfig(n_captions=200, clip_steps=20, vae_steps=20, unet_steps=30, oracle_steps=250,
                           clip_batch=64, vae_batch=16, unet_batch=16),
}


def _log(message: str, t0: Optional[float] = None) -> None:
    print(f"[teachers] {message}" + (f" ({time.perf_counter() - t0:.1f} s)" if t0 is not None else ""),
          flush=True)


def _cosine_with_warmup(opt: torch.optim.Optimizer, steps: int, warmup_frac: float = 0.05):
    warmup = max(1, int(steps * warmup_frac))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 1.0) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))))


@contextmanager
def _quiet():
    """No per-file progress bars from transformers while many tiny models are saved and loaded."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _every(steps: int) -> int:
    return max(1, steps // 4)


# ---- 1. CLIP -------------------------------------------------------------------------------------------

def build_clip(tokenizer: CLIPTokenizer, cfg: TeacherConfig, size: int) -> CLIPModel:
    w = cfg.clip_width
    text = dict(vocab_size=len(tokenizer), hidden_size=w, num_hidden_layers=cfg.clip_layers,
                num_attention_heads=4, intermediate_size=2 * w, max_position_embeddings=CLIP_MAX_TOKENS,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=size, patch_size=cfg.clip_patch, hidden_size=w, num_hidden_layers=cfg.clip_layers,
                  num_attention_heads=4, intermediate_size=2 * w)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=w))


def train_clip(scenes: Sequence[Scene], captions: Sequence[str], images: torch.Tensor, cfg: TeacherConfig,
               seed: int, closeups: Optional[tuple] = None) -> tuple[CLIPModel, CLIPProcessor]:
    """Contrastive (InfoNCE both ways) on (image, text) pairs; every text an image fits counts as a match.

    Half of each batch is pairs of near misses (two scenes differing in one attribute), so that every
    attribute is worth encoding: with random batches colour alone separates most pairs. Position is
    still encoded only weakly (see `TeacherConfig.clip_steps`). A `clip_partial` share of the captions
    is swapped for one attribute ("a triangle" matches every triangle in the batch), as web captions
    often name one thing: trained on full captions only, the image embedding was a code for each
    (shape, colour) pair, and a linear probe fitted on train pairs read the shape of held-out pairs
    0% of the time; the Kosmos-G stages, which learn to read subjects from these features, could not
    carry a held-out pair's shape either."""
    t0 = time.perf_counter()
    misses = near_misses(scenes)
    if closeups is not None:   # (scenes, captions, images) of `closeup_data`, near misses among themselves
        misses += [[len(scenes) + j for j in m] for m in near_misses(closeups[0])]
        scenes, captions = [*scenes, *closeups[0]], [*captions, *closeups[1]]
        images = torch.cat([images, closeups[2]])
    tokenizer = train_clip_tokenizer(list(captions) + list(PARTIALS))
    tokenizer.model_max_length = CLIP_MAX_TOKENS
    size = images.shape[-1]
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}), tokenizer=tokenizer)
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    ids = tokenizer(list(captions), padding="longest", return_tensors="pt").input_ids
    unique = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([unique[c] for c in captions])
    partial_ids = tokenizer(list(PARTIALS), padding="max_length", max_length=ids.shape[1],
                            return_tensors="pt").input_ids
    fits = torch.tensor([[test(s) for s in scenes] for test in PARTIALS.values()])   # [partial, scene]

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = build_clip(tokenizer, cfg, size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    sched = _cosine_with_warmup(opt, cfg.clip_steps)
    anchors = torch.tensor([i for i, m in enumerate(misses) if m])
    for step in range(1, cfg.clip_steps + 1):
        pairs = anchors[torch.randint(len(anchors), (cfg.clip_batch // 4,), generator=g)].tolist()
        partners = [misses[i][int(torch.randint(len(misses[i]), (), generator=g))] for i in pairs]
        rest = torch.randint(len(captions), (cfg.clip_batch - 2 * len(pairs),), generator=g)
        idx = torch.cat([torch.tensor(pairs + partners, dtype=torch.long), rest])
        x = images[idx]
        half = len(idx) // 2   # half the images mildly degraded: CLIP-I later reads generated images
        x = torch.cat([x[:half], degrade(x[half:], g, strength=0.5)])
        # Texts: the captions, a share swapped for a one-attribute description the scene fits.
        swap = torch.rand(len(idx), generator=g) < cfg.clip_partial
        fitting = fits[:, idx].T.float()                                            # [batch, partial]
        choice = torch.multinomial(fitting, 1, generator=g)[:, 0]       # every scene fits some shape
        input_ids = torch.where(swap[:, None], partial_ids[choice], ids[idx])
        match = caption_id[idx, None] == caption_id[None, idx]                       # [text, image]
        match = torch.where(swap[:, None], fits[choice][:, idx], match).float()
        out = model(input_ids=input_ids, pixel_values=(x - mean) / std)
        loss = (F.cross_entropy(out.logits_per_text, match / match.sum(1, keepdim=True)) +
                F.cross_entropy(out.logits_per_image, match.T / match.T.sum(1, keepdim=True))) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % _every(cfg.clip_steps) == 0 or step == cfg.clip_steps:
            _log(f"clip step {step}/{cfg.clip_steps} loss {loss.item():.3f}", t0)
    return model.eval(), processor


# ---- 2. VAE --------------------------------------------------------------------------------------------

def train_vae(images: torch.Tensor, cfg: TeacherConfig, seed: int) -> AutoencoderKL:
    """A tiny KL autoencoder (4x down, 4 channels), L1+L2 reconstruction and a small KL term.

    `scaling_factor` is set to 1 / std of the latents, so scaled latents have unit variance as in SD."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = build_tiny_vae(sample_size=images.shape[-1]).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = _cosine_with_warmup(opt, cfg.vae_steps)
    for step in range(1, cfg.vae_steps + 1):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=g)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(g)).sample
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + cfg.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % _every(cfg.vae_steps) == 0 or step == cfg.vae_steps:
            _log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f}", t0)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x * 2 - 1).latent_dist.mode() for x in images.split(256)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    _log(f"vae scaling_factor {vae.config.scaling_factor:.4f} (latent mean {latents.mean():.3f})")
    return vae


# ---- 3. U-Net ------------------------------------------------------------------------------------------

@torch.no_grad()
def text_states(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, texts: Sequence[str]) -> torch.Tensor:
    """[N, 77, width] last_hidden_state, exactly as StableDiffusionPipeline encodes a prompt."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return torch.cat([text_encoder(chunk)[0] for chunk in ids.split(256)])


def train_unet(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
               captions: Sequence[str], images: torch.Tensor, cfg: TeacherConfig, seed: int):
    """Epsilon prediction on posterior samples of VAE latents, conditioned on frozen CLIP-text states.

    Returns the EMA of the U-Net's weights (sharper samples after a short run than the last weights)."""
    t0 = time.perf_counter()
    with torch.no_grad():   # the caches: latent posteriors and one text state per distinct caption
        posts = [vae.encode(x * 2 - 1).latent_dist for x in images.split(256)]
        mean, std = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
        unique = list(dict.fromkeys(captions))
        states = text_states(text_encoder, tokenizer, unique + [""])   # the last one: the empty caption
    index = {c: i for i, c in enumerate(unique)}
    caption_id = torch.tensor([index[c] for c in captions])
    sf = float(vae.config.scaling_factor)
    _log(f"unet caches: {len(images)} latents {tuple(mean.shape[1:])}, {len(unique)} captions", t0)

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler(**SD15_SCHEDULER)
    unet = build_tiny_unet(text_encoder.config.hidden_size, sample_size=images.shape[-1] // 4,
                           block_out_channels=cfg.unet_blocks).train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    sched = _cosine_with_warmup(opt, cfg.unet_steps)
    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(len(images), (cfg.unet_batch,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        drop = torch.rand(len(idx), generator=g) < cfg.uncond_prob
        cond = states[torch.where(drop, len(unique), caption_id[idx])]
        pred = unet(scheduler.add_noise(latents, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))   # short warm-up: early weights fade fast
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        if step % _every(cfg.unet_steps) == 0 or step == cfg.unet_steps:
            _log(f"unet step {step}/{cfg.unet_steps} loss {loss.item():.4f}", t0)
    unet.load_state_dict(ema)
    return unet.eval()


def clip_text_encoder(clip: CLIPModel) -> CLIPTextModel:
    """CLIP's text tower as a standalone CLIPTextModel (what SD's text_encoder/ holds), same weights."""
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval()


def save_sd_folder(folder: Path, vae: AutoencoderKL, clip: CLIPModel, tokenizer: CLIPTokenizer, unet) -> Path:
    """Write the SD v1.5-layout folder (model_index.json included, so StableDiffusionPipeline loads it)."""
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip_text_encoder(clip), tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


# ---- the whole set, cached ---------------------------------------------------------------------------

def _resolve(budget: Union[str, TeacherConfig]) -> TeacherConfig:
    if isinstance(budget, TeacherConfig):
        return budget
    if budget not in BUDGETS:
        raise ValueError(f"unknown teacher budget {budget!r}; expected one of {', '.join(BUDGETS)} "
                         "or a TeacherConfig")
    return BUDGETS[budget]


def teacher_settings(budget: Union[str, TeacherConfig], seed: int, size: int) -> dict:
    """What a teachers folder records it was made with (`is_complete` compares it)."""
    cfg = _resolve(budget)
    return json.loads(json.dumps({"config": asdict(cfg), "seed": seed, "size": size}))  # tuples -> lists


def is_complete(out_dir: Union[str, Path], settings: Optional[dict] = None) -> bool:
    """True if `out_dir` holds a finished set of teachers (made with `settings`, when given)."""
    manifest = Path(out_dir) / MANIFEST
    if not manifest.is_file():
        return False
    saved = json.loads(manifest.read_text())
    parts_ok = all((Path(out_dir) / p).is_dir() for p in ("clip", "sd", "oracle"))
    return parts_ok and (settings is None or saved.get("settings") == settings)


def train_teachers(out_dir: Union[str, Path], seed: int = 0, size: int = 32,
                   budget: Union[str, TeacherConfig] = "default") -> Path:
    """Train (or reuse) CLIP, the SD folder and the oracle under `out_dir`; return `out_dir`.

    budget: "default" (the demo's, shipped in kosmos_g/tinyworld/shipped_teachers: ~9 min on 2 cores), "quick" (tests: seconds, weak teachers)
    or a `TeacherConfig`. A finished `out_dir` made with the same settings is returned untouched; one
    made with other settings is rebuilt."""
    cfg = _resolve(budget)
    out, settings = Path(out_dir), teacher_settings(cfg, seed, size)
    if is_complete(out, settings):
        _log(f"reusing the teachers in {out}")
        return out
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} exists and is not a teachers folder (no {MANIFEST}); train_teachers "
                              "replaces its out_dir, so give it a folder of its own (e.g. runs/<run>/teachers)")
    if size % 8:
        raise ValueError(f"size must be a multiple of 8 (4x VAE, 2-level U-Net), got {size}")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists() and _read_json(tmp / "settings.json") != settings:
        shutil.rmtree(tmp)   # a leftover from other settings: nothing in it can be reused
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "settings.json").write_text(json.dumps(settings))
    t_all = time.perf_counter()
    with _quiet():
        timings = _build_parts(tmp, cfg, seed, size)

    # Done: drop the scaffolding, write the manifest last, swap the folder in.
    shutil.rmtree(tmp / "vae")
    (tmp / "settings.json").unlink()
    for name in ("clip", "sd", "oracle"):
        (tmp / name / ".done").unlink()
    timings["total"] = time.perf_counter() - t_all
    (tmp / MANIFEST).write_text(json.dumps({"settings": settings, "timings_s": timings}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _log(f"teachers ready in {out}: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return out


def _build_parts(tmp: Path, cfg: TeacherConfig, seed: int, size: int) -> dict[str, float]:
    """Train each part into tmp/<part>/ in dependency order; return the seconds each took."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    scenes, captions, images = world_data(seed, size, cfg.n_captions, cfg.heldout)
    timings["data"] = time.perf_counter() - t0
    _log(f"world data: {len(scenes)} train scenes at {size} px", t0)

    def part(name: str, build, load):
        """Build part `name` into tmp/name (or reuse it from an interrupted run) and return it loaded."""
        folder = tmp / name
        if (folder / ".done").is_file():
            _log(f"{name}: reusing {folder}")
            return load(folder)
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        build(folder)
        (folder / ".done").touch()
        timings[name] = time.perf_counter() - t
        _log(f"{name}: done", t)
        return load(folder)

    def build_clip_part(folder):
        model, processor = train_clip(scenes, captions, images, cfg, seed, closeup_data(size, cfg.heldout))
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    clip, clip_processor = part("clip", build_clip_part, lambda f: (
        CLIPModel.from_pretrained(f, local_files_only=True).eval(),
        CLIPProcessor.from_pretrained(f, local_files_only=True)))
    tokenizer = clip_processor.tokenizer
    vae = part("vae", lambda f: train_vae(codec_images(size), cfg, seed + 1).save_pretrained(f),
               lambda f: AutoencoderKL.from_pretrained(f, **LOAD_KW).eval())

    def build_sd_part(folder):
        keep = [i for i, s in enumerate(scenes) if len(s.objects) <= cfg.unet_max_objects]
        unet = train_unet(vae, clip_text_encoder(clip), tokenizer, [captions[i] for i in keep], images[keep],
                          cfg, seed + 2)
        save_sd_folder(folder, vae, clip, tokenizer, unet)

    part("sd", build_sd_part, lambda f: f)
    part("oracle", lambda f: train_oracle(cfg.oracle_steps, seed=seed + 3, size=size).save_pretrained(f),
         lambda f: f)
    return timings


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- using the teachers: caption -> image, scored by the oracle -------------------------------------

def load_pipeline(sd_folder: Union[str, Path]) -> StableDiffusionPipeline:
    """The SD folder as a StableDiffusionPipeline with DPM++ 2M sampling, progress bar off."""
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, **LOAD_KW)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: Sequence[str], steps: int = 20, guidance: float = 5.0,
             seed: int = 0, batch_size: int = 100) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for `prompts`, deterministic given `seed`."""
    g = torch.Generator().manual_seed(seed)
    chunks = [pipe(list(prompts[i:i + batch_size]), num_inference_steps=steps, guidance_scale=guidance,
                   generator=g, output_type="pt").images for i in range(0, len(prompts), batch_size)]
    return torch.cat(chunks).float().clamp(0, 1)


# ---- the command ---------------------------------------------------------------------------------

def build_parser():
    import argparse

    parser = argparse.ArgumentParser(description="Train the tiny world's teachers (CLIP, SD folder, oracle) into a "
                                                 "folder; the demo's shipped set: --out kosmos_g/tinyworld/shipped_teachers")
    parser.add_argument("--out", required=True, help="the teachers folder (replaced if made with other settings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # as the demo trains them: the shipped files are what a demo run would make
    train_teachers(args.out, seed=args.seed, size=args.size, budget=args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
