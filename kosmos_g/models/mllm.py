"""The multimodal LM: a Llama-style decoder (transformers) that reads interleaved text and images.

A document is `<s> text <image> [N <image_pad>] </image> text </s>` (see `kosmos_g.processor`). As in
Kosmos-1/Kosmos-G, each image goes through the CLIP ViT (all tokens, final norm, L2-normalised) and
the resampler, and its N outputs overwrite the N `<image_pad>` embeddings before the decoder runs:

    tokens = vision(pixel_values)               [num_images, T, d_vision]
    latents = resampler(tokens)                 [num_images, N, d_llm]
    embeds[image_mask] = latents, in order      [B, L, d_llm]
    states = decoder(embeds)                    [B, L, d_llm]  <- `encode`, read by stages 2 and 3

The whole model (LM + ViT + resampler) is one `PreTrainedModel`: `save_pretrained` writes every weight
into one safetensors file and `from_pretrained` rebuilds the ViT from the config alone (no CLIP file).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from kosmos_g.models.resampler import Resampler
from kosmos_g.models.tokenizers import IMAGE_PAD
from kosmos_g.models.vision import PAPER_MODEL_NAME, VisionEncoder


class MultimodalLMConfig(PretrainedConfig):
    """Everything needed to rebuild the model without any weight file: LM sizes, ViT and resampler settings."""

    model_type = "kosmos_g_mllm"
    sub_configs = {"text_config": LlamaConfig}

    def __init__(self, text_config: dict | LlamaConfig | None = None, vision_model_name: str = PAPER_MODEL_NAME,
                 vision_img_size: int = 224, vision_timm_kwargs: dict | None = None, num_image_tokens: int = 64,
                 resampler_heads: int | None = None, image_pad_token_id: int | None = None, **kwargs):
        if isinstance(text_config, dict) or text_config is None:
            text_config = LlamaConfig(**(text_config or {}))
        self.text_config = text_config
        self.vision_model_name = vision_model_name  # a timm ViT name (CLIP ViT-L/14 in the paper)
        self.vision_img_size = vision_img_size
        self.vision_timm_kwargs = dict(vision_timm_kwargs or {})  # extra timm sizes (the tiny preset's)
        self.num_image_tokens = num_image_tokens  # resampler latents = <image_pad> tokens per image
        self.resampler_heads = resampler_heads  # None: hidden_size // 64
        self.image_pad_token_id = image_pad_token_id  # lets `embed` find placeholders without a mask
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size


class MultimodalLM(PreTrainedModel):
    """Llama decoder (`lm`) + CLIP ViT (`vision`) + perceiver resampler (`resampler`)."""

    config_class = MultimodalLMConfig
    base_model_prefix = "mllm"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: MultimodalLMConfig):
        super().__init__(config)
        self.lm = LlamaForCausalLM(config.text_config)
        # Random here; `build_mllm` loads CLIP weights, `from_pretrained` the saved ones.
        self.vision = VisionEncoder.from_config(config.vision_model_name, config.vision_img_size, None,
                                                **config.vision_timm_kwargs)
        self.resampler = Resampler(self.vision.width, config.hidden_size, num_latents=config.num_image_tokens,
                                   num_heads=config.resampler_heads)
        # `post_init` initialises the LM with its own (Llama) init and the ViT/resampler layers with the
        # generic transformers one (normal(0.02) linears, unit norms); the resampler's latents and the
        # ViT's cls/pos embeddings keep their constructor init. On a meta device nothing is initialised.
        self.post_init()

    # --- inputs ---------------------------------------------------------------------------------

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_images, 3, S, S] (CLIP-normalised) -> resampled [num_images, N, d_llm]."""
        dtype = self.resampler.proj.weight.dtype  # e.g. bf16 weights with fp32 pixels from the processor
        return self.resampler(self.vision(pixel_values.to(dtype)))

    def placeholder_mask(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """`image_mask` if given, else the positions of `config.image_pad_token_id` in `input_ids`."""
        if image_mask is None and self.config.image_pad_token_id is not None:
            image_mask = input_ids == self.config.image_pad_token_id
        return None if image_mask is None else image_mask.bool()

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, L, d] whose `image_mask` positions hold the images' resampler outputs.

        pixel_values: [num_images, 3, S, S], the images of sample 0 first, then sample 1... in prompt
            order (as `KosmosGProcessor.collate` makes them); None or empty for text only.
        image_mask: [B, L] bool, True at the `<image_pad>` positions. None: taken from
            `input_ids == config.image_pad_token_id`. Positions are filled in row-major order, so
            image k fills the k-th run of N placeholders of the batch.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        image_mask = self.placeholder_mask(input_ids, image_mask)
        if image_mask is not None and image_mask.shape != input_ids.shape:
            raise ValueError(f"image_mask has shape {list(image_mask.shape)} but input_ids {list(input_ids.shape)}; "
                             "pass the processor's image_mask for the same batch")
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        num_slots = 0 if image_mask is None else int(image_mask.sum())
        n = self.config.num_image_tokens
        if num_slots != num_images * n:
            raise ValueError(
                f"the batch has {num_slots} image placeholder positions but {num_images} image(s) x {n} tokens = "
                f"{num_images * n} resampler outputs; each image needs exactly {n} {IMAGE_PAD} tokens "
                "(build inputs with KosmosGProcessor, whose num_image_tokens must equal the model's)")
        if num_images == 0:
            # The ViT and connector run anyway, on one blank image whose output is multiplied by zero: under
            # FSDP every rank must run the same sharded forwards (each all-gathers), whatever its batch holds.
            size = self.config.vision_img_size
            blank = torch.zeros(1, 3, size, size, device=embeds.device)
            return embeds + 0.0 * self.image_embeddings(blank).sum().to(embeds.dtype)
        latents = self.image_embeddings(pixel_values).to(embeds.dtype)
        # masked_scatter fills True positions in row-major order: image 0's N latents first, and so on.
        return embeds.masked_scatter(image_mask.unsqueeze(-1), latents.reshape(-1, latents.shape[-1]))

    # --- outputs --------------------------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
               image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, L, d] at every position (after the final norm): the aligner's input."""
        embeds = self.embed(input_ids, pixel_values, image_mask)
        return self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        """Next-token logits; with `labels` (-100 where no loss), also the mean cross-entropy.

        Placeholder positions never count as targets, even if `labels` holds their ids: their input is
        an image latent, not a token, so there is nothing to predict there.
        """
        image_mask = self.placeholder_mask(input_ids, image_mask)
        embeds = self.embed(input_ids, pixel_values, image_mask)
        if labels is not None and image_mask is not None:
            labels = labels.masked_fill(image_mask, -100)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)

    # --- training switches ----------------------------------------------------------------------

    def lock_vision(self, unlocked_last_blocks: int = 1, unlock_final_norm: bool = True) -> None:
        """Freeze the ViT except its last `unlocked_last_blocks` blocks and final norm (the paper's stages 1 and 3).

        Frozen ViT parts stay in eval mode under `.train()`. Not saved: call again after `from_pretrained`.
        """
        self.vision.lock(unlocked_last_blocks, unlock_final_norm)

    def set_activation_checkpointing(self, enable: bool) -> None:
        """Recompute LM decoder layers and ViT blocks in backward (less memory, ~30% more compute)."""
        if enable:  # `activation_checkpointing_enable` is the transformers>=5 name of gradient_checkpointing_enable
            (getattr(self.lm, "activation_checkpointing_enable", None) or self.lm.gradient_checkpointing_enable)()
        else:
            (getattr(self.lm, "activation_checkpointing_disable", None) or self.lm.gradient_checkpointing_disable)()
        self.vision.set_grad_checkpointing(enable)


