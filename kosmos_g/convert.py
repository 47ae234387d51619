"""Convert the authors' released Kosmos-G weights into this project's stage exports.

    python -m kosmos_g.convert official --checkpoint checkpoint_final.pt --sd sd-v1-5/ --out kosmos-g-final/

The checkpoint's kind is read from its keys: `final` becomes a KosmosGPipeline folder (an `instruct`
export), `stage2` an `align` export (so `train.py stage=instruct init_from=<it>` fine-tunes from the authors'
weights), `stage1` an `mllm` export. Loading is safe (no pickled code runs, the optimizer state is never
read; see kosmos_g/official.py) and needs no fairseq. Exports are written atomically with a manifest.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# torch, transformers, diffusers and Lightning are imported where used: `--help` answers in a second.

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "kosmos-g-official"
STAGE_OF_KIND = {"stage1": "mllm", "stage2": "align", "final": "instruct"}
DTYPES = ("float32", "float16", "bfloat16", "keep")  # "keep": the checkpoint's own (fp16)

# Stable Diffusion v1.5's unet/ and vae/ configs, for a checkpoint that carries their weights and no --sd.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)


def load_tokenizer(folder: Path, vocab_size: int):
    """The original tokenizer (`official_tokenizer`: fairseq ids, the five added specials), checked against
    the checkpoint's vocabulary size."""
    from kosmos_g.models.tokenizers import official_tokenizer
    from kosmos_g.official import OfficialCheckpointError

    try:
        tokenizer = official_tokenizer(folder)
    except FileNotFoundError as e:
        raise OfficialCheckpointError(f"--tokenizer {folder}: {e}") from None
    if len(tokenizer) != vocab_size:
        raise OfficialCheckpointError(f"--tokenizer {folder}: gives {len(tokenizer)} ids but the checkpoint's "
                                      f"embedding has {vocab_size} rows; use the tokenizer the checkpoint was "
                                      "trained with")
    return tokenizer


