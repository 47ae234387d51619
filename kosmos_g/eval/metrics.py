"""Evaluation metrics of the paper: FID (COCO) and DINO, CLIP-I, CLIP-T (DreamBench).

Every metric is a `torchmetrics.Metric` whose states are sums registered with
`dist_reduce_fx="sum"`, so `compute()` after updates on several processes (or `merge_state`)
equals one process seeing every image. Images are float tensors in [0, 1] shaped [B, 3, H, W]
(uint8 in [0, 255] works too, and so does a list of [3, H, W] images of different sizes for
reference sets); each metric resizes and normalises for its own backbone.

Backbones come only from local files, named by config keys (nothing is ever downloaded):
    eval.clip_path       a transformers CLIPModel folder (the paper: CLIP ViT-B/32)
    eval.dino_path       a DINO ViT-S/16 weight file loaded through timm
    eval.inception_path  torchmetrics' FID Inception weights (pt_inception-2015-12-05)
`save_tiny_clip` / `save_tiny_dino` write tiny random backbones in those same formats, for tests
and the tiny world.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal import CLIPScore
from torchvision.transforms.v2 import functional as TF
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

Images = Union[Tensor, Sequence[Tensor]]
DINO_MODEL_NAME = "vit_small_patch16_224.dino"
DINO_CROP_PCT = 224 / 256  # DINO's evaluation transform: Resize(256) then CenterCrop(224)
TINY_DINO_KWARGS = dict(img_size=32, depth=2, embed_dim=64, num_heads=2)
TINY_CLIP_IMAGE_SIZE = 32


# ---------------------------------------------------------------------------------------------
# Inputs


def image_list(images: Images, name: str = "images") -> list[Tensor]:
    """[B, 3, H, W] tensor or a sequence of [3, H, W] tensors -> list of [3, H, W] tensors."""
    if isinstance(images, Tensor) and images.dim() != 4:
        raise ValueError(f"{name}: expected a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
    items = list(images.unbind(0)) if isinstance(images, Tensor) else list(images)
    if not items:
        raise ValueError(f"{name}: got no images")
    for img in items:
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"{name}: every image must be a [3, H, W] RGB tensor, got {shape}")
    return items


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]; anything else is a clear error."""
    if images.dtype == torch.uint8:
        return images.float() / 255
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float images must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]; "
                         "map VAE outputs in [-1, 1] with (x + 1) / 2 first")
    return images.float().clamp(0, 1)


