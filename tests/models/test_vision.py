"""CLIP weights into the MLLM's vision tower (transformers' Kosmos2VisionModel): every layout CLIP ships in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2VisionModel

from kosmos_g.models.vision import load_vision_weights

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128)


def tiny_tower() -> Kosmos2VisionModel:
    torch.manual_seed(1)
    return Kosmos2VisionModel(transformers.Kosmos2VisionConfig(**TINY)).eval()


def openclip_state_dict(width: int = 32, layers: int = 2, patch: int = 8, grid: int = 4, embed_dim: int = 16) -> dict:
    """Random weights in open_clip's CLIP layout (`visual.*` image tower plus a few text-tower keys)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "visual.class_embedding": rand(width),
        "visual.positional_embedding": rand(grid * grid + 1, width),
        "visual.conv1.weight": rand(width, 3, patch, patch),  # OpenAI's patch conv has no bias
        "visual.ln_pre.weight": rand(width), "visual.ln_pre.bias": rand(width),
        "visual.ln_post.weight": rand(width), "visual.ln_post.bias": rand(width),
        "visual.proj": rand(width, embed_dim),
        # The text tower and logit scale are in the same file and must be ignored.
        "token_embedding.weight": rand(10, embed_dim), "logit_scale": torch.tensor(4.6),
        "transformer.resblocks.0.attn.in_proj_weight": rand(3 * embed_dim, embed_dim),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": rand(width), p + "ln_1.bias": rand(width),
            p + "attn.in_proj_weight": rand(3 * width, width), p + "attn.in_proj_bias": rand(3 * width),
            p + "attn.out_proj.weight": rand(width, width), p + "attn.out_proj.bias": rand(width),
            p + "ln_2.weight": rand(width), p + "ln_2.bias": rand(width),
            p + "mlp.c_fc.weight": rand(4 * width, width), p + "mlp.c_fc.bias": rand(4 * width),
            p + "mlp.c_proj.weight": rand(width, 4 * width), p + "mlp.c_proj.bias": rand(width),
        })
    return sd


