"""The released Kosmos-G checkpoints: safe loading, key mapping, and the converted MLLM against independent references.

The references (pip torchscale's Decoder, torch-primitive vision tower and connector) live in
official_reference.py; the fake checkpoints use the original names at reduced sizes and the original
vocabulary, so the real tokenizer files in ../shared/kosmos-g-official/ fit them.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch
from safetensors.torch import load_file

from tests import official_reference as ref
from kosmos_g.convert import DTYPES, build_parser, main
from kosmos_g.official import (DROPPED, OfficialCheckpointError, convert_state_dict, kosmos2_config,
                               load_fairseq_checkpoint)
from kosmos_g.run import read_manifest, resolve_init

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "kosmos-g-official"
INVENTORY = Path(__file__).parent / "fixtures" / "official_inventory.json.gz"
needs_tokenizer = pytest.mark.skipif(not (SHARED / "sentencepiece.bpe.model").is_file(),
                                     reason=f"{SHARED} (the original tokenizer files) is absent")


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def mllm_ref():
    return ref.reference_mllm(seed=0)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from kosmos_g.models.diffusion import save_tiny_sd_folder
    return Path(save_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")), cross_attention_dim=ref.SIZES["a_dim"], seed=3))


def _diffusion_keys(sd_dir: Path, seed: int) -> dict:
    """Tiny U-Net/VAE weights (other values than the --sd folder's) under the original prefixes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.manual_seed(seed)
    out = {}
    for prefix, cls, name in (("diffusion_unet.unet.", UNet2DConditionModel, "unet"), ("vae.vae.", AutoencoderKL, "vae")):
        model = cls.from_config(cls.load_config(sd_dir / name))
        out.update({prefix + k: v for k, v in model.state_dict().items()})
    return out


def _reference_condition(mllm_ref, tokens, slots, pixels):
    decoder, visual, connector = mllm_ref
    with torch.no_grad():
        image_embeds = connector(visual(pixels))
        return image_embeds, ref.text_forward(decoder, tokens, image_embeds, slots)


def _converted_condition(folder: Path, tokens, slots, pixels, connector=None):
    from transformers import Kosmos2Model
    model = Kosmos2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        if connector is not None:  # the connector alone, on the same vision features
            features = torch.nn.functional.normalize(torch.randn(2, 5, ref.SIZES["v_width"]), dim=-1)
            assert (model.image_to_text_projection(features)[0] - connector(features)).abs().max() <= 1e-5
        image_embeds = model.get_image_features(pixels).pooler_output
        out = model(pixel_values=pixels, input_ids=tokens, image_embeds_position_mask=slots.long(),
                    attention_mask=(tokens != ref.PAD).long())
    return image_embeds, out.last_hidden_state


# -- key inventory at full size ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["final", "stage2"])
def test_inventory_maps_one_to_one_onto_paper_size_models(kind):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    from kosmos_g.convert import SD15_UNET, SD15_VAE
    inventory = json.loads(gzip.decompress(INVENTORY.read_bytes()))[kind]
    with torch.device("meta"):
        sd = {k: torch.empty(shape, dtype=torch.float16) for k, shape in inventory.items()}
        paper = Kosmos2Config(text_config=dict(vocab_size=64007, embed_dim=2048, layers=24, attention_heads=32,
                                               ffn_dim=8192),
                              vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=224, patch_size=14),
                              latent_query_num=64)
        target = Kosmos2ForConditionalGeneration(paper)
    # one storage, as torch.save keeps the tie
    sd["gpt_model.decoder.output_projection.weight"] = sd["gpt_model.decoder.embed_tokens.weight"]
    conv = convert_state_dict(sd, dtype=None, progress=False)
    assert conv.kind == kind and not conv.unmatched

    # MLLM: exactly Kosmos2ForConditionalGeneration's keys, same shapes; and the config read back from shapes.
    got = {k: tuple(v.shape) for k, v in conv.parts["mllm"].items()}
    assert got == {k: tuple(v.shape) for k, v in target.state_dict().items()}
    config = kosmos2_config(conv.parts["mllm"])
    assert (config.text_config.layers, config.text_config.attention_heads, config.vision_config.num_attention_heads,
            config.vision_config.image_size, config.latent_query_num) == (24, 32, 16, 224, 64)
    # Paper-preset parameter counts, from the architecture's numbers (lm_head is the tied embedding).
    d, f, v = 2048, 8192, 64007
    text = v * d + 24 * (4 * (d * d + d) + 2 * d + 2 * d + f * d + f + d * f + d + 2 * f + 2 * d) + 2 * d
    w, m = 1024, 4096
    vision = w * 3 * 14 * 14 + w + 257 * w + 4 * w + 24 * (4 * (w * w + w) + 4 * w + 2 * m * w + m + w)
    connector = d * w + d + 64 * d + 4 * (d * d + d)
    counted = {n: sum(t.numel() for k, t in conv.parts["mllm"].items() if k.startswith(n) and "lm_head" not in k)
               for n in ("text_model", "vision_model", "image_to_text_projection")}
    assert counted == {"text_model": text, "vision_model": vision, "image_to_text_projection": connector}
    assert sum(p.numel() for p in target.parameters()) == text + vision + connector

    # Aligner: the original aligner.* names with the prefix stripped; only the CLIP text encoder dropped.
    originals = {k.removeprefix("aligner."): tuple(s) for k, s in inventory.items()
                 if k.startswith("aligner.") and not k.startswith("aligner.clip_encoder.")}
    assert {k: tuple(t.shape) for k, t in conv.parts["aligner"].items()} == originals
    assert ("decoder_query" in originals) == (kind == "stage2")

    # Only the documented drops, each matched by name.
    expected_drops = {"gpt_model.decoder.embed_positions._float_tensor", "gpt_model.decoder.self_attn_sope.scale"}
    expected_drops |= {k for k in inventory if k.startswith("aligner.clip_encoder.")}
    assert set(conv.dropped) == expected_drops
    assert len(conv.parts["mllm"]) + len(conv.parts["aligner"]) + len(conv.dropped) + sum(
        len(conv.parts.get(p, {})) for p in ("unet", "vae")) == len(inventory)  # output_projection -> lm_head

    if kind == "final":  # the frozen SD parts were diffusers modules: a prefix strip onto SD v1.5's classes
        with torch.device("meta"):
            unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
        assert {k: tuple(t.shape) for k, t in conv.parts["unet"].items()} == {
            k: tuple(t.shape) for k, t in unet.state_dict().items()}
        assert {k: tuple(t.shape) for k, t in conv.parts["vae"].items()} == {
            k: tuple(t.shape) for k, t in vae.state_dict().items()}
    else:
        assert "unet" not in conv.parts and "vae" not in conv.parts


