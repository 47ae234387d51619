"""The web app (python -m kosmos_g.app) on a tiny pipeline: through gradio_client, and in a real headless Chromium."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from kosmos_g.app import MAX_IMAGES, KosmosGApp, launch, load_examples, main
from kosmos_g.testing import build_tiny_pipeline, write_random_lora
from kosmos_g.tinyworld.demo import save_app_examples

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noise_png(folder: Path, seed: int) -> str:
    path = folder / f"noise{seed}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a free local port: tiny pipeline, the demo's examples, a LoRA folder, a (zero) ControlNet."""
    tmp = tmp_path_factory.mktemp("app")
    pipe = build_tiny_pipeline(seed=0, image_size=SIZE)
    save_app_examples(tmp)
    write_random_lora(pipe.unet, tmp / "loras")
    ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16, 32)).save_pretrained(tmp / "cn")
    app = KosmosGApp(pipe, lora_dir=tmp / "loras", controlnet=str(tmp / "cn"), examples=load_examples(tmp))
    demo = app.blocks()
    _, url, _ = launch(demo, port=free_port(), block=False)
    yield app, url, tmp
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False, download_files=str(served[2] / "downloads"))


def generate(client, prompt, images, seed=5, scheduler="ddim", guidance=4.0, n=2, randomize=False, lora="None",
             lora_scale=1.0, steps=3):
    slots = [handle_file(p) for p in images] + [None] * (MAX_IMAGES - len(images))
    gallery, used = client.predict(prompt, "", guidance, steps, scheduler, seed, randomize, n, SIZE, SIZE, lora,
                                   lora_scale, *slots, api_name="/generate")
    return [np.asarray(Image.open(item["image"])) for item in gallery], [item["caption"] for item in gallery], used