def reference_open_clip_tower(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """open_clip's VisionTransformer forward (QuickGELU, pre-LN, fused in_proj), written from its definition,
    ending like Kosmos-G's tower: `ln_post` on every token (no projection)."""
    w = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    width = w["class_embedding"].shape[0]
    h = F.conv2d(x, w["conv1.weight"], stride=w["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([w["class_embedding"].expand(len(x), 1, -1), h], dim=1) + w["positional_embedding"]
    h = F.layer_norm(h, (width,), w["ln_pre.weight"], w["ln_pre.bias"])
    attn = torch.nn.MultiheadAttention(width, TINY["num_attention_heads"], batch_first=True)
    for i in range(TINY["num_hidden_layers"]):
        p = f"transformer.resblocks.{i}."
        attn.load_state_dict({k: w[p + "attn." + k] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                              "out_proj.bias")})
        y = F.layer_norm(h, (width,), w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        h = h + attn(y, y, y, need_weights=False)[0]
        y = F.layer_norm(h, (width,), w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        y = F.linear(y, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
        h = h + F.linear(y * torch.sigmoid(1.702 * y), w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
    return F.layer_norm(h, (width,), w["ln_post.weight"], w["ln_post.bias"])


def tower_tokens(tower: Kosmos2VisionModel, x: torch.Tensor) -> torch.Tensor:
    """All tokens after post_layernorm (what MultimodalLM.image_features normalises and projects)."""
    return tower.model.post_layernorm(tower(pixel_values=x).last_hidden_state)


def test_loads_openclip_state_dict_and_computes_open_clips_tower(tmp_path):
    sd = openclip_state_dict()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
    tower = tiny_tower()
    load_vision_weights(tower, str(path))
    got = tower.state_dict()
    torch.testing.assert_close(got["model.embeddings.patch_embedding.weight"], sd["visual.conv1.weight"])
    torch.testing.assert_close(got["model.encoder.layers.1.self_attn.k_proj.weight"],
                               sd["visual.transformer.resblocks.1.attn.in_proj_weight"][32:64])
    torch.testing.assert_close(got["model.post_layernorm.bias"], sd["visual.ln_post.bias"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower_tokens(tower, x), reference_open_clip_tower(sd, x), rtol=1e-4, atol=1e-4)


def test_state_dict_wrapper_module_prefix_and_split_attention(tmp_path):
    """`ViT-L-14-sd.pt`-style files: under `state_dict`, DDP's `module.` prefix; or q/k/v already split."""
    sd = openclip_state_dict()
    reference = tiny_tower()
    load_vision_weights(reference, _save(tmp_path / "plain.pt", sd))
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    split = {}
    for k, v in sd.items():
        if k.startswith("visual.transformer") and "in_proj" in k:
            stem, param = k.rsplit(".attn.in_proj_", 1)
            for q, chunk in zip("qkv", v.chunk(3)):
                split[f"img_model.{stem}.ts_attn.{q}_proj.{param}"] = chunk  # the original Kosmos-G tower's names
        elif k.startswith("visual.transformer") and ".attn.out_proj." in k:
            split["img_model." + k.replace(".attn.", ".ts_attn.")] = v
        else:
            split["img_model." + k] = v
    for name, layout in (("wrapped.pt", wrapped), ("split.pt", split)):
        tower = tiny_tower()
        load_vision_weights(tower, _save(tmp_path / name, layout))
        for key, value in reference.state_dict().items():
            assert torch.equal(tower.state_dict()[key], value), (name, key)


def _save(path, sd) -> str:
    torch.save(sd, path)
    return str(path)


def test_loads_openai_torchscript_archive(tmp_path):
    # OpenAI ships CLIP as a TorchScript archive (ViT-L-14.pt) with the same `visual.*` keys.
    sd = openclip_state_dict()

    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    holder = Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        module = holder
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(value.half()))  # OpenAI's file is fp16
    path = tmp_path / "ViT-L-14.pt"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated but is how OpenAI's file is read
        torch.jit.script(holder).save(str(path))
    tower = tiny_tower()
    load_vision_weights(tower, str(path))
    torch.testing.assert_close(tower.state_dict()["model.encoder.layers.0.self_attn.q_proj.weight"],
                               sd["visual.transformer.resblocks.0.attn.in_proj_weight"][:32].half().float())


@pytest.mark.parametrize("kind", ["CLIPModel", "CLIPVisionModel"])
def test_loads_transformers_clip_folder(tmp_path, kind):
    # The layout of openai/clip-vit-large-patch14 on the Hub (and of the tiny world's teacher CLIP).
    vision = transformers.CLIPVisionConfig(**TINY)
    torch.manual_seed(0)
    if kind == "CLIPModel":
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision.to_dict()))
    else:
        model = transformers.CLIPVisionModel(vision)
    model.save_pretrained(tmp_path)
    tower = tiny_tower()
    load_vision_weights(tower, str(tmp_path))
    clip = (model.vision_model if kind == "CLIPModel" else model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # transformers' CLIP applies post_layernorm to CLS only; Kosmos-G to every token
        expected = clip.post_layernorm(clip(pixel_values=x).last_hidden_state)
        torch.testing.assert_close(tower_tokens(tower, x), expected)


def test_wrong_checkpoint_layout_is_an_error_naming_keys(tmp_path):
    tower = tiny_tower()
    with pytest.raises(ValueError, match="holds no CLIP image tower"):
        load_vision_weights(tower, _save(tmp_path / "not_clip.bin", {"conv1.weight": torch.zeros(32, 3, 8, 8)}))
    sd = openclip_state_dict()
    del sd["visual.ln_pre.bias"]
    sd["visual.transformer.resblocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['model.pre_layrnorm.bias'\], unmatched "
                                         r"\['visual.transformer.resblocks.0.attn.extra.weight'\]"):
        load_vision_weights(tower, _save(tmp_path / "partial.bin", sd))
    with pytest.raises(ValueError, match=r"wrong shapes .*patch_embedding.weight \[48, 3, 8, 8\]"):
        load_vision_weights(tower, _save(tmp_path / "wide.bin", openclip_state_dict(width=48)))
    (tmp_path / "truncated.pt").write_bytes(open(tmp_path / "wide.bin", "rb").read()[:200])
    with pytest.raises(ValueError, match="could not be read as a state dict"):
        load_vision_weights(tower, str(tmp_path / "truncated.pt"))


def test_missing_weights_file_names_path_key_and_fix(tmp_path):
    missing = str(tmp_path / "nope" / "ViT-L-14.pt")
    with pytest.raises(FileNotFoundError) as err:
        load_vision_weights(tiny_tower(), missing)
    message = str(err.value)
    assert missing in message and "model.vision.weights_path" in message
    assert "ViT-L-14-sd.pt" in message and "ViT-L-14.pt" in message


def test_clip_folder_without_weights_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_vision_weights(tiny_tower(), str(tmp_path))
    assert str(tmp_path / "model.safetensors") in str(err.value) and "transformers CLIP folder" in str(err.value)