def test_inventory_fixture_is_what_its_script_derives():
    """The fixture is reproducible from tests/fixtures/official_inventory.py (pip torchscale on meta + the
    hand-written open_clip / connector names): a stale or hand-edited fixture fails here."""
    from tests.fixtures import official_inventory
    assert official_inventory.inventory() == json.loads(gzip.decompress(INVENTORY.read_bytes()))


# -- end to end: fake checkpoints converted, compared with the references --------------------------------

@needs_tokenizer
def test_final_checkpoint_converts_to_a_pipeline_folder_computing_the_reference_condition(tmp_path, mllm_ref, tiny_sd):
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    aligner = ref.aligner()
    model = {**ref.original_state_dict(*mllm_ref), **aligner, **_diffusion_keys(tiny_sd, seed=7)}
    ckpt = _save(ref.fairseq_checkpoint(model), tmp_path / "checkpoint_final.pt")
    out = tmp_path / "final"
    assert main(["official", "--checkpoint", str(ckpt), "--sd", str(tiny_sd), "--out", str(out),
                 "--aligner-heads", str(ref.SIZES["a_heads"])]) == 0

    manifest = read_manifest(out)
    assert manifest["stage"] == "instruct" and manifest["step"] == 1234
    assert {"mllm", "processor", "aligner", "unet", "vae", "scheduler", "model_index.json"} <= set(manifest["parts"])
    tokens, slots, pixels = ref.prompt_batch()
    want_images, want = _reference_condition(mllm_ref, tokens, slots, pixels)
    got_images, got = _converted_condition(out / "mllm", tokens, slots, pixels, connector=mllm_ref[2])
    assert (got_images - want_images).abs().max() <= 1e-5  # vision tower + connector
    assert (got - want).abs().max() <= 1e-5  # every position, right padding included
    # the aligner: original names without `aligner.`, the fp16 values exactly
    saved = load_file(out / "aligner" / "diffusion_pytorch_model.safetensors")
    m_keys = {k.removeprefix("aligner.") for k in aligner}
    assert m_keys < set(saved)  # M; N (reconstruction), absent from a final checkpoint, is written as zeros
    assert all(torch.equal(saved[k.removeprefix("aligner.")], v.half().float()) for k, v in aligner.items())
    assert all(not saved[k].any() and k.startswith(("decoder_query", "decoder.", "decoder_proj."))
               for k in set(saved) - m_keys)
    # U-Net from the checkpoint's own keys (not the --sd folder's other weights); scheduler: DPM-Solver++
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    own = {k.removeprefix("diffusion_unet.unet."): v for k, v in model.items() if k.startswith("diffusion_unet.")}
    assert all(torch.equal(unet.state_dict()[k], v.half().float()) for k, v in own.items())
    scheduler = DPMSolverMultistepScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.final_sigmas_type == "sigma_min"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "KosmosGPipeline" and index["processor"] == [None, None]
    report = json.loads((out / "conversion.json").read_text())
    assert set(report["dropped"]) == {"gpt_model.decoder.embed_positions._float_tensor",
                                      "gpt_model.decoder.self_attn_sope.scale"}
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out / "processor")
    assert len(tok) == ref.VOCAB and tok.convert_tokens_to_ids(["<image>", "</image>", "<mask>"]) == [
        ref.IMAGE, ref.IMAGE_END, 64001]
    # the written tokenizer gives fairseq's ids: sentencepiece pieces looked up in dict.txt (from id 4)
    import sentencepiece
    spm = sentencepiece.SentencePieceProcessor(model_file=str(SHARED / "sentencepiece.bpe.model"))
    fairseq = {line.split(" ")[0]: 4 + i for i, line in enumerate((SHARED / "dict.txt").read_text().splitlines())}
    for text in ("a photo of a dog", "Kosmos-G renders <i> on the beach", "héllo wörld 1234, 東京"):
        want = [fairseq.get(piece, 3) for piece in spm.encode(text, out_type=str)]
        assert tok(text, add_special_tokens=False).input_ids == want