def _special_id(tokenizer, token: str) -> int:
    """The id of `token`, which must really be in the vocabulary (HF tokenizers map unknown tokens to unk)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(f"the MLLM tokenizer has no {token} token; build it with kosmos_g.models.tokenizers or "
                         "kosmos_g.assets.mllm_tokenizer, which add the image tokens")
    return token_id


def build_mllm(model_cfg, tokenizer) -> MultimodalLM:
    """A freshly initialised MLLM from a `ModelConfig` and its tokenizer; CLIP weights from model.vision.weights_path.

    Of the tokenizer only `len()`, the pad/bos/eos ids and the `<image_pad>` id are read.
    """
    llm_cfg, vision_cfg = model_cfg.llm, model_cfg.vision
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=llm_cfg.hidden_size, num_hidden_layers=llm_cfg.num_layers,
        num_attention_heads=llm_cfg.num_heads, num_key_value_heads=llm_cfg.num_heads,
        intermediate_size=llm_cfg.intermediate_size, max_position_embeddings=llm_cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = MultimodalLMConfig(
        text_config=text, vision_model_name=vision_cfg.model_name, vision_img_size=vision_cfg.img_size,
        vision_timm_kwargs=dict(vision_cfg.timm_kwargs), num_image_tokens=vision_cfg.num_image_tokens,
        resampler_heads=vision_cfg.resampler_heads, image_pad_token_id=_special_id(tokenizer, IMAGE_PAD),
    )
    # The CLIP tower is built first so that a bad weights_path fails before the (large) LM is built;
    # from_config checks the file and loads it strictly through timm's converter.
    clip = None
    if vision_cfg.weights_path is not None:
        clip = VisionEncoder.from_config(vision_cfg.model_name, vision_cfg.img_size, vision_cfg.weights_path,
                                         **vision_cfg.timm_kwargs)
    model = MultimodalLM(config)
    if clip is not None:
        model.vision = clip  # replaces the random tower (after post_init, so its weights are not re-initialised)
    return model