def to_uint8(images: Tensor) -> Tensor:
    """float [0, 1] or uint8 -> uint8 [0, 255] (what Inception and the HF CLIP processor expect)."""
    if images.dtype == torch.uint8:
        return images
    return (to_float(images) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Loading the backbones (local files only) and writing tiny stand-ins in the same formats


def _missing(path, key: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{key}={path}: not found. Put {what} there and set {key} to it "
                             "(nothing is downloaded).")


def load_clip(path: Union[str, Path]) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIPModel and its processor from a local `save_pretrained` folder (`eval.clip_path`)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise _missing(path, "eval.clip_path",
                       "a transformers CLIPModel folder (config.json, weights, tokenizer and preprocessor "
                       "files, e.g. openai/clip-vit-base-patch32 as the paper uses, saved with save_pretrained)")
    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval().requires_grad_(False), processor


def dino_kwargs_file(path: Union[str, Path]) -> Path:
    """The JSON beside a DINO weight file that records its timm architecture: `dino.safetensors.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def load_dino(path: Union[str, Path], model_name: Optional[str] = None, **model_kwargs) -> nn.Module:
    """A timm ViT with DINO weights from a local file (`eval.dino_path`), head removed.

    timm loads the file itself (`pretrained_cfg_overlay=dict(file=...)`), so the original
    `dino_deitsmall16_pretrain.pth` and timm's own `model.safetensors` both work.
    The architecture is `model_name` (default DINO ViT-S/16) with `model_kwargs` (img_size, depth,
    embed_dim, num_heads), which must match the file. A `<file>.json` beside the weights (written by
    `save_tiny_dino`) supplies both, so tiny stand-ins load with no arguments; arguments given here
    override it.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise _missing(path, "eval.dino_path",
                       f"the DINO ViT-S/16 weights for timm's {model_name or DINO_MODEL_NAME} "
                       "(dino_deitsmall16_pretrain.pth or timm's model.safetensors)")
    saved = {}
    if dino_kwargs_file(file).is_file():
        try:
            saved = json.loads(dino_kwargs_file(file).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{dino_kwargs_file(file)} is not valid JSON ({err}); delete it (the default "
                             "DINO ViT-S/16 architecture is then used) or rewrite it with save_tiny_dino") from None
    model_name = model_name or saved.get("model_name") or DINO_MODEL_NAME
    model_kwargs = {**saved.get("model_kwargs", {}), **model_kwargs}
    model = timm.create_model(model_name, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(file)), **model_kwargs)
    return model.eval().requires_grad_(False)


def save_tiny_clip(folder: Union[str, Path], image_size: int = TINY_CLIP_IMAGE_SIZE,
                   texts: Optional[Iterable[str]] = None, seed: int = 0) -> Path:
    """Write a tiny random CLIPModel + processor with `save_pretrained` (load it with `load_clip`)."""
    from kosmos_g.models.tokenizers import train_clip_tokenizer  # only needed for tiny stand-ins

    texts = list(texts or ["a photo of a dog on the beach", "a red backpack in the jungle in the snow"])
    tokenizer = train_clip_tokenizer(texts * 4, vocab_size=512)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    folder = Path(folder)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_dino(path: Union[str, Path], model_name: str = DINO_MODEL_NAME, seed: int = 0,
                   **model_kwargs) -> Path:
    """Write a tiny random timm ViT state dict and, beside it, `<file>.json` with its architecture
    (`{"model_name", "model_kwargs"}`), so `load_dino(path)` rebuilds it with no arguments."""
    from safetensors.torch import save_file

    model_kwargs = model_kwargs or dict(TINY_DINO_KWARGS)
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    dino_kwargs_file(path).write_text(json.dumps({"model_name": model_name, "model_kwargs": model_kwargs},
                                                 indent=1, sort_keys=True))
    return path


# ---------------------------------------------------------------------------------------------
# Frozen feature extractors


class _Frozen(nn.Module):
    """A backbone that is frozen and stays in eval mode (a Lightning `.train()` must not turn on dropout)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)


class ImageFeatures(_Frozen):
    """Images in [0, 1] (or uint8) -> backbone features [B, D].

    Each image's shorter side is resized to `image_size / crop_pct` (bicubic, antialiased), centre
    cropped to `image_size`, normalised with `mean`/`std`; `backbone` maps [B, 3, S, S] to [B, D]
    (trailing singleton dims are flattened).
    """

    def __init__(self, backbone: nn.Module, image_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), crop_pct: float = 1.0):
        super().__init__(backbone)
        self.image_size, self.crop_pct = image_size, crop_pct
        self.mean, self.std = list(mean), list(std)
        # torchmetrics' FID reads `num_features` instead of probing with uint8 images.
        self.num_features = self(torch.zeros(1, 3, image_size, image_size)).shape[-1]

    def preprocess(self, image: Tensor) -> Tensor:
        image = to_float(image)
        image = TF.resize(image, round(self.image_size / self.crop_pct),
                          interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [self.image_size, self.image_size])
        return TF.normalize(image.clamp(0, 1), self.mean, self.std)

    def forward(self, images: Images) -> Tensor:
        device = next(self.module.parameters(), torch.empty(0)).device
        if isinstance(images, Tensor) and images.dim() == 4:
            pixels = self.preprocess(images.to(device))  # one batched resize when sizes agree
        else:
            pixels = torch.stack([self.preprocess(img.to(device)) for img in image_list(images)])
        return self.module(pixels).flatten(1).float()


class ClipFeatures(_Frozen):
    """CLIPModel whose `get_image_features` / `get_text_features` return projected embedding tensors.

    transformers 5 returns a ModelOutput (embeddings in `.pooler_output`) where torchmetrics 1.9's
    CLIPScore expects a tensor; this adapter lets CLIPScore run unchanged.
    """

    def __init__(self, clip: CLIPModel):
        super().__init__(clip)
        self.config = clip.config  # CLIPScore reads the text length limit from it

    @staticmethod
    def _embeds(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._embeds(self.module.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return self._embeds(self.module.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


ClipLike = Union[str, Path, tuple[CLIPModel, CLIPProcessor]]


def _clip(clip: ClipLike) -> tuple[CLIPModel, CLIPProcessor]:
    return clip if isinstance(clip, tuple) else load_clip(clip)


# ---------------------------------------------------------------------------------------------
# FID


class FID(FrechetInceptionDistance):
    """torchmetrics' FID taking images in [0, 1] or uint8 for either backbone.

    `update(images, real=True/False)`; `compute()` needs at least two images of each set.
    """

    def update(self, imgs: Tensor, real: bool) -> None:
        if not isinstance(imgs, Tensor) or imgs.dim() != 4:
            raise ValueError("FID.update expects a [B, 3, H, W] tensor of images")
        # torchmetrics' Inception takes uint8 only; our ImageFeatures wrapper takes either.
        super().update(imgs if self.used_custom_model else to_uint8(imgs), real)


def build_fid(feature_extractor: Optional[nn.Module] = None, inception_path: Optional[Union[str, Path]] = None,
              image_size: int = 299, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
              **kwargs) -> FID:
    """FID on Inception-v3 pool features (`inception_path`, the paper) or on any `feature_extractor`.

    feature_extractor: an `nn.Module` mapping normalised [B, 3, image_size, image_size] images to
        [B, D] features (the tiny world passes a tiny ViT); inputs are resized and normalised
        with `mean`/`std` by `ImageFeatures`. FID values then are not comparable to the paper's.
    inception_path: torchmetrics' FID Inception weights (torch-fidelity's
        `weights-inception-2015-12-05-6726825d.pth`), `eval.inception_path`; needs torch-fidelity.
    kwargs go to `FrechetInceptionDistance` (e.g. `reset_real_features=False`).
    """
    if (feature_extractor is None) == (inception_path is None):
        raise ValueError("build_fid needs exactly one of feature_extractor= (any nn.Module) or inception_path= "
                         "(eval.inception_path: the FID Inception weights file)")
    if feature_extractor is not None:
        return FID(feature=ImageFeatures(feature_extractor, image_size, mean, std), **kwargs)
    file = Path(inception_path).expanduser()
    if not file.is_file():
        raise _missing(inception_path, "eval.inception_path",
                       "torchmetrics' FID Inception-v3 weights (torch-fidelity's "
                       "weights-inception-2015-12-05-6726825d.pth)")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics builds its Inception from it)
    except ImportError as err:
        raise ImportError("FID with Inception weights needs torch-fidelity: `pip install torch-fidelity` "
                          "(or torchmetrics[image]); or pass feature_extractor= instead") from err
    return FID(feature=2048, feature_extractor_weights_path=str(file), **kwargs)


# ---------------------------------------------------------------------------------------------
# DreamBench: DINO, CLIP-I, CLIP-T


class _SubjectSimilarity(Metric):
    """Mean cosine between each generated image and every reference image of its subject.

    `update(generated, references)`: `generated` [B, 3, H, W] images of one subject, `references`
    that subject's real images ([R, 3, H, W] or a list of [3, H, W]). Each generated image scores
    the mean cosine to all R references, as DreamBench does; `compute()` averages over images.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound, plot_upper_bound = -1.0, 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def embed(self, images: list[Tensor]) -> Tensor:
        """Unnormalised embeddings [N, D] of a list of [3, H, W] images."""
        raise NotImplementedError

    def update(self, generated: Images, references: Images) -> None:
        with torch.no_grad():
            gen = F.normalize(self.embed(image_list(generated, "generated")), dim=-1)
            ref = F.normalize(self.embed(image_list(references, "references")), dim=-1)
        self.score_sum += (gen @ ref.T).mean(dim=1).sum().to(self.score_sum)
        self.n_samples += gen.shape[0]

    def compute(self) -> Tensor:
        return (self.score_sum / self.n_samples).float()