@needs_tokenizer
def test_stage2_checkpoint_becomes_an_align_export_that_instruct_starts_from(tmp_path, mllm_ref):
    from transformers import CLIPTextConfig, CLIPTextModel
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77))
    aligner = ref.aligner(stage2=True)
    model = {**ref.original_state_dict(*mllm_ref), **aligner,
             **{"aligner.clip_encoder." + k: v for k, v in clip.state_dict().items()}}
    ckpt = _save(ref.fairseq_checkpoint(model), tmp_path / "checkpoint_stage2.pt")
    out = tmp_path / "stage2"
    assert main(["official", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "keep",
                 "--aligner-heads", str(ref.SIZES["a_heads"])]) == 0
    assert read_manifest(out)["stage"] == "align"
    assert resolve_init(str(out), "instruct", None, "r") == out  # train.py stage=instruct init_from=<it>
    assert not (out / "unet").exists()
    saved = load_file(out / "aligner" / "diffusion_pytorch_model.safetensors")
    assert set(saved) == {k.removeprefix("aligner.") for k in aligner}  # M and N, no clip_encoder
    assert saved["decoder_query"].dtype == torch.float16  # --dtype keep
    config = json.loads((out / "aligner" / "config.json").read_text())
    assert config["llm_dim"] == ref.SIZES["dim"] and config["num_heads"] == ref.SIZES["a_heads"]


