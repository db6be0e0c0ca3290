"""perceptual.py: LPIPS distances, their gradient, and its weights from a local file or offline."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from flexvae.errors import ConfigError
from flexvae.perceptual import backbone_state, load_perceptual

pytestmark = pytest.mark.usefixtures("in_repo")  # configs name their structures from the repository root



@pytest.fixture(scope="module")
def distance():
    torch.manual_seed(0)
    return load_perceptual("alex", "random")  # AlexNet builds faster than VGG16


def images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -------------------------------------------------------------------- LPIPS
def test_lpips_is_zero_on_equal_images_symmetric_and_batch_independent(distance):
    a, b = images(seed=0), images(seed=1)
    assert torch.all(distance(a, a) == 0)
    torch.testing.assert_close(distance(a, b), distance(b, a))
    assert torch.all(distance(a, b) > 0)
    one_by_one = torch.cat([distance(a[i:i + 1], b[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(distance(a, b), one_by_one)
    distance.train()  # stays a fixed metric
    torch.testing.assert_close(distance(a, b), one_by_one)


def test_lpips_gradient_reaches_a_decoder(distance):
    decoder = torch.nn.Conv2d(3, 3, 3, padding=1)
    target = images()
    distance(decoder(images(seed=2)), target).mean().backward()
    assert decoder.weight.grad is not None and decoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in distance.parameters())  # the metric is frozen


@pytest.mark.slow
def test_lpips_backbone_from_a_local_file(tmp_path):
    import torchvision

    features = torchvision.models.alexnet().features
    path = tmp_path / "alex_features.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loaded = load_perceptual("alex", str(path))
    first = loaded.lpips.net.slice1[0]
    torch.testing.assert_close(first.weight, features[0].weight)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="not alexnet weights: features.0.bias is missing"):
        load_perceptual("alex", str(tmp_path / "wrong.pth"))
    with pytest.raises(ConfigError, match="loss.perceptual_weights: file not found"):
        load_perceptual("alex", str(tmp_path / "none.pth"))


def test_lpips_offline_without_weights_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as info:
        backbone_state("vgg")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "loss.perceptual_weights" in message and "\n" not in message
