"""The shared DataModule: every kind read back through a real featurizer, bad data skipped and counted
exactly, ranks x workers partition the data, mixture weights, re-seeded resume, clear config errors."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections import Counter, defaultdict

import pytest
import torch
from PIL import Image

from kosmos_g.config import ConfigError, DataConfig
from kosmos_g.data import convert
from kosmos_g.data.datamodule import EmptySourceError, KosmosGDataModule, vae_image_transform
from kosmos_g.data.format import Entity, Sample, SubjectImage
from kosmos_g.data.shards import BadSample, write_shards
from kosmos_g.models.tokenizers import train_mllm_tokenizer
from kosmos_g.processor import CLIP_MEAN, CLIP_STD, KosmosGProcessor, PromptError

COLORS = [(220, 30, 30), (30, 160, 40), (40, 40, 220), (240, 200, 0), (130, 0, 160), (0, 200, 200)]
SIDE = (128, 128, 128)  # the outer quarters of every target image: a centre crop removes them
CLIP_SIZE, VAE_SIZE, IMAGE_TOKENS, MAX_TOKENS = 24, 16, 3, 64
ALL_KINDS = ("text", "caption", "interleaved", "subject", "edit")


def data_cfg(root, mixture, **kw) -> DataConfig:
    return DataConfig(name="test", root=str(root), mixture={"instruct": mixture}, shuffle_buffer=8, **kw)


def read_all(dm: KosmosGDataModule, timeout: float = 30.0) -> list[dict]:
    """Every batch of one pass, read in a thread with a deadline: a hang fails instead of blocking."""
    out = {}

    def run():
        try:
            out["batches"] = list(dm.train_dataloader())
        except Exception as e:  # handed to the test thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the DataModule hung for {timeout} s"
    if "error" in out:
        raise out["error"]
    return out["batches"]


def total_skipped(batches) -> Counter:
    counts = Counter()
    for b in batches:
        counts.update(b["skipped"])
    return counts


# ---------------------------------------------------------------------------------------------
# a real featurizer (what a stage does) and a key-only one


def prompt_of(sample: Sample) -> list:
    """The sample's prompt for the processor: entity words kept, subject crops as images."""
    return [s.text if isinstance(s, Entity) else s.image if isinstance(s, SubjectImage) else s
            for s in sample.segments]


class Featurize:
    def __init__(self, processor: KosmosGProcessor):
        self.processor, self.vae = processor, vae_image_transform(VAE_SIZE)

    def __call__(self, sample: Sample, rng) -> dict:
        try:
            encoded = self.processor(prompt_of(sample))
        except PromptError as e:  # longer than the processor's context
            raise BadSample("too_long", str(e)) from None
        if len(encoded.input_ids) > MAX_TOKENS:
            raise BadSample("too_long", f"{len(encoded.input_ids)} tokens")
        return {"encoded": encoded, "text": sample.text, "kind": sample.kind, "key": sample.key,
                "target": self.vae(sample.target) if sample.target is not None else None}

    def collate(self, features: list[dict]) -> dict:
        batch = self.processor.collate([f["encoded"] for f in features])
        for name in ("text", "kind", "key", "target"):
            batch[name + "s"] = [f[name] for f in features]
        return batch


def key_features(sample: Sample, rng) -> dict:
    return {"key": sample.key, "kind": sample.kind, "text": sample.text}


def key_collate(features: list[dict]) -> dict:
    info = torch.utils.data.get_worker_info()  # collate runs in the worker that read the samples
    return {"keys": [f["key"] for f in features], "kinds": [f["kind"] for f in features],
            "texts": [f["text"] for f in features], "worker": info.id if info else 0}


# ---------------------------------------------------------------------------------------------
# shards of every kind, written by the converters from image files and jsonl made here


def save(folder, name, color, size=(20, 20)):
    Image.new("RGB", size, color).save(folder / name)
    return name