@needs_tokenizer
def test_stage1_checkpoint_with_the_vision_tower_from_vit_file(tmp_path, mllm_ref):
    decoder, visual, connector = mllm_ref
    model = ref.original_state_dict(decoder, visual, connector, vision=False)
    ckpt = _save(ref.fairseq_checkpoint(model), tmp_path / "checkpoint_stage1.pt")
    vit = _save(ref.open_clip_file(visual), tmp_path / "ViT-L-14-sd.pt")  # packed attention, module. prefix
    out = tmp_path / "stage1"
    assert main(["official", "--checkpoint", str(ckpt), "--vit", str(vit), "--out", str(out)]) == 0
    assert read_manifest(out)["stage"] == "mllm"
    assert not (out / "aligner").exists()
    tokens, slots, pixels = ref.prompt_batch()
    _, want = _reference_condition(mllm_ref, tokens, slots, pixels)
    _, got = _converted_condition(out / "mllm", tokens, slots, pixels)
    assert (got - want).abs().max() <= 1e-5


@needs_tokenizer
def test_final_checkpoint_without_unet_needs_sd(tmp_path, mllm_ref, tiny_sd, capsys):
    model = {**ref.original_state_dict(*mllm_ref), **ref.aligner()}
    ckpt = _save(ref.fairseq_checkpoint(model), tmp_path / "checkpoint_final.pt")
    heads = ["--aligner-heads", str(ref.SIZES["a_heads"])]
    assert main(["official", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"), *heads]) == 2
    err = capsys.readouterr().err.strip()
    assert "--sd" in err and "unet" in err and len(err.splitlines()) == 1
    assert main(["official", "--checkpoint", str(ckpt), "--sd", str(tiny_sd), "--out", str(tmp_path / "b"), *heads]) == 0
    assert (tmp_path / "b" / "unet" / "config.json").is_file() and (tmp_path / "b" / "vae").is_dir()


# -- safety and bad input --------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path, capsys, zipped):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"model": {"gpt_model.decoder.embed_tokens.weight": torch.zeros(2, 2)}, "extra_state": _Payload(marker)},
               ckpt, _use_new_zipfile_serialization=zipped)
    assert main(["official", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused" in err and "system" in err and str(ckpt) in err and len(err.splitlines()) == 1
    with pytest.raises(OfficialCheckpointError, match="refused"):
        load_fairseq_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["truncated", "truncated_legacy", "text", "no_model", "empty", "missing"])
def test_wrong_files_get_a_one_line_error_naming_them(tmp_path, case):
    path = tmp_path / "checkpoint.pt"
    if case == "truncated":
        data = (_save(ref.fairseq_checkpoint({"gpt_model.decoder.x": torch.randn(3000)}), path)).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "truncated_legacy":  # torch < 1.6 wrote a bare pickle, no zip directory to miss
        torch.save(ref.fairseq_checkpoint({"gpt_model.decoder.x": torch.randn(3000)}), path,
                   _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:-5000])
    elif case == "text":
        path.write_text("<html>404 not found</html>")
    elif case == "no_model":
        _save({"cfg": {}, "optimizer_history": []}, path)
    elif case == "empty":
        path.write_bytes(b"")
    with pytest.raises(OfficialCheckpointError) as info:
        load_fairseq_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert {"truncated": "truncated", "truncated_legacy": "truncated", "text": "not a torch checkpoint",
            "no_model": "no `model`", "empty": "empty", "missing": "no such file"}[case] in message


def test_the_safe_loader_reads_fairseq_extras_and_leaves_the_optimizer_state(tmp_path, monkeypatch):
    ckpt = _save(ref.fairseq_checkpoint({"gpt_model.decoder.layer_norm.weight": torch.ones(4)}), tmp_path / "c.pt")
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or load(*a, **kw))
    loaded = load_fairseq_checkpoint(ckpt)  # Namespace, numpy scalars and an omegaconf container on the way
    assert [(kw["weights_only"], kw["mmap"]) for kw in calls] == [(True, True)]
    assert not hasattr(loaded, "last_optimizer_state") and "last_optimizer_state" not in vars(loaded)
    assert loaded.num_updates == 1234 and loaded.model["gpt_model.decoder.layer_norm.weight"].dtype == torch.float16
    assert loaded.cfg["model"].decoder_attention_heads == ref.SIZES["heads"]


