"""The multimodal LM of Kosmos-G: transformers' Kosmos-2 modules, which compute the original MLLM exactly.

A prompt is `<s> text <image> [N slots] </image> text` (see `kosmos_g.processor`; no `</s>`). Each image goes
through the CLIP ViT (all tokens, final LayerNorm, L2-normalised) and the connector (N latent queries
attending over the projected tokens and themselves), and its N outputs overwrite the N slot embeddings
*before* the sqrt(d) embedding scale, as in the original decoder:

    tokens = vision_model(pixel_values)          [num_images, T, d_vision]  (post_layernorm, L2-normalised)
    latents = image_to_text_projection(tokens)   [num_images, N, d_text]
    embeds[image_mask] = latents, in order       [B, L, d_text]
    states = text_model.model(embeds)            [B, L, d_text]  <- `encode`, read by stages 2 and 3

Parameter names are exactly `transformers.Kosmos2ForConditionalGeneration`'s (`text_model.model.*`,
`text_model.lm_head.weight` tied to the embeddings, `vision_model.model.*`, `image_to_text_projection.*`),
so a Kosmos-2-layout state dict (the converted original checkpoints) loads as is. `save_pretrained` writes
one safetensors file; `from_pretrained` rebuilds everything from the config (no CLIP file).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration
# diffusers' pipeline loader looks the base class up by name in this module (model_index.json names the module).
from transformers import PreTrainedModel  # noqa: F401
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.models.kosmos2.modeling_kosmos2 import (Kosmos2TextSinusoidalPositionalEmbedding,
                                                         Kosmos2TextTransformer)

from kosmos_g.models.tokenizers import IMAGE_START, check_special_layout
from kosmos_g.models.vision import load_vision_weights


class PackedTextTransformer(Kosmos2TextTransformer):
    """Kosmos-2's text transformer that also takes a ready [B, 1, L, L] additive attention mask: packed rows
    (several documents in one row, stage 1) attend within their own document only. A 2D mask as before."""

    def _prepare_decoder_attention_mask(self, attention_mask, input_shape, inputs_embeds, cache_length):
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.to(inputs_embeds.dtype)
        return super()._prepare_decoder_attention_mask(attention_mask, input_shape, inputs_embeds, cache_length)


def document_attention(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] document index per position (0 at padding) -> additive [B, 1, L, L] mask: causal within a document."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril()
    allowed = same & causal & (document_ids[:, None, :] > 0)
    return torch.zeros(allowed.shape, dtype=dtype, device=same.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def document_positions(document_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """fairseq positions restarting at every document of a packed row (padding_idx + 1 = 2 first); pads padding_idx."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return torch.where(document_ids > 0, index - first + padding_idx + 1, torch.full_like(index, padding_idx))


@strict
class MultimodalLMConfig(Kosmos2Config):
    """Kosmos-2's config (text_config, vision_config, latent_query_num) plus the `<image>` id."""

    model_type = "kosmos_g_mllm"
    image_token_id: int | None = None
    """Id of `<image>`: lets `placeholder_mask` find the slots from the ids alone."""

    @property
    def num_image_tokens(self) -> int:
        """Connector outputs = slots per image."""
        return self.latent_query_num

    @property
    def hidden_size(self) -> int:
        return self.text_config.embed_dim