def test_generate_with_two_images_seeds_scheduler_guidance(served, client):
    app, _, tmp = served
    images = [noise_png(tmp, 0), noise_png(tmp, 1)]
    out, captions, used = generate(client, "a <i> wearing <i> on the beach", images, seed=5, n=2)
    assert used == 5 and captions == ["seed 5", "seed 6"]
    assert [im.shape for im in out] == [(SIZE, SIZE, 3)] * 2 and np.std(out[0]) > 1
    assert np.abs(out[0].astype(int) - out[1]).max() > 0  # two seeds, two images

    # The gallery holds what the pipeline draws, image i from seed + i (PNG: exact to 1 level of 255).
    prompt_images = [Image.open(p).convert("RGB") for p in images]
    direct = app.pipe("a <i> wearing <i> on the beach", images=prompt_images, num_inference_steps=3,
                      guidance_scale=4.0, num_images_per_prompt=2, output_type="np", height=SIZE, width=SIZE,
                      generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    for ours, theirs in zip(out, direct):
        assert np.abs(ours.astype(int) - np.round(theirs * 255)).max() <= 1
    single, captions, _ = generate(client, "a <i> wearing <i> on the beach", images, seed=6, n=1)
    assert captions == ["seed 6"] and np.abs(single[0].astype(int) - out[1]).max() <= 1

    again, _, _ = generate(client, "a <i> wearing <i> on the beach", images, seed=5, n=2)
    np.testing.assert_array_equal(again[0], out[0])
    for change in ({"seed": 7}, {"scheduler": "euler"}, {"guidance": 9.0}):
        other, _, _ = generate(client, "a <i> wearing <i> on the beach", images, **{"seed": 5, "n": 1, **change})
        assert np.abs(other[0].astype(int) - out[0]).max() > 2, change


def test_randomised_seed_is_returned_and_captioned(served, client):
    out, captions, used = generate(client, "a <i>", [noise_png(served[2], 0)], seed=0, n=1, randomize=True)
    assert captions == [f"seed {used}"] and len(out) == 1


def test_placeholder_image_mismatch_returns_the_apps_message(served, client):
    with pytest.raises(AppError, match=r"The prompt has 2 image placeholder\(s\) but 1 image\(s\) are uploaded"):
        generate(client, "a <i> wearing <i>", [noise_png(served[2], 0)])
    with pytest.raises(AppError, match=r"The prompt has 0 image placeholder\(s\) but 1 image"):
        generate(client, "a red dog", [noise_png(served[2], 0)])


def test_lora_dropdown_applies_the_chosen_file_with_its_scale(served, client):
    image = [noise_png(served[2], 0)]
    plain, _, _ = generate(client, "a <i>", image, n=1)
    lora, _, _ = generate(client, "a <i>", image, n=1, lora="pytorch_lora_weights.safetensors", lora_scale=1.0)
    off, _, _ = generate(client, "a <i>", image, n=1, lora="pytorch_lora_weights.safetensors", lora_scale=0.0)
    back, _, _ = generate(client, "a <i>", image, n=1, lora="None")
    assert np.abs(lora[0].astype(int) - plain[0]).max() > 2
    np.testing.assert_array_equal(off[0], plain[0])
    np.testing.assert_array_equal(back[0], plain[0])  # unloaded: the original U-Net


def test_edit_and_controlnet_tabs(served, client):
    app, _, tmp = served
    source = noise_png(tmp, 2)
    gallery, used = client.predict(handle_file(source), "make it blue", "", 4.0, 3, "ddim", 3, False, 1, SIZE, SIZE,
                                   "None", 1.0, api_name="/edit")
    assert used == 3 and gallery[0]["caption"] == "seed 3"
    assert Image.open(gallery[0]["image"]).size == (SIZE, SIZE)

    # A zero ControlNet (as from_unet builds it) leaves the image of the Generate tab unchanged.
    plain, _, _ = generate(client, "a <i>", [noise_png(tmp, 0)], seed=4, n=1)
    gallery, used = client.predict(app.controlnet, handle_file(source), 100, 200, 1.0, "a <i>", "", 4.0, 3, "ddim",
                                   4, False, 1, SIZE, SIZE, "None", 1.0, handle_file(noise_png(tmp, 0)), None, None,
                                   None, api_name="/controlnet")
    assert [g["caption"] for g in gallery] == ["canny edges", "seed 4"]
    assert np.abs(np.asarray(Image.open(gallery[1]["image"])).astype(int) - plain[0]).max() <= 1
    with pytest.raises(AppError, match="No ControlNet folder"):
        client.predict(str(tmp / "missing"), handle_file(source), 100, 200, 1.0, "a red dog", "", 4.0, 3, "ddim", 4,
                       False, 1, SIZE, SIZE, "None", 1.0, None, None, None, None, api_name="/controlnet")


def test_without_a_pipeline_the_command_says_to_run_make_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "run `make demo` first" in err and "--pipeline" in err
    assert main(["--pipeline", "elsewhere"]) == 2
    assert "pipeline folder elsewhere not found" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--pipeline", "elsewhere", "--cpu-offload"]) == 2
        assert "--cpu-offload needs a CUDA GPU" in capsys.readouterr().err


def readme_app_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Try it in the browser"):]
    section = section[:section.index("\n## ", 3)]
    commands = [line.split("#")[0].strip() for line in section.splitlines() if line.startswith("python -m kosmos_g.app")]
    assert len(commands) == 2, commands
    return commands


def start(command: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_SERVER_PORT": str(free_port())}
    args = [sys.executable if a == "python" else a for a in shlex.split(command)]
    return subprocess.Popen(args, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def served_url(proc: subprocess.Popen) -> str:
    lines, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        lines.append(proc.stdout.readline())
        if "http://127.0.0.1:" in lines[-1]:
            return lines[-1][lines[-1].index("http://"):].split()[0]
    raise AssertionError(f"{proc.args} did not serve the page:\n{''.join(lines)}")


@pytest.mark.slow
def test_readme_commands_serve_the_demo_export(tmp_path):
    """The README's `python -m kosmos_g.app ...` lines, as written, from a folder laid out as after `make demo`."""
    pipe = build_tiny_pipeline(seed=0, image_size=SIZE)
    pipe.save_pretrained(tmp_path / "runs/demo/instruct/export")
    save_app_examples(tmp_path / "runs/demo")
    write_random_lora(pipe.unet, tmp_path / "loras")
    ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16, 32)).save_pretrained(
        tmp_path / "controlnets/canny")
    plain, full = readme_app_commands()
    procs = []
    try:
        for command in (plain, full):  # both start at once
            procs.append(start(command, tmp_path))
        for proc, lora in zip(procs, ["None", "pytorch_lora_weights.safetensors"]):
            client = Client(served_url(proc), verbose=False, download_files=str(tmp_path / "dl"))
            gallery, _ = client.predict("a <i>", "", 4.0, 2, "dpm++", 0, False, 1, SIZE, SIZE, lora, 1.0,
                                        handle_file(noise_png(tmp_path, 0)), None, None, None, api_name="/generate")
            assert Image.open(gallery[0]["image"]).size == (SIZE, SIZE)
        gallery, _ = client.predict("controlnets/canny", handle_file(noise_png(tmp_path, 1)), 100, 200, 1.0, "a <i>",
                                    "", 4.0, 2, "dpm++", 0, False, 1, SIZE, SIZE, "None", 1.0,
                                    handle_file(noise_png(tmp_path, 0)), None, None, None, api_name="/controlnet")
        assert [g["caption"] for g in gallery] == ["canny edges", "seed 0"]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


# -- a real browser ---------------------------------------------------------------------------------------------

def chromium() -> str:
    """Path of a Chromium for Playwright; skips (fails under CI=true) when there is none."""
    for candidate in (os.environ.get("KOSMOS_G_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    message = ("no Chromium for the browser test: `make browser` installs Debian's (apt-get install chromium), "
               "or set KOSMOS_G_CHROMIUM=/path/to/chrome")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def image_stats(page, selector: str) -> tuple[tuple[int, int], float]:
    """(size, pixel std) of the image an <img> shows, fetched from the app as the browser did."""
    src = page.locator(selector).first.get_attribute("src")
    body = page.request.get(src).body()
    im = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    return (im.shape[1], im.shape[0]), float(im.std())


def test_browser_upload_generate_and_mismatch_error(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _, url, tmp = served
    host = url.split("//")[1].split("/")[0]
    external = []

    def only_local(route):  # the page must work offline: nothing but the app itself is fetched
        if route.request.url.split("//")[-1].startswith(host) or route.request.url.startswith(("data:", "blob:")):
            return route.continue_()
        external.append(route.request.url)
        return route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", only_local)
            page.goto(url)
            prompt = page.locator("#generate-prompt textarea")
            prompt.fill("a <i> at the top left on a striped background")
            page.locator("#generate-image-0 input[type=file]").set_input_files(noise_png(tmp, 3))
            expect(page.locator("#generate-image-0 img")).to_be_visible(timeout=30_000)  # upload done
            page.locator("#generate-run").click()
            thumbnail = page.locator("#generate-gallery img")
            expect(thumbnail.first).to_be_visible(timeout=60_000)
            size, std = image_stats(page, "#generate-gallery img")
            assert size == (SIZE, SIZE) and std > 5  # an image, not a blank one
            expect(page.locator("#generate-gallery")).to_contain_text("seed 0")
            page.screenshot(path=tmp_path / "app.png")
            assert (tmp_path / "app.png").stat().st_size > 10_000

            # A second <i> opens a second, empty slot: generating shows the app's message, not a traceback.
            prompt.fill("a <i> next to a <i>")
            expect(page.locator("#generate-image-1")).to_be_visible(timeout=10_000)
            page.locator("#generate-run").click()
            toast = page.get_by_test_id("toast-text")
            expect(toast.first).to_have_text(
                "The prompt has 2 image placeholder(s) but 1 image(s) are uploaded: upload one image per "
                "placeholder, in order.", timeout=30_000)
            assert not page.get_by_text("Traceback").count()

            # An example from the tiny world fills the prompt and its image slot.
            app = served[0]
            page.get_by_test_id("dataset-cell-1-0").click()
            expect(prompt).to_have_value(app.examples["generate"][1][0], timeout=10_000)
            expect(page.locator("#generate-image-0 img")).to_have_attribute("src", re.compile("subject_1_0"),
                                                                           timeout=10_000)
        finally:
            browser.close()
    assert external == []