def test_objects_of_fairseq_classes_load_as_inert_data_without_fairseq(tmp_path, monkeypatch):
    """fairseq's config enums / meters may sit in cfg and extra_state; fairseq is not installed to rebuild them."""
    import enum
    import types
    module = types.ModuleType("fairseq.dataclass.constants")

    class DDPBackend(enum.Enum):
        no_c10d = "no_c10d"

    class Meter:
        def __init__(self):
            self.sum = 3.0
    for cls in (DDPBackend, Meter):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    for name in ("fairseq", "fairseq.dataclass", "fairseq.dataclass.constants"):
        monkeypatch.setitem(sys.modules, name, module)
    ckpt = _save({"model": {"gpt_model.decoder.layer_norm.weight": torch.ones(3)},
                  "cfg": {"distributed_training": {"ddp_backend": DDPBackend.no_c10d}}, "extra_state": {"m": Meter()}},
                 tmp_path / "c.pt")
    for name in ("fairseq", "fairseq.dataclass", "fairseq.dataclass.constants"):
        monkeypatch.delitem(sys.modules, name)
    loaded = load_fairseq_checkpoint(ckpt)
    backend = loaded.cfg["distributed_training"]["ddp_backend"]
    assert backend.args == ("no_c10d",) and "fairseq.dataclass.constants.DDPBackend" in repr(backend)
    assert "fairseq" not in sys.modules
    assert torch.equal(loaded.model["gpt_model.decoder.layer_norm.weight"], torch.ones(3))


def test_misfitting_weights_get_a_one_line_error(tmp_path, mllm_ref):
    from kosmos_g.convert import load_exactly
    conv = convert_state_dict(ref.original_state_dict(*mllm_ref), progress=False)
    config = kosmos2_config(conv.parts["mllm"], text_heads=ref.SIZES["heads"])
    del conv.parts["mllm"]["text_model.model.layers.1.ffn.fc1.bias"]
    from transformers import Kosmos2ForConditionalGeneration
    with torch.device("meta"):
        model = Kosmos2ForConditionalGeneration(config)
    with pytest.raises(OfficialCheckpointError, match=r"1 missing \['text_model.model.layers.1.ffn.fc1.bias'\]") as e:
        load_exactly(model, conv.parts["mllm"], "MLLM", "ckpt.pt")
    assert "\n" not in str(e.value)


def test_unmatched_keys_fail_unless_allowed(mllm_ref):
    sd = {**ref.original_state_dict(*mllm_ref), "gpt_model.decoder.chunk_emb.weight": torch.zeros(2, 2)}
    with pytest.raises(OfficialCheckpointError, match="chunk_emb"):
        convert_state_dict(sd, progress=False)
    conv = convert_state_dict(sd, allow_unmatched=True, progress=False)
    assert conv.unmatched == ["gpt_model.decoder.chunk_emb.weight"] and conv.kind == "stage1"
    # open_clip's packed attention next to ts_attn (a tower built without --visual-pretrained): a dead copy
    block = "img_model.visual.transformer.resblocks.0."
    both = {**sd, block + "attn.in_proj_weight": torch.zeros(3, 2), block + "attn.out_proj.weight": torch.zeros(2, 2)}
    conv = convert_state_dict(both, allow_unmatched=True, progress=False)
    assert {block + "attn.in_proj_weight", block + "attn.out_proj.weight"} <= set(conv.dropped)
    assert torch.equal(conv.parts["mllm"]["vision_model.model.encoder.layers.0.self_attn.out_proj.weight"],
                       sd[block + "ts_attn.out_proj.weight"].float())
    no_vision = {k: v for k, v in sd.items() if not k.startswith(("img_model.", "gpt_model.decoder.chunk_emb"))}
    with pytest.raises(OfficialCheckpointError, match="--vit"):
        kosmos2_config(convert_state_dict(no_vision, progress=False).parts["mllm"])
    untied = {**sd, "gpt_model.decoder.output_projection.weight": torch.zeros(ref.VOCAB, ref.SIZES["dim"])}
    with pytest.raises(OfficialCheckpointError, match="ties"):
        convert_state_dict(untied, allow_unmatched=True, progress=False)


