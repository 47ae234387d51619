"""A web app to try a Kosmos-G pipeline: interleaved prompts, edits, LoRA and ControlNet, offline.

    python -m kosmos_g.app                                   # the `make demo` export, http://127.0.0.1:7860
    python -m kosmos_g.app --pipeline <export folder> --lora-dir loras/ --controlnet controlnets/canny \\
        --dtype float16 --cpu-offload --attention-slicing    # real weights on a GPU

Tabs: Generate (a prompt with `<i>` placeholders; one image slot per `<i>`), Edit (source image + instruction,
the InstructPix2Pix-style prompt of the stage-3 edit data), ControlNet (the same prompt guided by the canny edges
of a control image through a local SD v1.5 ControlNet). Nothing is fetched at run time: analytics off, system
fonts (no web fonts), `share` off unless asked.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read by gradio at import and at Blocks()

import argparse  # noqa: E402
import html  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from kosmos_g.generate import DTYPES, UsageError, load_pipeline  # noqa: E402
from kosmos_g.pipeline import SCHEDULERS, KosmosGPipeline  # noqa: E402
from kosmos_g.processor import IMAGE_PLACEHOLDER, PromptError  # noqa: E402

DEFAULT_PIPELINE = Path("runs/demo/instruct/export")  # where `make demo` exports the stage-3 pipeline
EXAMPLES_FILE = "app_examples.json"  # written by the demo into its run folder (runs/demo/)
MAX_IMAGES = 4  # image slots per prompt
MAX_SEED = 2**31 - 1
# The tabs share one pipeline (and its scheduler and LoRA state): their events share one queue slot.
ONE_AT_A_TIME = dict(concurrency_id="pipeline", concurrency_limit=1)
NO_LORA = "None"
# System fonts only: gradio's default theme would load web fonts from a CDN.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def mismatch_message(prompt: str, images: list) -> Optional[str]:
    """The page's error for a prompt whose `<i>` count differs from the uploaded images (None when they match).
    Worded without "<i>": gradio renders error toasts as HTML, where it would become an italic tag."""
    n = prompt.count(IMAGE_PLACEHOLDER)
    if n > MAX_IMAGES:
        return f"The prompt has {n} image placeholders; this app takes at most {MAX_IMAGES} images."
    if n != len(images):
        return (f"The prompt has {n} image placeholder(s) but {len(images)} image(s) are uploaded: "
                "upload one image per placeholder, in order.")
    return None


def load_examples(folder: Optional[Path]) -> dict:
    """{"generate": [[prompt, image path, ...]], "edit": [[image path, instruction]]} from `folder`/app_examples.json
    ({} when there is none: examples are optional)."""
    path = folder / EXAMPLES_FILE if folder else None
    if path is None or not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    generate = [[e["prompt"], *[str(folder / im) for im in e["images"]]] for e in raw.get("generate", [])]
    return {"generate": [row + [None] * (1 + MAX_IMAGES - len(row)) for row in generate],
            "edit": [[str(folder / e["image"]), e["instruction"]] for e in raw.get("edit", [])]}


class KosmosGApp:
    """The app's state (pipeline, sampler, LoRA, ControlNets) and the functions behind its buttons."""

    def __init__(self, pipe: KosmosGPipeline, lora_dir: Optional[Path] = None, controlnet: Optional[str] = None,
                 examples: Optional[dict] = None):
        self.pipe = pipe
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.controlnet = controlnet or ""
        self.examples = examples or {}
        self.scheduler = None
        self.lora = NO_LORA
        self.controlnets = {}  # folder -> ControlNetModel, loaded once
        factor = pipe.vae_scale_factor
        self.native_size = pipe.unet.config.sample_size * factor
        self.size_range = (4 * factor, max(1024, 2 * self.native_size), factor)

    # -- settings shared by the tabs -------------------------------------------------------------------------

    def loras(self) -> list[str]:
        if not self.lora_dir or not self.lora_dir.is_dir():
            return [NO_LORA]
        return [NO_LORA, *sorted(p.name for p in self.lora_dir.glob("*.safetensors"))]

    def _set_scheduler(self, name: str) -> None:
        if name not in SCHEDULERS:
            raise gr.Error(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
        if name != self.scheduler:
            self.pipe.use_scheduler(name)
            self.scheduler = name

    def _set_lora(self, name: str, scale: float) -> None:
        name = name or NO_LORA
        if name not in self.loras():  # only files listed from --lora-dir, never another path
            raise gr.Error(f"Unknown LoRA {name!r}; choose one of the .safetensors files in --lora-dir.")
        if name != self.lora:
            if self.lora != NO_LORA:
                self.pipe.unload_lora_weights()
                self.lora = NO_LORA
            if name != NO_LORA:
                try:
                    self.pipe.load_lora_weights(self.lora_dir / name, adapter_name="app")
                except (OSError, ValueError) as e:
                    raise gr.Error(f"Cannot load LoRA {name}: {e}") from e
                self.lora = name
        if self.lora != NO_LORA:
            self.pipe.set_adapters("app", adapter_weights=float(scale))

    def _sample(self, run, seed, randomize: bool, num_images: int) -> tuple[list, int]:
        """Call `run(generators)` with one generator per image (image i has seed + i) -> (gallery, seed)."""
        seed = random.randint(0, MAX_SEED) if randomize else int(seed or 0)
        if not 0 <= seed <= MAX_SEED:
            raise gr.Error(f"Seed must be between 0 and {MAX_SEED}, got {seed}.")
        seeds = [seed + i for i in range(int(num_images))]
        # CPU generators: the same image for a seed on any device, as in `python -m kosmos_g.generate`.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        try:
            images = run(generators)
        except PromptError as e:  # a prompt the processor cannot encode: the page shows why (as HTML)
            raise gr.Error(html.escape(str(e))) from e
        return [(im, f"seed {s}") for im, s in zip(images, seeds)], seed

    def _common(self, scheduler, lora, lora_scale, steps, guidance, height, width) -> dict:
        self._set_scheduler(scheduler)
        self._set_lora(lora, lora_scale)
        for name, value in (("height", height), ("width", width)):
            if value and int(value) % self.pipe.vae_scale_factor:
                raise gr.Error(f"{name} must be a multiple of {self.pipe.vae_scale_factor}, got {value}")
        return dict(num_inference_steps=int(steps), guidance_scale=float(guidance),
                    height=int(height) if height else None, width=int(width) if width else None)

    # -- the tabs' functions ---------------------------------------------------------------------------------

    def generate(self, prompt, negative_prompt, guidance, steps, scheduler, seed, randomize, num_images, height,
                 width, lora, lora_scale, *slots):
        """Generate tab: prompt with <i> + the uploaded images -> (gallery of (image, "seed N"), seed used)."""
        images = [im for im in slots if im is not None]
        error = mismatch_message(prompt or "", images) or (None if (prompt or "").strip() else "Type a prompt.")
        if error:
            raise gr.Error(error)
        kw = self._common(scheduler, lora, lora_scale, steps, guidance, height, width)
        return self._sample(lambda g: self.pipe(prompt, images=images, negative_prompt=negative_prompt or None,
                                                generator=g, num_images_per_prompt=len(g), **kw).images,
                            seed, randomize, num_images)

    def edit(self, source, instruction, negative_prompt, guidance, steps, scheduler, seed, randomize, num_images,
             height, width, lora, lora_scale):
        """Edit tab: [source image, instruction], the layout of stage 3's edit samples."""
        if source is None or not (instruction or "").strip():
            raise gr.Error("Upload a source image and type an instruction (e.g. 'make it blue').")
        kw = self._common(scheduler, lora, lora_scale, steps, guidance, height, width)
        return self._sample(lambda g: self.pipe([source, instruction], negative_prompt=negative_prompt or None,
                                                generator=g, num_images_per_prompt=len(g), **kw).images,
                            seed, randomize, num_images)

    def control(self, controlnet, control_image, low, high, conditioning_scale, prompt, negative_prompt, guidance,
                steps, scheduler, seed, randomize, num_images, height, width, lora, lora_scale, *slots):
        """ControlNet tab: the Generate tab's prompt, guided by the canny edges of `control_image`."""
        from kosmos_g.controlnet import KosmosGControlNetPipeline, canny

        images = [im for im in slots if im is not None]
        error = (mismatch_message(prompt or "", images) or (None if (prompt or "").strip() else "Type a prompt.")
                 or (None if control_image is not None else "Upload a control image."))
        if error:
            raise gr.Error(error)
        if int(low) > int(high):
            raise gr.Error(f"The canny low threshold ({low}) must not exceed the high one ({high}).")
        pipe = KosmosGControlNetPipeline.from_kosmos_g(self.pipe, self._controlnet(controlnet))
        kw = self._common(scheduler, lora, lora_scale, steps, guidance, height, width)
        edges = canny(control_image, int(low), int(high))
        gallery, seed = self._sample(
            lambda g: pipe(prompt, control_image=edges, images=images, negative_prompt=negative_prompt or None,
                           generator=g, num_images_per_prompt=len(g), controlnet_conditioning_scale=float(
                               conditioning_scale), **kw).images, seed, randomize, num_images)
        return [(edges, "canny edges"), *gallery], seed

    def _controlnet(self, folder: str):
        from diffusers import ControlNetModel

        folder = (folder or "").strip()
        if not folder or not (Path(folder) / "config.json").is_file():
            raise gr.Error(f"No ControlNet folder at {folder!r}: give a local diffusers ControlNet folder (config.json "
                           "+ diffusion_pytorch_model.safetensors), e.g. an SD v1.5 canny ControlNet.")
        if folder not in self.controlnets:
            try:
                net = ControlNetModel.from_pretrained(folder, local_files_only=True, torch_dtype=self.pipe.unet.dtype)
            except (OSError, ValueError) as e:
                raise gr.Error(f"Cannot load the ControlNet from {folder}: {e}") from e
            self.controlnets[folder] = net.to(self.pipe.unet.device)
        return self.controlnets[folder]

    # -- the page --------------------------------------------------------------------------------------------

    def blocks(self) -> gr.Blocks:
        with gr.Blocks(title="Kosmos-G", analytics_enabled=False) as demo:
            gr.Markdown("## Kosmos-G: images from interleaved text and images\n"
                        f"Write `{IMAGE_PLACEHOLDER}` in the prompt where an image goes; each `{IMAGE_PLACEHOLDER}` "
                        "gets an image slot, in order.")
            with gr.Accordion("Sampler and LoRA", open=False):
                with gr.Row():
                    scheduler = gr.Dropdown(list(SCHEDULERS), value="dpm++", label="Scheduler")
                    lora = gr.Dropdown(self.loras(), value=NO_LORA, label="LoRA (from --lora-dir)")
                    lora_scale = gr.Slider(0, 1, value=1.0, step=0.05, label="LoRA scale")
            shared = [scheduler, lora, lora_scale]
            with gr.Tabs():
                with gr.Tab("Generate"):
                    self._generate_tab(shared)
                with gr.Tab("Edit"):
                    self._edit_tab(shared)
                with gr.Tab("ControlNet"):
                    self._control_tab(shared)
        return demo

    def _prompt_and_slots(self, value: str, tab: str):
        prompt = gr.Textbox(label="Prompt", value=value, placeholder=f"a {IMAGE_PLACEHOLDER} on the beach",
                            info=f"one image per {IMAGE_PLACEHOLDER}", elem_id=f"{tab}-prompt")
        n = value.count(IMAGE_PLACEHOLDER)
        with gr.Row():
            slots = [gr.Image(label=f"image {k + 1}", type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                              height=160, visible=k < n, elem_id=f"{tab}-image-{k}") for k in range(MAX_IMAGES)]

        def show(text, *images):  # slots follow the <i> count; a filled slot stays visible so it can be cleared
            count = (text or "").count(IMAGE_PLACEHOLDER)
            return [gr.update(visible=k < count or im is not None) for k, im in enumerate(images)]

        prompt.change(show, [prompt, *slots], slots, queue=False, show_progress="hidden", api_visibility="private")
        return prompt, slots

    def _sampling(self):
        """Negative prompt, guidance, steps, seed, images, size: (components in `generate`'s order)."""
        lo, hi, step = self.size_range
        with gr.Accordion("Options", open=True):
            negative = gr.Textbox(label="Negative prompt", value="", placeholder="empty: the null prompt, as in training")
            with gr.Row():
                guidance = gr.Slider(1, 15, value=6.0, step=0.5, label="Guidance scale")
                steps = gr.Slider(1, 100, value=50, step=1, label="Steps")  # the original app's default
                num_images = gr.Slider(1, 8, value=1, step=1, label="Images")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed (image i: seed + i)")
                randomize = gr.Checkbox(value=False, label="Randomise seed")
                height = gr.Slider(lo, hi, value=self.native_size, step=step, label="Height")
                width = gr.Slider(lo, hi, value=self.native_size, step=step, label="Width")
        return negative, guidance, steps, seed, randomize, num_images, height, width

    def _gallery(self, tab: str):
        return gr.Gallery(label="Images", columns=4, height="auto", format="png", elem_id=f"{tab}-gallery")

    def _generate_tab(self, shared):
        examples = self.examples.get("generate", [])
        with gr.Row():
            with gr.Column():
                prompt, slots = self._prompt_and_slots(examples[0][0] if examples else f"a {IMAGE_PLACEHOLDER}",
                                                       "generate")
                button = gr.Button("Generate", variant="primary", elem_id="generate-run")
                negative, guidance, steps, seed, randomize, num_images, height, width = self._sampling()
            with gr.Column():
                gallery = self._gallery("generate")
        inputs = [prompt, negative, guidance, steps, shared[0], seed, randomize, num_images, height, width,
                  *shared[1:], *slots]
        button.click(self.generate, inputs, [gallery, seed], api_name="generate", **ONE_AT_A_TIME)
        prompt.submit(self.generate, inputs, [gallery, seed], api_visibility="private", **ONE_AT_A_TIME)
        if examples:
            gr.Examples(examples, [prompt, *slots], label="Examples from the tiny world (fill the form)")

    def _edit_tab(self, shared):
        examples = self.examples.get("edit", [])
        with gr.Row():
            with gr.Column():
                source = gr.Image(label="Source image", type="pil", image_mode="RGB", height=160)
                instruction = gr.Textbox(label="Instruction", value="make it blue")
                button = gr.Button("Edit", variant="primary", elem_id="edit-run")
                negative, guidance, steps, seed, randomize, num_images, height, width = self._sampling()
            with gr.Column():
                gallery = self._gallery("edit")
        inputs = [source, instruction, negative, guidance, steps, shared[0], seed, randomize, num_images, height,
                  width, *shared[1:]]
        button.click(self.edit, inputs, [gallery, seed], api_name="edit", **ONE_AT_A_TIME)
        if examples:
            gr.Examples(examples, [source, instruction], label="Examples")

    def _control_tab(self, shared):
        with gr.Row():
            with gr.Column():
                controlnet = gr.Textbox(label="ControlNet folder", value=self.controlnet,
                                        placeholder="a local diffusers ControlNet for SD v1.5, e.g. a canny one")
                control_image = gr.Image(label="Control image (canny edges are taken)", type="pil",
                                         image_mode="RGB", height=160)
                with gr.Row():
                    low = gr.Slider(1, 255, value=100, step=1, label="Canny low threshold")
                    high = gr.Slider(1, 255, value=200, step=1, label="Canny high threshold")
                    scale = gr.Slider(0, 2, value=1.0, step=0.05, label="ControlNet scale")
                prompt, slots = self._prompt_and_slots(f"a {IMAGE_PLACEHOLDER}", "controlnet")
                button = gr.Button("Generate with ControlNet", variant="primary", elem_id="controlnet-run")
                negative, guidance, steps, seed, randomize, num_images, height, width = self._sampling()
            with gr.Column():
                gallery = self._gallery("controlnet")
        inputs = [controlnet, control_image, low, high, scale, prompt, negative, guidance, steps, shared[0], seed,
                  randomize, num_images, height, width, *shared[1:], *slots]
        button.click(self.control, inputs, [gallery, seed], api_name="controlnet", **ONE_AT_A_TIME)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False,
           block: bool = True, allowed_paths: Optional[list] = None):
    """Serve the page; returns (app, local url, share url) when `block` is False."""
    return demo.queue().launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block, theme=THEME,
        footer_links=[], ssr_mode=False, mcp_server=False, pwa=False, quiet=not block,
        allowed_paths=allowed_paths)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kosmos_g.app", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default=None, help=f"a KosmosGPipeline folder (default: {DEFAULT_PIPELINE}, "
                   "written by `make demo`)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=None, help="default: 7860, or the next free port")
    p.add_argument("--share", action="store_true", help="a public gradio.live link (needs the internet; off)")
    p.add_argument("--lora-dir", default=None, help="folder of LoRA .safetensors files (diffusers/kohya formats)")
    p.add_argument("--controlnet", default=None, help="local ControlNet folder pre-filled in the ControlNet tab")
    p.add_argument("--examples", default=None, help=f"folder with {EXAMPLES_FILE} (default: the demo run folder)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights' dtype (auto: float16 on GPU, float32 on CPU; bfloat16 on recent GPUs)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="enable_model_cpu_offload: each model on the GPU only while it runs (needs a GPU)")
    p.add_argument("--attention-slicing", action="store_true", help="attention in slices: less memory, slower")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> KosmosGApp:
    path = Path(args.pipeline) if args.pipeline else DEFAULT_PIPELINE
    if args.pipeline is None and not (path / "model_index.json").is_file():
        raise UsageError(f"no pipeline at {path}: run `make demo` first (it exports the tiny-world pipeline there), "
                         "or pass --pipeline <export folder>")
    cuda = torch.cuda.is_available()
    if args.cpu_offload and not cuda:
        raise UsageError("--cpu-offload needs a CUDA GPU; drop it on CPU")
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(str(path), torch.device("cpu") if args.cpu_offload else device, dtype)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    if args.attention_slicing:
        pipe.enable_attention_slicing()
    pipe.set_progress_bar_config(disable=True)
    examples_dir = Path(args.examples) if args.examples else path.parent.parent
    return KosmosGApp(pipe, lora_dir=args.lora_dir, controlnet=args.controlnet, examples=load_examples(examples_dir))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        app = build(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(app.blocks(), args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