class MultimodalLM(Kosmos2ForConditionalGeneration):
    """Kosmos-2 text decoder (`text_model`) + CLIP ViT (`vision_model`) + connector (`image_to_text_projection`)."""

    config_class = MultimodalLMConfig

    def __init__(self, config: MultimodalLMConfig):
        super().__init__(config)
        self.text_model.model.__class__ = PackedTextTransformer  # same weights; also takes per-document masks
        self._frozen_vision: list[str] = []  # submodules kept in eval mode by `train()`; filled by `lock_vision`
        self._locked = False  # all of it frozen and in eval mode (`lock`)

    # --- inputs ---------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_images, 3, S, S] (CLIP-normalised) -> connector outputs [num_images, N, d_text]."""
        size = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"the vision tower expects pixel_values of shape [num_images, 3, {size}, {size}], got "
                             f"{list(pixel_values.shape)}; resize and normalise images with "
                             f"kosmos_g.processor.clip_image_transform({size})")
        dtype = self.image_to_text_projection.dense.weight.dtype  # e.g. bf16 weights, fp32 pixels
        # Kosmos-2's own path: all tokens through post_layernorm, L2-normalised, then the connector.
        return self.get_image_features(pixel_values.to(dtype), return_dict=True).pooler_output

    def placeholder_mask(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`image_mask` if given, else the slots found in `input_ids`: an `<image>` right after an `<image>`."""
        if image_mask is not None:
            return image_mask.bool()
        image = input_ids == self.config.image_token_id
        return image & F.pad(image[:, :-1], (1, 0), value=False)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, L, d] (before the sqrt(d) scale) whose slots hold the images' connector outputs.

        pixel_values: [num_images, 3, S, S], the images of sample 0 first, then sample 1... in prompt
            order (as `KosmosGProcessor.collate` makes them); None or empty for text only.
        image_mask: [B, L] bool, True at the slots. None: found from the ids (`placeholder_mask`). Slots
            are filled in row-major order, so image k fills the k-th run of N slots of the batch.

        The vision tower and connector run on every call, on one all-zero image when the batch has none,
        and add `0 * features.sum()`: the result is the text-only one, but every rank runs the same
        modules (FSDP all-gathers them in the same order everywhere) and they get zero gradients.
        """
        embeds = self.text_model.model.embed_tokens(input_ids)
        image_mask = self.placeholder_mask(input_ids, image_mask)
        if image_mask.shape != input_ids.shape:
            raise ValueError(f"image_mask has shape {list(image_mask.shape)} but input_ids {list(input_ids.shape)}; "
                             "pass the processor's image_mask for the same batch")
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        num_slots, n = int(image_mask.sum()), self.config.num_image_tokens
        if num_slots != num_images * n:
            raise ValueError(
                f"the batch has {num_slots} image placeholder positions but {num_images} image(s) x {n} tokens = "
                f"{num_images * n} connector outputs; each image needs exactly {n} slots after its first "
                f"{IMAGE_START} (build inputs with KosmosGProcessor, whose num_image_tokens must equal the model's)")
        if num_images == 0:
            size = self.config.vision_config.image_size
            dummy = torch.zeros(1, 3, size, size, device=input_ids.device)
            return embeds + 0 * self.image_features(dummy).sum().to(embeds.dtype)
        latents = self.image_features(pixel_values).to(embeds.dtype)
        # masked_scatter fills True positions in row-major order: image 0's N latents first, and so on.
        return embeds.masked_scatter(image_mask.unsqueeze(-1), latents.reshape(-1, latents.shape[-1]))

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fairseq's positions: counted over non-pad tokens from padding_idx + 1 (= 2); pads get padding_idx."""
        return Kosmos2TextSinusoidalPositionalEmbedding.create_position_ids_from_input_ids(
            input_ids, self.config.text_config.pad_token_id)

    # --- outputs --------------------------------------------------------------------------------

    def _mask_and_positions(self, input_ids, attention_mask, document_ids, dtype):
        """2D padding mask and fairseq positions, or, for packed rows, per-document attention and positions."""
        if document_ids is None:
            return attention_mask, self.positions(input_ids)
        pad = self.config.text_config.pad_token_id
        return document_attention(document_ids, dtype), document_positions(document_ids, pad)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
               image_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final `layer_norm` output [B, L, d] at every position (`<s>`, text, image tokens): the condition source.

        document_ids: [B, L] for packed rows (stage 1): each document's index in its row, 0 at padding; its
        tokens then attend, and count positions, within their own document only.
        """
        embeds = self.embed(input_ids, pixel_values, image_mask)
        mask, positions = self._mask_and_positions(input_ids, attention_mask, document_ids, embeds.dtype)
        return self.text_model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> CausalLMOutputWithCrossAttentions:
        """Next-token logits; with `labels` (-100 where no loss), also the mean cross-entropy.

        Slots never count as targets, even if `labels` holds their ids: their input is an image latent,
        not a token, so there is nothing to predict there. `document_ids`: as in `encode`.
        """
        image_mask = self.placeholder_mask(input_ids, image_mask)
        embeds = self.embed(input_ids, pixel_values, image_mask)
        if labels is not None:
            labels = labels.masked_fill(image_mask, -100)
        mask, positions = self._mask_and_positions(input_ids, attention_mask, document_ids, embeds.dtype)
        return self.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels,
                               use_cache=False)

    # --- training switches ----------------------------------------------------------------------

    def lock_vision(self, unlocked_last_blocks: int = 1, unlock_final_norm: bool = True) -> None:
        """Freeze the ViT except its last `unlocked_last_blocks` blocks and post_layernorm (the paper's stages 1
        and 3). `lock_vision(0, False)` freezes it all. Frozen parts stay in eval mode under `.train()`.
        Not saved: call again after `from_pretrained`."""
        tower = self.vision_model.model
        depth = len(tower.encoder.layers)
        if not 0 <= unlocked_last_blocks <= depth:
            raise ValueError(f"unlocked_last_blocks must be in [0, {depth}] (the vision tower has {depth} blocks), "
                             f"got {unlocked_last_blocks}")
        units = {"embeddings": tower.embeddings, "pre_layrnorm": tower.pre_layrnorm,
                 **{f"encoder.layers.{i}": layer for i, layer in enumerate(tower.encoder.layers)},
                 "post_layernorm": tower.post_layernorm}
        unlocked = {f"encoder.layers.{i}" for i in range(depth - unlocked_last_blocks, depth)}
        if unlock_final_norm:
            unlocked.add("post_layernorm")
        self._frozen_vision = [name for name in units if name not in unlocked]
        for name, module in units.items():
            module.requires_grad_(name in unlocked)
        self.train(self.training)  # put the newly frozen modules into eval mode now

    def lock(self) -> "MultimodalLM":
        """Freeze all of it, kept in eval mode under `.train()` (stage 2: its states are the aligner's input).
        Not saved: call again after `from_pretrained`."""
        self.requires_grad_(False)
        self._locked = True
        return self.eval()

    def train(self, mode: bool = True) -> "MultimodalLM":
        super().train(mode and not getattr(self, "_locked", False))
        for name in getattr(self, "_frozen_vision", []):
            self.vision_model.model.get_submodule(name).eval()
        return self

    def set_activation_checkpointing(self, enable: bool) -> None:
        """Recompute text blocks and ViT layers in backward (less memory, ~30% more compute)."""
        # `activation_checkpointing_*` is the transformers>=5 name of `gradient_checkpointing_*`.
        if enable:  # non-reentrant: gradients reach the last ViT block behind frozen, checkpointed ones
            (getattr(self, "activation_checkpointing_enable", None) or self.gradient_checkpointing_enable)(
                {"use_reentrant": False})
        else:
            (getattr(self, "activation_checkpointing_disable", None) or self.gradient_checkpointing_disable)()


def build_mllm(model_cfg, tokenizer) -> MultimodalLM:
    """A freshly initialised MLLM from a `ModelConfig` and its tokenizer; CLIP weights from model.vision.weights_path.

    Of the tokenizer only `len()`, the special ids (`<s> <pad> </s> <unk>` = 0..3) and the `<image>` id are read.
    """
    check_special_layout(tokenizer)
    llm, vision = model_cfg.llm, model_cfg.vision
    config = MultimodalLMConfig(
        text_config=dict(
            vocab_size=len(tokenizer), max_position_embeddings=llm.max_positions, embed_dim=llm.hidden_size,
            layers=llm.num_layers, ffn_dim=llm.ffn_dim, attention_heads=llm.num_heads, activation_function="gelu",
            dropout=llm.dropout, attention_dropout=llm.attention_dropout, activation_dropout=0.0,
            layer_norm_eps=llm.layer_norm_eps, scale_embedding=True, tie_word_embeddings=True, use_cache=False,
            # std d^-0.5 for every text weight (transformers' Kosmos-2 uses one std for embeddings and linear layers):
            # fairseq's embedding init, the original's. transformers' fixed 0.02 is the same at d=2048, but at the
            # tiny d=64 the sinusoidal positions then drown the token embeddings (scaled by sqrt(d)).
            init_std=llm.hidden_size ** -0.5,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(
            hidden_size=vision.hidden_size, intermediate_size=vision.ffn_dim, num_hidden_layers=vision.num_layers,
            num_attention_heads=vision.num_heads, image_size=vision.img_size, patch_size=vision.patch_size,
            hidden_act="quick_gelu", layer_norm_eps=1e-5),
        latent_query_num=vision.num_image_tokens,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_START),
    )
    model = MultimodalLM(config)
    if vision.weights_path is not None:
        load_vision_weights(model.vision_model, vision.weights_path)
    return model