def test_every_documented_drop_has_a_reason():
    assert all(isinstance(why, str) and why for why in DROPPED.values()) and {"float32", "keep"} <= set(DTYPES)


def test_help_documents_every_option():
    run = subprocess.run([sys.executable, "-m", "kosmos_g.convert", "official", "--help"], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 0, run.stderr
    official = build_parser()._subparsers._group_actions[0].choices["official"]
    options = [o for a in official._actions for o in a.option_strings]
    assert len(options) >= 9 and all(o in run.stdout for o in options)
    assert all(a.help for a in official._actions)


@pytest.mark.slow
@needs_tokenizer
def test_converted_final_weights_generate_and_fine_tune(tmp_path, mllm_ref, tiny_sd, tiny_world):
    """The user's route: convert the final checkpoint, load it as a KosmosGPipeline (the condition is M of the
    reference MLLM states; prompts in the original format), generate, then fine-tune it with stage=instruct."""
    from PIL import Image

    from kosmos_g.config import load_config
    from kosmos_g.pipeline import KosmosGPipeline, condition
    from kosmos_g.train import run

    model = {**ref.original_state_dict(*mllm_ref), **ref.aligner(), **_diffusion_keys(tiny_sd, seed=7)}
    ckpt = _save(ref.fairseq_checkpoint(model), tmp_path / "checkpoint_final.pt")
    out = tmp_path / "final"
    assert main(["official", "--checkpoint", str(ckpt), "--sd", str(tiny_sd), "--out", str(out),
                 "--aligner-heads", str(ref.SIZES["a_heads"])]) == 0
    pipe = KosmosGPipeline.from_pretrained(out)
    assert pipe.scheduler.config.final_sigmas_type == "sigma_min"

    tokens, slots, pixels = ref.prompt_batch()
    _, states = _reference_condition(mllm_ref, tokens, slots, pixels)
    batch = {"input_ids": tokens, "attention_mask": (tokens != ref.PAD).long(), "image_mask": slots,
             "pixel_values": pixels}
    with torch.no_grad():
        got = condition(pipe.mllm, pipe.aligner, batch)
        want = pipe.aligner.encode(states, padding_mask=tokens == ref.PAD)
    assert (got - want).abs().max() <= 1e-5
    # the original prompt format: <s>, (1 + 64 at paper size) <image> + </image> per image, no </s>; the null prompt is <s> alone
    subject = Image.new("RGB", (40, 40), (200, 30, 30))
    ids = pipe.processor(["a photo of", subject, "on the beach"]).input_ids.tolist()
    assert ids[0] == 0 and 2 not in ids and ids.count(ref.IMAGE) == 1 + ref.SIZES["queries"] and ids.count(ref.IMAGE_END) == 1
    assert pipe.processor.null_prompt().input_ids.tolist() == [0]
    image = pipe("a photo of <i> on the beach", images=[subject], num_inference_steps=2, height=32, width=32,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()

    cfg = load_config(["stage=instruct", f"init_from={out}", f"model.diffusion_path={tiny_sd}",
                       f"runs_dir={tmp_path / 'runs'}", "run_name=ft", f"data.root={tiny_world(100)}",
                       "trainer.max_steps=2", "stage.batch_size=2", "stage.sample_every_n_steps=0"])
    export = run(cfg)
    tuned = KosmosGPipeline.from_pretrained(export)
    before, after = pipe.mllm.state_dict(), tuned.mllm.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the authors' MLLM was fine-tuned
