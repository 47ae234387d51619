"""Stage 1 (mllm): which parameters train, loss only on text, and the mllm -> align handoff."""

import json

import pytest
import torch

from kosmos_g.config import load_config
from kosmos_g.run import RunPaths
from kosmos_g.testing import read_scalars
from kosmos_g.stages.common import trainable_names
from kosmos_g.stages.mllm import build
from kosmos_g.train import main


@pytest.fixture
def stage(tiny_overrides, tiny_world):
    cfg = load_config(["stage=mllm", *tiny_overrides, f"data.root={tiny_world(100)}"])
    return build(cfg, RunPaths.create(cfg.runs_dir, cfg.run_name, "mllm").assets, None)


def test_trainable_parameters_are_the_papers(stage):
    module, _ = stage
    names = set(trainable_names(module))
    depth = len(module.mllm.vision_model.model.encoder.layers)
    text = {f"mllm.text_model.{n}" for n, _ in module.mllm.text_model.named_parameters()}
    connector = {f"mllm.image_to_text_projection.{n}" for n, _ in module.mllm.image_to_text_projection.named_parameters()}
    vit_last = {f"mllm.vision_model.model.{n}" for n, _ in module.mllm.vision_model.model.named_parameters()
                if n.startswith((f"encoder.layers.{depth - 1}.", "post_layernorm."))}
    assert names == text | connector | vit_last
    assert vit_last and not any(f"layers.{depth - 2}." in n for n in names if n.startswith("mllm.vision_model."))


def test_loss_is_on_text_tokens_only(stage):
    module, data = stage
    batch = next(iter(data.train_dataloader()))
    labels = batch["labels"]
    assert (labels[batch["image_mask"]] == -100).all()  # no loss on image placeholders
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    assert (labels[:, 0] == -100).all()  # nor on <s>
    assert set(batch["kinds"]) <= {"text", "caption", "interleaved"} and batch["pixel_values"].ndim == 4
    logged = {}
    module.log_dict = lambda d, **k: logged.update(d)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and "train/ppl" in logged
    assert any(k.startswith("mllm/loss_") for k in logged)


def test_mllm_then_align_hands_off_automatically(tiny_overrides, tmp_path):
    main(["stage=mllm", *tiny_overrides])
    main(["stage=align", *tiny_overrides])  # init_from=auto picks up the mllm export
    run = tmp_path / "runs" / "t"
    assert json.loads((run / "mllm" / "export" / "manifest.json").read_text())["stage"] == "mllm"
    align_export = run / "align" / "export"
    # the align export carries the very MLLM stage 1 wrote (frozen in stage 2)
    a = (run / "mllm" / "export" / "mllm" / "model.safetensors").read_bytes()
    assert (align_export / "mllm" / "model.safetensors").read_bytes() == a
    scalars = read_scalars(run / "mllm" / "tensorboard")
    assert {"train/loss", "train/ppl", "throughput/tokens_per_sec"} <= set(scalars)


def test_packed_rows_hold_whole_documents_and_train_as_separate_documents(tiny_overrides):
    """stage.pack_length: documents go whole into rows (an image's slots are never split); attention, positions
    and the loss stay per document, so the packed batch gives the loss of the same documents one per row."""
    import torch

    from kosmos_g.config import load_config
    from kosmos_g.stages.mllm import build
    from kosmos_g.run import RunPaths
    from kosmos_g.assets import prepare_assets

    cfg = load_config([*tiny_overrides, "stage=mllm", "stage.pack_length=128", "stage.batch_size=2"])
    paths = RunPaths.create(cfg.runs_dir, cfg.run_name, "mllm")
    prepare_assets(cfg, paths, None)
    module, data = build(cfg, paths.assets, None)
    batch = next(iter(data.train_dataloader()))
    docs = batch["document_ids"]
    assert docs.shape[0] == 2 and docs.max() > 1 and batch["input_ids"].shape[1] <= 128
    for i, (row, ids) in enumerate(zip(docs, batch["input_ids"])):
        for d in range(1, int(row.max()) + 1):
            where = (row == d).nonzero().flatten()
            assert (where == torch.arange(where[0], where[-1] + 1)).all()  # contiguous
            assert ids[where[0]] == 0  # each document starts with <s>
        assert not batch["image_mask"][i][row == 0].any()  # no slot in the padding
    # the same documents, one per row
    features = module.processor
    module.mllm.eval()
    with torch.no_grad():
        packed = module.mllm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_mask"],
                             document_ids=docs).logits
        images = batch["pixel_values"]
        k = 0
        for i, row in enumerate(docs):
            for d in range(1, int(row.max()) + 1):
                ids = batch["input_ids"][i][row == d][None]
                slots = batch["image_mask"][i][row == d][None]
                n = int(slots.sum()) // features.num_image_tokens
                alone = module.mllm(ids, torch.ones_like(ids), images[k:k + n], slots).logits
                k += n
                assert (alone[0] - packed[i][row == d]).abs().max() < 1e-4
    assert k == images.shape[0]


def test_per_kind_means_count_only_their_own_entries():
    from kosmos_g.stages.base import means_by_kind

    losses = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    means = means_by_kind("x/", losses, {"a": torch.tensor([1.0, 1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 0.0, 1.0, 0.0]),
                                         "c": torch.zeros(4)})
    assert {k: v.item() for k, v in means.items()} == {"x/a": 1.5, "x/b": 3.0, "x/c": 0.0}
