"""The paper's FID path: torchmetrics' Inception-v3 (torch-fidelity) with weights from a local file, never downloaded."""

import pytest
import torch

from kosmos_g.eval.metrics import build_fid


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random Inception-v3 saved in the very format of torch-fidelity's weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save({}, path)
    load = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd: None  # build without any weights
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = load
    for m in net.modules():  # keep activations alive through 90+ random layers (default init lets them vanish)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_fid_from_a_local_file(inception_file):
    torch.manual_seed(0)
    a = torch.rand(6, 3, 64, 64)
    b = 1 - a ** 2
    same = build_fid(inception_path=inception_file)
    same.update(a, real=True)
    same.update(a, real=False)
    other = build_fid(inception_path=inception_file)
    other.update(a, real=True)
    other.update(b, real=False)
    assert abs(same.compute().item()) < 1e-2
    assert other.compute().item() > 1e-2


def test_missing_inception_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_path"):
        build_fid(inception_path=tmp_path / "nope.pth")