def load_exactly(model, sd: dict, what: str, source: str):
    """`load_state_dict(strict, assign)` on a meta-built model; a misfit is one error line naming the first keys."""
    from kosmos_g.official import OfficialCheckpointError
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [f"{k} {list(sd[k].shape)} vs {list(own[k])}" for k in sorted(set(own) & set(sd))
             if tuple(sd[k].shape) != own[k]]
    if missing or unexpected or wrong:
        raise OfficialCheckpointError(
            f"{source}: its {what} weights do not fit {type(model).__name__}: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of other shape {wrong[:2]}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def _diffusers_part(cls, sd: dict, config: dict, what: str, source: str):
    import torch
    with torch.device("meta"):
        model = cls.from_config(config)
    return load_exactly(model, sd, what, source)


def write_official_export(out: Path, conversion, mllm_config, tokenizer, sd_dir: Path | None, step: int = 0,
                          source: str = "", aligner_heads: int = 12) -> Path:
    """Write the converted parts as the stage export of the checkpoint's kind (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel

    from kosmos_g.models.aligner import AlignerNet
    from kosmos_g.models.diffusion import SD15_SCHEDULER
    from kosmos_g.models.mllm import MultimodalLM, MultimodalLMConfig
    from kosmos_g.official import OfficialCheckpointError
    from kosmos_g.processor import KosmosGProcessor
    from kosmos_g.run import config_hash, copy_part, write_export

    parts, kind = conversion.parts, conversion.kind
    config = MultimodalLMConfig(**mllm_config.to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device("meta"):
        mllm = MultimodalLM(config)
    load_exactly(mllm, parts["mllm"], "MLLM", source)
    vision = config.vision_config
    processor = KosmosGProcessor(tokenizer, num_image_tokens=config.num_image_tokens, image_size=vision.image_size,
                                 max_length=config.text_config.max_position_embeddings)
    writers = {"mllm": lambda path: mllm.save_pretrained(path), "processor": processor.save_pretrained}
    notes = []
    if kind != "stage1":
        sd = parts["aligner"]

        def layers(prefix: str) -> int:
            return 1 + max((int(k.split(".")[2]) for k in sd if k.startswith(prefix + ".layers.")), default=-1)

        with torch.device("meta"):
            aligner = AlignerNet(
                llm_dim=sd["encoder_proj.embed_tokens.weight"].shape[1], clip_dim=sd["encoder_query"].shape[1],
                num_heads=aligner_heads,  # not in the shapes; torchscale's EncoderDecoderConfig default
                ffn_size=sd["encoder.layers.0.ffn.fc1.weight"].shape[0], encoder_layers=layers("encoder_proj"),
                decoder_layers=layers("encoder"), num_queries=sd["encoder_query"].shape[0],
                max_source_positions=sd["encoder_proj.embed_positions.weight"].shape[0])
        own = aligner.state_dict()
        absent = sorted(set(own) - set(sd))
        if absent and not all(k.startswith(("decoder_query", "decoder.", "decoder_proj.")) for k in absent):
            raise OfficialCheckpointError(f"{source}: its aligner lacks {absent[:3]} (M must be complete)")
        if absent:  # the final checkpoint keeps M only: N (reconstruction) is unused by generation and stage 3
            sd = {**sd, **{k: torch.zeros(own[k].shape, dtype=next(iter(sd.values())).dtype) for k in absent}}
            notes.append("aligner N (reconstruction) is not in the checkpoint: written as zeros, unused by "
                         "generation and stage=instruct; run stage=align to train one")
        load_exactly(aligner, sd, "aligner", source)
        writers["aligner"] = lambda path: aligner.save_pretrained(path)

    if kind == "final":
        for name, cls, default in (("unet", UNet2DConditionModel, SD15_UNET), ("vae", AutoencoderKL, SD15_VAE)):
            folder = sd_dir / name if sd_dir is not None and (sd_dir / name).is_dir() else None
            if name in parts:
                config = cls.load_config(folder) if folder else default
                model = _diffusers_part(cls, parts[name], config, name, source)
                writers[name] = lambda path, model=model: model.save_pretrained(path)
            elif folder is not None:
                writers[name] = copy_part(folder)
            elif sd_dir is not None:
                raise OfficialCheckpointError(f"--sd {sd_dir}: has no {name}/ folder, and {source} holds no {name} "
                                              "weights; pass a Stable Diffusion v1.5 diffusers folder")
            else:
                raise OfficialCheckpointError(f"{source}: holds no {name} weights (diffusion_unet.unet.* / vae.vae.*) "
                                              "and no --sd was given; pass --sd <a Stable Diffusion v1.5 diffusers "
                                              "folder>")
        scheduler_cfg = (DPMSolverMultistepScheduler.load_config(sd_dir / "scheduler")
                         if sd_dir and (sd_dir / "scheduler").is_dir() else SD15_SCHEDULER)
        # The original samples with DPM-Solver++ (diffusers 0.21, whose last step ends at sigma_min).
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler_cfg, algorithm_type="dpmsolver++",
                                                            final_sigmas_type="sigma_min")
        writers["scheduler"] = lambda path: scheduler.save_pretrained(path)
        import diffusers
        index = {"_class_name": "KosmosGPipeline", "_diffusers_version": diffusers.__version__,
                 "mllm": ["kosmos_g.models.mllm", "MultimodalLM"],
                 "processor": [None, None], "aligner": ["kosmos_g.models.aligner", "AlignerNet"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
        writers["model_index.json"] = lambda path: path.write_text(json.dumps(index, indent=2))

    report = {"source": source, "kind": kind, "dropped": conversion.dropped, "unmatched": conversion.unmatched,
              "notes": notes}
    for note in notes:
        print(f"  note: {note}")
    writers["conversion.json"] = lambda path: path.write_text(json.dumps(report, indent=2))
    return write_export(out, STAGE_OF_KIND[kind], step, config_hash({"official": Path(source).name, "kind": kind}),
                        writers)


def convert_official(checkpoint, out, vit=None, sd=None, tokenizer=None, dtype: str = "float32",
                     allow_unmatched: bool = False, text_heads: int | None = None, aligner_heads: int = 12) -> Path:
    """Load, rename, check and write; returns the export folder. Errors are OfficialCheckpointError lines."""
    import torch

    from kosmos_g.official import (OfficialCheckpointError, arch_value, convert_state_dict, kosmos2_config,
                                   load_fairseq_checkpoint, load_open_clip_visual)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise OfficialCheckpointError(f"--out {out}: exists and is not an earlier export; choose an empty or new folder")
    sd_dir = Path(sd) if sd else None
    if sd_dir is not None and not sd_dir.is_dir():
        raise OfficialCheckpointError(f"--sd {sd}: not a folder (pass a Stable Diffusion v1.5 diffusers folder)")
    ckpt = load_fairseq_checkpoint(checkpoint)  # memory-mapped: cheap, so a bad file is reported first
    tok_dir = Path(tokenizer) if tokenizer else DEFAULT_TOKENIZER
    if not (tok_dir / "sentencepiece.bpe.model").is_file():
        raise OfficialCheckpointError(f"no tokenizer: pass --tokenizer <folder with sentencepiece.bpe.model> "
                                      f"({tok_dir} has none)")
    state = dict(ckpt.model)
    if vit:
        visual = load_open_clip_visual(vit)
        own = any(k.startswith("img_model.visual.") for k in state)
        print(f"--vit {vit}: " + ("ignored, the checkpoint holds its own (fine-tuned) vision tower" if own
                                  else f"{len(visual)} vision tensors used"))
        if not own:
            state.update(visual)
    conversion = convert_state_dict(state, None if dtype == "keep" else getattr(torch, dtype), allow_unmatched,
                                    source=str(checkpoint))
    cfg, step = ckpt.cfg, ckpt.num_updates
    del ckpt, state  # the memory-mapped file (and its optimizer state) is released here
    print(f"{Path(checkpoint).name}: {conversion.summary()}")
    for key in conversion.unmatched:
        print(f"  warning: skipped unmatched key {key}", file=sys.stderr)
    unused = [p for p in ("unet", "vae") if p in conversion.parts and conversion.kind != "final"]
    if unused:  # an mllm / align export holds no diffusion parts (stage 3 reads them from its SD folder)
        print(f"  note: the checkpoint's {' and '.join(unused)} weights are not part of a {conversion.kind} export")
    config = kosmos2_config(conversion.parts.get("mllm", {}), text_heads or arch_value(cfg, "decoder_attention_heads"),
                            max_positions=arch_value(cfg, "tokens_per_sample", 2048))
    tok = load_tokenizer(tok_dir, config.text_config.vocab_size)
    export = write_official_export(out, conversion, config, tok, sd_dir, step, source=str(checkpoint),
                                   aligner_heads=aligner_heads)
    print(f"wrote the {STAGE_OF_KIND[conversion.kind]!r} export {export}")
    return export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kosmos_g.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("official", help="convert a released Kosmos-G checkpoint (fairseq .pt) into a stage export",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PT",
                   help="checkpoint_final.pt (-> KosmosGPipeline folder), checkpoint_stage2.pt (-> align export) or "
                        "checkpoint_stage1.pt (-> mllm export); the kind is detected from its keys")
    p.add_argument("--vit", metavar="PT", help="ViT-L-14-sd.pt, the open_clip vision tower; used only when the "
                                               "checkpoint holds no vision weights (the released ones do)")
    p.add_argument("--sd", metavar="DIR", help="a Stable Diffusion v1.5 diffusers folder (unet/, vae/, scheduler/): "
                                               "U-Net and VAE when the checkpoint holds none, and the noise schedule")
    p.add_argument("--tokenizer", metavar="DIR", help="folder with the original sentencepiece.bpe.model "
                                                      f"(default: {DEFAULT_TOKENIZER} if it exists)")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder to write (new, or an earlier export)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the written weights; 'keep' leaves the checkpoint's (fp16) (default: float32)")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="skip keys that match no known Kosmos-G weight with a warning instead of failing")
    p.add_argument("--text-heads", type=int, metavar="N", help="attention heads of the text decoder (default: the "
                                                               "checkpoint cfg's decoder_attention_heads, else width/64)")
    p.add_argument("--aligner-heads", type=int, default=12, metavar="N",
                   help="attention heads of AlignerNet (not in the weights' shapes; default: 12, the original's)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from kosmos_g.official import OfficialCheckpointError
    try:
        convert_official(args.checkpoint, args.out, vit=args.vit, sd=args.sd, tokenizer=args.tokenizer,
                         dtype=args.dtype, allow_unmatched=args.allow_unmatched, text_heads=args.text_heads,
                         aligner_heads=args.aligner_heads)
    except OfficialCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