def save_target(folder, name, color):
    """A 48x24 image whose middle half is `color`: the centre square of its 24x24 downscale."""
    image = Image.new("RGB", (48, 24), SIDE)
    image.paste(color, (12, 0, 36, 24))
    image.save(folder / name)
    return name


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards of all five kinds under root/<kind>, and per sample text (`Sample.text`) what the sample
    must hold: (kind, prompt words, input image colours, target colour or None)."""
    tmp = tmp_path_factory.mktemp("world")
    src, root = tmp / "src", tmp / "shards"
    src.mkdir()
    expected, runs = {}, []
    docs = [f"document number {i} about red and blue shapes." for i in range(6)]
    expected.update({d: ("text", d, [], None) for d in docs})
    runs.append(["text", "--docs", jsonl(src / "docs.jsonl", [{"text": d} for d in docs])])

    caps = [{"image": save_target(src, f"cap{i}.png", c), "caption": f"a photo of thing {i}"} for i, c in enumerate(COLORS)]
    expected.update({r["caption"]: ("caption", r["caption"], [], COLORS[i]) for i, r in enumerate(caps)})
    runs.append(["captions", "--images", str(src), "--captions", jsonl(src / "caps.jsonl", caps)])

    rows, edits, subjects = [], [], []
    for i in range(4):
        a, b = COLORS[i], COLORS[i + 1]
        rows.append({"texts": [f"Intro {i}.", None, f"then {i}", None],
                     "images": [None, save(src, f"ia{i}.png", a), None, save(src, f"ib{i}.png", b)]})
        expected[f"Intro {i}.then {i}"] = ("interleaved", f"Intro {i}. then {i}", [a, b], None)
        edits.append({"input": save(src, f"ein{i}.png", a), "edit": f"make it number {i}",
                      "output": save_target(src, f"eout{i}.png", b)})
        expected[f"make it number {i}"] = ("edit", f"make it number {i}", [a], b)
        subjects.append({"segments": [{"text": "a "}, {"entity": f"thing {i}"},
                                      {"image": save(src, f"sub{i}.png", a), "on_white": save(src, f"subw{i}.png", SIDE)},
                                      {"text": " on a table"}], "target": save_target(src, f"st{i}.png", b)})
        expected[f"a thing {i} on a table"] = ("subject", f"a thing {i} on a table", [a], b)
    runs.append(["interleaved", "--rows", jsonl(src / "rows.jsonl", rows), "--image-root", str(src)])
    runs.append(["edits", "--edits", jsonl(src / "edits.jsonl", edits)])
    runs.append(["subjects", "--subjects", jsonl(src / "subjects.jsonl", subjects)])

    for argv in runs:
        kind = convert.SUBCOMMANDS[argv[0]][0]
        assert convert.main([*argv, "--out", str(root / kind), "--shard-size", "3", "--image-format", "png",
                             "--quiet"]) == 0
    processor = KosmosGProcessor(train_mllm_tokenizer(list(expected) * 3, vocab_size=400),
                                 num_image_tokens=IMAGE_TOKENS, image_size=CLIP_SIZE, max_length=256)
    return root, expected, processor


def clip_value(color) -> torch.Tensor:
    return (torch.tensor(color) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def test_every_kind_read_back_through_a_real_featurizer(world):
    root, expected, processor = world
    featurize = Featurize(processor)
    dm = KosmosGDataModule(data_cfg(root, dict.fromkeys(ALL_KINDS, 1.0)), "instruct", 4, featurize, featurize.collate)
    dm.epochs = 1
    batches = read_all(dm)
    seen = [t for b in batches for t in b["texts"]]
    assert sorted(seen) == sorted(expected)  # every sample exactly once
    assert total_skipped(batches) == Counter()
    pad = processor.tokenizer.pad_token_id
    for b in batches:
        n = len(b["texts"])
        assert b["input_ids"].shape[0] == b["attention_mask"].shape[0] == b["labels"].shape[0] == n
        colors = []
        for i, text in enumerate(b["texts"]):
            kind, words, images, target_color = expected[text]
            assert b["kinds"][i] == kind
            ids, mask = b["input_ids"][i], b["attention_mask"][i].bool()
            assert (ids[~mask] == pad).all()
            assert ids[0] == processor.tokenizer.bos_token_id and processor.tokenizer.eos_token_id not in ids[mask]
            # text tokens decode to the prompt; each image is IMAGE_TOKENS placeholders, never a loss target
            text_ids = ids[mask & ~b["image_mask"][i]]
            decoded = processor.tokenizer.decode(text_ids, skip_special_tokens=True)
            assert decoded.split() == words.split()
            assert b["image_mask"][i].sum() == IMAGE_TOKENS * len(images)
            assert (b["labels"][i][b["image_mask"][i]] == -100).all() and b["labels"][i][0] == -100
            text_pos = mask & ~b["image_mask"][i] & (ids != processor.image_start_id) & (ids != processor.image_end_id)
            assert (b["labels"][i][text_pos][1:] == ids[text_pos][1:]).all()
            colors += images
            target = b["targets"][i]
            if target_color is None:
                assert target is None
            else:  # VAE target: [3, S, S] in [-1, 1], the centre crop (only the middle colour left)
                assert target.shape == (3, VAE_SIZE, VAE_SIZE) and target.dtype == torch.float32
                assert target.min() >= -1 and target.max() <= 1
                want = torch.tensor(target_color) / 127.5 - 1
                assert (target[:, :, 1:-1] - want[:, None, None]).abs().max() < 0.05
                assert (target[:, :, [0, -1]] - want[:, None, None]).abs().mean() < 0.25  # no grey sides
        # CLIP input: one [3, 24, 24] normalised image per image in the batch, in prompt order
        assert b["pixel_values"].shape == (len(colors), 3, CLIP_SIZE, CLIP_SIZE)
        for pixels, color in zip(b["pixel_values"], colors):
            assert (pixels - clip_value(color)[:, None, None]).abs().max() < 0.02


def test_vae_image_transform_centre_crops_to_minus_one_one():
    image = Image.new("RGB", (30, 60), (0, 0, 0))
    image.paste((255, 255, 255), (0, 15, 30, 45))  # the middle half of a tall image is white
    out = vae_image_transform(10)(image)
    assert out.shape == (3, 10, 10) and out.dtype == torch.float32
    assert torch.allclose(out[:, 1:-1], torch.ones(3, 8, 10), atol=1e-6)
    assert out.min() >= -1 and out.max() <= 1


# ---------------------------------------------------------------------------------------------
# bad data


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def caption(key, text, image=None) -> list:
    return [(f"{key}.jpg", jpeg(COLORS[0]) if image is None else image), (f"{key}.txt", text.encode())]


def edit(key, instruction, with_input=True) -> list:
    doc = {"kind": "edit", "segments": [{"image": "img0.jpg"}, {"text": instruction}]}
    return ([(f"{key}.img0.jpg", jpeg(COLORS[1]))] if with_input else []) + [
        (f"{key}.json", json.dumps(doc).encode()), (f"{key}.target.jpg", jpeg(COLORS[2]))]


def test_adversarial_shards_skip_and_count_every_bad_sample(tmp_path, world):
    _, _, processor = world
    (tmp_path / "caption").mkdir()
    (tmp_path / "edit").mkdir()
    many_tokens = " ".join(f"w{i}q" for i in range(500))  # 2.7k chars: passes max_chars, not the token limit
    (tmp_path / "caption" / "a-000000.tar").write_bytes(tar_bytes(
        caption("g0", "good zero") + caption("notimg", "fine caption", b"<html>not an image</html>")
        + caption("g1", "good one") + caption("empty", "   ") + caption("long", "x" * 10_000)
        + caption("zero", "zero byte image", b"") + caption("g2", "good two") + caption("tokens", many_tokens)
        + caption("g3", "good three")))
    whole = tar_bytes(caption("g4", "good four") + caption("g5", "good five") + caption("cut", "cut in two")
                      + caption("lost", "after the cut"))
    # truncated inside cut.txt: g4, g5 survive, "cut" has its image only, "lost" is gone
    (tmp_path / "caption" / "a-000001.tar").write_bytes(whole[:whole.index(b"cut in two") + 3])
    # edit: one shard for two readers, also truncated (in the last target image): its bad_tar counts once
    whole = tar_bytes(edit("e0", "edit zero") + edit("missing", "its input image is not there", with_input=False)
                      + edit("e1", "edit one") + edit("ecut", "target cut off"))
    (tmp_path / "edit" / "e-000000.tar").write_bytes(whole[:whole.rindex(jpeg(COLORS[2])) + 100])

    featurize = Featurize(processor)
    # 2 readers: caption has 2 shards (whole shards each), edit 1 shard (every 2nd sample)
    cfg = data_cfg(tmp_path, {"caption": 1.0, "edit": 1.0}, num_workers=2)
    dm = KosmosGDataModule(cfg, "instruct", 2, featurize, featurize.collate)
    dm.epochs = 1
    batches = read_all(dm)
    assert sorted(t for b in batches for t in b["texts"]) == sorted(
        ["good zero", "good one", "good two", "good three", "good four", "good five", "edit zero", "edit one"])
    assert total_skipped(batches) == Counter(bad_image=2, empty_text=1, text_too_long=1, too_long=1, bad_tar=2,
                                             missing_member=3)


def test_all_bad_source_raises_instead_of_hanging(tmp_path):
    (tmp_path / "caption").mkdir()
    (tmp_path / "caption" / "bad-000000.tar").write_bytes(tar_bytes(
        caption("a", "   ") + caption("b", "broken image", b"GIF89a nonsense")))
    dm = KosmosGDataModule(data_cfg(tmp_path, {"caption": 1.0}), "instruct", 2, key_features, key_collate)
    with pytest.raises(EmptySourceError, match=r"no usable 'caption' sample in a whole pass.*all 2 were skipped"):
        read_all(dm)  # endless stream: raises after one pass


# ---------------------------------------------------------------------------------------------
# splitting, mixing, resuming, config errors


def text_shards(root, n_docs, per_shard):
    summary = write_shards((Sample("text", [f"doc {i}"], key=f"d{i}") for i in range(n_docs)), str(root / "text"),
                           "text", "text", max_samples_per_shard=per_shard, progress=False)
    assert summary.written == n_docs
    return [f"doc {i}" for i in range(n_docs)]


@pytest.mark.parametrize("n_docs,per_shard", [(40, 5), (30, 15)], ids=["8 shards: whole shards", "2 shards: every 4th"])
def test_two_ranks_two_workers_partition_the_data(tmp_path, monkeypatch, n_docs, per_shard):
    docs = text_shards(tmp_path, n_docs, per_shard)
    by_reader = defaultdict(list)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = KosmosGDataModule(data_cfg(tmp_path, {"text": 1.0}, num_workers=2), "instruct", 3, key_features,
                               key_collate, seed=7)
        dm.epochs = 1
        for b in read_all(dm):
            by_reader[rank, b["worker"]] += b["texts"]
    assert sorted(by_reader) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # all four readers got data
    assert sorted(t for texts in by_reader.values() for t in texts) == sorted(docs)  # disjoint, complete
    if per_shard == 5:  # whole shards: a reader has all or none of a shard's documents
        for texts in by_reader.values():
            shards = Counter(int(t.split()[1]) // per_shard for t in texts)
            assert set(shards.values()) == {per_shard}


def test_mixture_weights_are_honoured(world):
    root, _, _ = world
    dm = KosmosGDataModule(data_cfg(root, {"caption": 1.0, "edit": 2.0, "subject": 2.0}), "instruct", 10,
                           key_features, key_collate)
    loader = iter(dm.train_dataloader())  # endless: the small sources are cycled
    kinds = Counter(k for _ in range(50) for k in next(loader)["kinds"])
    assert sum(kinds.values()) == 500
    for kind, share in {"caption": 0.2, "edit": 0.4, "subject": 0.4}.items():
        assert abs(kinds[kind] / 500 - share) < 0.06, kinds


def test_stream_is_reseeded_from_start_step(tmp_path):
    text_shards(tmp_path, 30, 10)

    def first_texts(start_step, seed=0):
        dm = KosmosGDataModule(data_cfg(tmp_path, {"text": 1.0}), "instruct", 5, key_features, key_collate, seed)
        dm.start_step = start_step
        loader = iter(dm.train_dataloader())
        return [t for _ in range(8) for t in next(loader)["texts"]]  # 40 samples: past the first pass

    assert first_texts(100) == first_texts(100)  # a resumed run is reproducible
    assert first_texts(100) != first_texts(0)  # ...and does not replay the start of the run
    assert first_texts(0, seed=1) != first_texts(0)
    assert sorted(first_texts(100)[:30]) == sorted(f"doc {i}" for i in range(30))  # each pass is one permutation


def test_missing_shards_name_the_config_key_and_the_converter(tmp_path):
    dm = KosmosGDataModule(data_cfg(tmp_path, {"caption": 1.0}), "instruct", 2, key_features, key_collate)
    with pytest.raises(ConfigError) as e:
        dm.train_dataloader()
    msg = str(e.value)
    for part in ("'caption'", "data.root", str(tmp_path / "caption"), "python -m kosmos_g.data.convert captions",
                 "data.mixture.instruct.caption=0"):
        assert part in msg, msg

    (tmp_path / "empty").mkdir()
    cfg = data_cfg(tmp_path, {"edit": 1.0}, shards={"edit": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match=r"no \.tar shards in folder .*data\.shards\.edit.*convert edits"):
        KosmosGDataModule(cfg, "instruct", 2, key_features, key_collate).sources()


# ---------------------------------------------------------------------------------------------
# optional caches: CLIP-text targets and VAE moments in sidecar shards


def test_clip_text_and_vae_latent_caches(tmp_path, capsys):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from kosmos_g.data import cache
    from kosmos_g.models.diffusion import save_tiny_sd_folder
    from kosmos_g.models.tokenizers import train_clip_tokenizer

    captions = [f"a {c} square number {i}" for i, c in enumerate(["red", "green", "blue", "gold"])]
    captions.append(" ".join(["a very long caption"] * 5))  # more than --max-tokens 12 CLIP tokens
    images = [Image.new("RGB", (24 + 4 * i, 20), COLORS[i]) for i in range(len(captions))]
    write_shards([Sample("caption", [c], target=im, key=f"k{i}") for i, (c, im) in enumerate(zip(captions, images))],
                 str(tmp_path / "caption"), "cap", "caption", max_samples_per_shard=2, progress=False, image_format="png")
    sd = tmp_path / "sd"
    tokenizer = train_clip_tokenizer(captions * 3, vocab_size=300)
    tokenizer.save_pretrained(sd / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=37, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                  ).save_pretrained(sd / "text_encoder")
    save_tiny_sd_folder(str(sd), cross_attention_dim=32, image_size=16)

    assert cache.open_cache(tmp_path / "clip") is None  # no cache yet
    assert cache.main(["clip-text", "--shards", str(tmp_path / "caption"), "--text-encoder", str(sd), "--out",
                       str(tmp_path / "clip"), "--max-tokens", "12", "--dtype", "float32", "--batch-size", "3"]) == 0
    assert "cached 4 samples of 3 shard(s)" in capsys.readouterr().out
    clip = cache.open_cache(tmp_path / "clip")
    clip.check(type="clip-text", max_tokens=12, hidden_size=32)
    assert len(clip) == 4 and "k4" not in clip and clip.get("k4") is None and clip.meta["skipped"] == {"too_long": 1}
    encoder = CLIPTextModel.from_pretrained(sd / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    for i in range(4):
        ids = tok(captions[i]).input_ids
        with torch.no_grad():
            want = encoder(torch.tensor([ids + [tok.pad_token_id] * (12 - len(ids))])).last_hidden_state[0]
        assert torch.allclose(clip.get(f"k{i}"), want, atol=1e-5)

    assert cache.main(["vae-latents", "--shards", str(tmp_path / "caption"), "--sd", str(sd), "--size", "16",
                       "--out", str(tmp_path / "vae")]) == 0
    vae_cache = cache.open_cache(tmp_path / "vae")
    vae_cache.check(type="vae-latents", size=16)
    with pytest.raises(ValueError, match="made with {'size': 16}.*rebuild"):
        vae_cache.check(size=32)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
    for i in range(5):
        with torch.no_grad():
            want = vae.encode(vae_image_transform(16)(images[i])[None]).latent_dist.parameters[0]
        moments = vae_cache.get(f"k{i}")
        assert moments.shape == (8, 4, 4) and torch.allclose(moments, want, atol=2e-2)  # stored as float16
        latents = cache.latents_from_moments(moments, 0.18215, sample=False)
        assert torch.allclose(latents, moments[:4] * 0.18215)
        drawn = cache.latents_from_moments(moments[None], 0.18215, generator=torch.Generator().manual_seed(0))
        assert drawn.shape == (1, 4, 4, 4) and not torch.equal(drawn[0], latents)
    import pickle  # DataLoader workers get a pickled copy: open files are not carried over

    assert torch.equal(pickle.loads(pickle.dumps(vae_cache)).get("k0"), vae_cache.get("k0"))