class DINOScore(_SubjectSimilarity):
    """DINO: cosine of DINO ViT-S/16 CLS embeddings, generated vs reference (paper: 0.694).

    `dino`: a weight file path (`eval.dino_path`, loaded by `load_dino`) or a loaded timm ViT.
    Preprocessing is DINO's evaluation transform (resize 256, centre crop 224, ImageNet mean/std).
    """

    def __init__(self, dino: Union[str, Path, nn.Module], model_name: Optional[str] = None,
                 model_kwargs: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        model = dino if isinstance(dino, nn.Module) else load_dino(dino, model_name, **(model_kwargs or {}))
        cfg = timm.data.resolve_model_data_config(model)
        size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else cfg["input_size"][-1]
        self.backbone = ImageFeatures(model, size, cfg["mean"], cfg["std"], crop_pct=DINO_CROP_PCT)

    def embed(self, images: list[Tensor]) -> Tensor:
        return self.backbone(images)


class CLIPIScore(_SubjectSimilarity):
    """CLIP-I: cosine of CLIP image embeddings, generated vs reference (paper: 0.847, ViT-B/32).

    `clip`: a CLIPModel folder (`eval.clip_path`) or a `(model, processor)` pair from `load_clip`.
    Images go through the model's own CLIPProcessor, as in CLIPScore.
    """

    def __init__(self, clip: ClipLike, **kwargs):
        super().__init__(**kwargs)
        model, self.processor = _clip(clip)
        self.backbone = ClipFeatures(model)

    def embed(self, images: list[Tensor]) -> Tensor:
        pixels = self.processor(images=[to_uint8(i).cpu() for i in images], return_tensors="pt")["pixel_values"]
        return self.backbone.get_image_features(pixels.to(self.device))


class CLIPTScore(CLIPScore):
    """CLIP-T: cosine between CLIP image and text embeddings, averaged over images.

    Computed exactly as `torchmetrics.multimodal.CLIPScore` (same processor, same truncation),
    but reported as the plain cosine: CLIPScore's `max(100 * cos, 0)` convention is divided out
    and not clipped. The paper's CLIP-T of 0.287 is this cosine. `update(images, texts)` takes
    one text per image: DreamBench's prompt with the class noun ("a backpack in the jungle").
    """

    full_state_update = False
    plot_lower_bound, plot_upper_bound = -1.0, 1.0

    def __init__(self, clip: ClipLike, **kwargs):
        model, processor = _clip(clip)
        super().__init__(model_name_or_path=lambda: (ClipFeatures(model), processor), **kwargs)

    def update(self, images: Images, texts: Union[str, Sequence[str]]) -> None:
        # CLIPScore moves the model to the images' device; keep them on the metric's.
        images = [to_uint8(img).to(self.device) for img in image_list(images)]
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) != len(images):
            raise ValueError(f"CLIPTScore.update needs one text per image, got {len(images)} images "
                             f"and {len(texts)} texts")
        with torch.no_grad():
            super().update(images, texts)

    def compute(self) -> Tensor:
        return self.score / self.n_samples / 100
