"""metrics.py: SSIM, MS-SSIM and PSNR against hand-computed values and pytorch-msssim."""

import math

import pytest
import pytorch_msssim
import torch

from flexvae.latents import DiagonalGaussian
from flexvae.metrics import (
    ms_ssim_over_scales,
    ms_ssim_scales,
    pick_ssim_kind,
    psnr,
    ssim_window,
)
from flexvae.metrics import similarity_loss_value as ssim_value
from flexvae.metrics import ssim as flexvae_ssim
from flexvae.model import VAEOutput
from flexvae.objective import (
    check_loss_config,
    vae_loss,
)
from helpers.losses import batch, cfg


# ---------------------------------------------------------------- SSIM family
def test_ssim_and_ms_ssim_match_pytorch_msssim():
    from pytorch_msssim import ms_ssim, ssim

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 176, 176, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    window = ssim_window(tuple(a.shape[2:]))
    scales = ms_ssim_scales(176, window)
    assert (window, scales) == (11, 5)
    # the reduced-scale path (used below 161 px) run at all five scales is the library's MS-SSIM
    mine, ms = flexvae_ssim(a, b), ms_ssim_over_scales(a, b, scales)
    reference_ssim = ssim((a + 1) / 2, (b + 1) / 2, data_range=1.0, size_average=False)
    reference_ms = ms_ssim((a + 1) / 2, (b + 1) / 2, data_range=1.0, size_average=False)
    assert torch.allclose(mine, reference_ssim, atol=1e-5)
    assert torch.allclose(ms, reference_ms, atol=1e-5)


def test_ms_ssim_scales_shrink_with_the_image():
    assert ms_ssim_scales(32, 11) == 2
    assert ms_ssim_scales(16, 11) == 1
    assert ms_ssim_scales(161, 11) == 5


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 24, 40), (1, 2, 12, 20, 20), (2, 3, 8, 30)])
def test_our_ssim_terms_are_the_librarys_ssim(shape):
    """metrics.ssim_terms (our lines, no private import) against pytorch-msssim's public ssim."""
    import warnings

    from pytorch_msssim import ssim as library_ssim

    from flexvae.metrics import ssim_terms, ssim_window

    g = torch.Generator().manual_seed(0)
    a = torch.rand(shape, generator=g)
    b = (a + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1)
    window = ssim_window(tuple(shape[2:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns about axes shorter than the window
        reference = library_ssim(a, b, data_range=1.0, win_size=window, size_average=False)
    ours, _ = ssim_terms(a, b, window)
    torch.testing.assert_close(ours.mean(1), reference, rtol=1e-5, atol=1e-6)


def test_ssim_of_identical_images_is_one():
    x, _ = batch()
    assert ssim_value(x, x).item() == pytest.approx(1.0, abs=1e-6)
    posterior = DiagonalGaussian(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
    loss = vae_loss(x, VAEOutput(x.clone(), posterior, posterior.mean), cfg(ssim=True))
    assert loss.terms["ssim"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_ssim_data_range_is_fixed(scale):
    # A batch with small deviations must not get a smaller data range: SSIM is always taken
    # on [0, 1] with data_range=1.
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1) * scale
    b = (a + 0.3 * torch.randn(2, 3, 32, 32, generator=generator)).clamp(-1, 1) * scale
    expected = pytorch_msssim.ssim((a + 1) / 2, (b + 1) / 2, data_range=1.0, win_size=11)
    assert torch.allclose(ssim_value(a, b), expected, atol=1e-6)


def test_ssim_changes_with_the_scale_of_the_difference():
    # With a range guessed per batch, shrinking both images would leave SSIM nearly unchanged.
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 3, 32, 32, generator=generator)).clamp(-1, 1)
    assert ssim_value(a, b).item() < 0.9
    assert ssim_value(0.01 * a, 0.01 * b).item() > 0.99


def test_ssim_window_shrinks_for_small_images():
    assert ssim_window((32, 32)) == 11
    assert ssim_window((8, 16)) == 7
    assert ssim_window((9, 9)) == 9
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.rand(1, 1, 8, 8, generator=generator) * 2 - 1 for _ in range(2))
    expected = pytorch_msssim.ssim((a + 1) / 2, (b + 1) / 2, data_range=1.0, win_size=7)
    assert torch.allclose(ssim_value(a, b), expected, atol=1e-6)


def test_ms_ssim_matches_reference_on_large_images():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 176, 176, generator=generator) * 2 - 1
    b = (a + 0.2 * torch.randn(1, 1, 176, 176, generator=generator)).clamp(-1, 1)
    expected = pytorch_msssim.ms_ssim((a + 1) / 2, (b + 1) / 2, data_range=1.0, win_size=11)
    assert torch.allclose(ssim_value(a, b, "auto"), expected, atol=1e-6)
    assert torch.allclose(ssim_value(a, b, "ms-ssim"), expected, atol=1e-6)
    plain = pytorch_msssim.ssim((a + 1) / 2, (b + 1) / 2, data_range=1.0, win_size=11)
    assert torch.allclose(ssim_value(a, b, "ssim"), plain, atol=1e-6)


def test_ssim_on_3d_data():
    x, out = batch(shape=(1, 1, 8, 8, 8), latent=(1, 2, 4, 4, 4))
    check_loss_config(cfg(ssim=True), (1, 8, 8, 8))
    loss = vae_loss(x, out, cfg(ssim=True))
    assert 0 < loss.terms["ssim"].item() < 2


@pytest.mark.parametrize(
    "kind, spatial, expected",
    [("auto", (32, 32), "ssim"), ("auto", (160, 160), "ssim"), ("auto", (161, 161), "ms-ssim"),
     ("auto", (256, 100), "ssim"), ("auto", (256, 256), "ms-ssim"), ("ssim", (512, 512), "ssim"),
     ("ms-ssim", (161, 200), "ms-ssim")],
)
def test_pick_ssim_kind(kind, spatial, expected):
    assert pick_ssim_kind(kind, spatial) == expected


def test_psnr():
    target = torch.zeros(2, 3, 4, 4)
    image = torch.full_like(target, 0.1)
    image[1] = 0.2
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)])
    assert torch.allclose(psnr(image, target), expected, atol=1e-4)
    assert torch.isfinite(psnr(target, target)).all()
