"""PCA/PCAInv (fitted to the data before the first step), Center and Gain, and the PCA
autoencoder preset, against scikit-learn's PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flexvae.build import plan_vae
from flexvae.errors import StructureError, TrainingError
from flexvae.latents import DeterministicLatent
from flexvae.layers.pca import PrincipalComponents, fit_to_data
from flexvae.layers.norm_act import Center
from flexvae.layers.residual import Gain

sklearn_decomposition = pytest.importorskip("sklearn.decomposition")


def _spread(n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Samples whose variance falls off along random directions with clear gaps (a stable PCA)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(features, features, generator=generator, dtype=torch.float64))[0]
    scales = 0.8 ** torch.arange(features, dtype=torch.float64)
    return (torch.randn(n, features, generator=generator, dtype=torch.float64) * scales) @ basis.T + 0.3


def _model(encoder, decoder, shape):
    return plan_vae(encoder, decoder, shape, DeterministicLatent()).build()


def test_pca_fit_equals_scikit_learn_up_to_each_direction_sign():
    data = _spread(300, 12)
    layer = PrincipalComponents(12, 5)
    share, mean = layer.fit(data.float())
    reference = sklearn_decomposition.PCA(5).fit(data.numpy())
    weight = layer.weight.detach().double().numpy()
    signs = np.sign((weight * reference.components_).sum(1))
    np.testing.assert_allclose(weight, reference.components_ * signs[:, None], atol=1e-5)
    np.testing.assert_allclose(layer(data.float()).detach().numpy(), reference.transform(data.numpy()) * signs,
                               atol=1e-4)
    assert share == pytest.approx(reference.explained_variance_ratio_.sum(), rel=1e-6)
    np.testing.assert_allclose(mean.numpy(), reference.mean_, atol=1e-12)
    # the sign rule: each direction's largest entry is positive
    assert all(row[np.abs(row).argmax()] > 0 for row in weight)
    assert bool(layer.fitted)


def test_a_pca_autoencoder_reconstructs_as_scikit_learn_and_two_pcas_nest():
    """(``reconstruct`` clamps to the data range: so does the reference below.)"""
    images = _spread(200, 48, seed=1).float().reshape(200, 3, 4, 4)
    flat = images.reshape(200, -1).double().numpy()
    one = _model(["Flat", "PCA_48_6"], ["PCAInv_6_48", "Reshape_3_4_4"], (3, 4, 4))
    lines = fit_to_data(one, images)
    assert len(lines) == 1 and "its 6 components hold" in lines[0] and "200 inputs" in lines[0]
    reference = sklearn_decomposition.PCA(6).fit(flat)
    expected = reference.inverse_transform(reference.transform(flat)).reshape(images.shape).clip(-1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(one.reconstruct(images).numpy(), expected, atol=1e-5)
    # PCA of the 16 leading components' values keeps the 4 leading components of the data: the
    # second PCA is fitted to the first one's output, and the mirrors undo both
    two = _model(["Flat", "PCA_48_16", "PCA_16_4"], ["PCAInv_4_16", "PCAInv_16_48", "Reshape_3_4_4"], (3, 4, 4))
    assert len(fit_to_data(two, images, chunk=64)) == 2
    reference = sklearn_decomposition.PCA(4).fit(flat)
    expected = reference.inverse_transform(reference.transform(flat)).reshape(images.shape).clip(-1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(two.reconstruct(images).numpy(), expected, atol=1e-5)


def test_pca_over_tokens_counts_every_position_as_a_sample():
    sequences = _spread(40 * 5, 6, seed=2).float().reshape(40, 5, 6)  # (C=5 positions, L=6 features)
    model = _model(["PCA_6_3"], ["PCAInv_3_6"], (5, 6))
    lines = fit_to_data(model, sequences)
    assert "200 inputs" in lines[0]
    flat = sequences.reshape(-1, 6).double().numpy()
    reference = sklearn_decomposition.PCA(3).fit(flat)
    expected = reference.inverse_transform(reference.transform(flat)).reshape(sequences.shape).clip(-1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(model.reconstruct(sequences).numpy(), expected, atol=1e-5)


def test_too_few_samples_for_the_components_is_an_error_that_says_what_to_do():
    model = _model(["Flat", "PCA_48_8"], ["PCAInv_8_48", "Reshape_3_4_4"], (3, 4, 4))
    with pytest.raises(TrainingError, match=r"PCA_48_8 \(the encoder's PCA number 1\) needs at least 9 samples.*"
                                            r"5 images gave 5; use more images, or keep fewer components"):
        fit_to_data(model, torch.randn(5, 3, 4, 4))


@pytest.mark.parametrize("encoder, decoder, message", [
    (["Flat", "PCA_48_8"], ["Lin_8_48", "PCA_48_48", "Reshape_3_4_4"],
     "position 2, token 'PCA_48_48'.*belongs in the encoder; in the decoder, PCAInv"),
    (["Flat", "Lin_48_8"], ["PCAInv_8_48", "Reshape_3_4_4"],
     "position 1, token 'PCAInv_8_48'.*the decoder has 1 PCAInv token.*and the encoder 0 PCA"),
    (["Flat", "PCA_48_16", "PCA_16_8"], ["PCAInv_8_16", "Lin_16_48", "Reshape_3_4_4"],
     "the decoder has 1 PCAInv token.*and the encoder 2 PCA"),
    (["Flat", "PCA_48_16", "Lin_16_8"], ["Lin_8_16", "PCAInv_16_24", "Lin_24_48", "Reshape_3_4_4"],
     "position 2, token 'PCAInv_16_24'.*mirrors the encoder's PCA_48_16 \\(position 2\\), so it must be PCAInv_16_48"),
    (["Flat", "PCA_48_64"], ["Lin_64_48", "Reshape_3_4_4"], "PCA keeps at most as many components as it has input"),
])
def test_pca_tokens_that_cannot_mirror_are_reported_with_their_position(encoder, decoder, message):
    with pytest.raises(StructureError, match=message):
        plan_vae(encoder, decoder, (3, 4, 4), DeterministicLatent())


def test_a_pca_inside_a_residual_span_is_found_and_mirrored():
    images = _spread(100, 48, seed=3).float().reshape(100, 3, 4, 4)
    model = _model(["Flat", {"residual": ["PCA_48_8"], "shortcut": "Lin_48_8"}],
                   [{"residual": ["PCAInv_8_48"], "shortcut": "Lin_8_48"}, "Reshape_3_4_4"], (3, 4, 4))
    fit_to_data(model, images)
    pca, inverse = model.encoder[1].body[0], model.decoder[0].body[0]
    assert torch.equal(inverse.weight, pca.weight.t())


def test_center_removes_each_channels_mean_and_gain_scales_by_a_learned_number():
    x = torch.randn(2, 3, 5, 4) + torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1)
    centred = Center()(x)
    torch.testing.assert_close(centred, x - x.mean(dim=(2, 3), keepdim=True))
    assert centred.mean(dim=(2, 3)).abs().max() < 1e-6
    torch.testing.assert_close(Center()(x[:, :, 0]), x[:, :, 0] - x[:, :, 0].mean(-1, keepdim=True))
    gain = Gain(0.0)
    assert torch.equal(gain(x), torch.zeros_like(x))
    gain(x).sum().backward()
    assert gain.gain.grad == pytest.approx(x.sum().item(), rel=1e-5)  # d(g x)/dg = x
    assert torch.equal(Gain(0.5)(x), x * 0.5)


def test_the_pca_preset_fits_before_its_first_step_trains_only_its_nonlinear_span_and_resumes_bitwise(tmp_path):
    """configs/pca_ae.toml on 40 generated 32 px images: the encoder starts at scikit-learn's PCA of
    the images and their mirror images (the same squared error, the optimum), stays there (its
    stage trains only the decoder's span), the decoder's PCAInv is its transpose, and a run resumed
    half-way ends with the same weights as one that was not stopped."""
    from PIL import Image

    from flexvae.checkpoint import load_run
    from helpers.inprocess import run_in_process
    from helpers.runs import REPO

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 32)
    for index in range(40):  # smooth pictures: a colour, a slope and a blob, plus noise
        slope = rng.uniform(-80, 80, 3)[None, None] * ramp[:, None, None]
        blob = rng.uniform(0, 120) * np.exp(-((ramp[:, None] - rng.uniform()) ** 2 + (ramp[None] - rng.uniform()) ** 2) / 0.05)
        pixels = rng.uniform(60, 160, 3)[None, None] + slope + blob[..., None] + rng.normal(0, 8, (32, 32, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index:02d}.png")

    def train(run, steps):
        return run_in_process(["-t", "-c", REPO / "configs" / "pca_ae.toml", "--set", f"data.path={folder}",
                               "--set", f"train.out_dir={run}", "--set", f"train.max_steps={steps}",
                               "--set", "train.save_every=2", "--set", "data.num_workers=0",
                               "--set", "train.device=cpu", "--set", "train.log_every=1"])

    straight = train(tmp_path / "straight", 4)
    assert straight.returncode == 0, straight.stderr
    assert "fitting the PCA layers to 40 training images and their mirror images (train.init_images = 2048)" in straight.stdout
    assert "PCA_3072_64: its 64 components hold" in straight.stdout

    images = np.stack([np.asarray(Image.open(folder / f"{i:02d}.png")) for i in range(40)]).astype(np.float64) / 127.5 - 1
    images = images.transpose(0, 3, 1, 2)
    flat = np.concatenate([images, images[..., ::-1]]).reshape(80, -1)
    reference = sklearn_decomposition.PCA(64).fit(flat)
    best = ((reference.inverse_transform(reference.transform(flat)) - flat) ** 2).sum()

    vae = load_run(tmp_path / "straight").vae
    pca, inverse = vae.encoder[1], vae.decoder[0]
    weight = pca.weight.detach().double().numpy()
    projected = (flat - reference.mean_) @ weight.T @ weight + reference.mean_
    assert ((projected - flat) ** 2).sum() == pytest.approx(best, rel=1e-4)
    np.testing.assert_allclose(pca.bias.detach().numpy(), -weight @ reference.mean_, atol=1e-4)
    assert torch.equal(inverse.weight, pca.weight.t())  # frozen: both still as fitted
    assert bool(pca.fitted)
    assert vae.decoder[2].body[-1].gain.item() != 0.0  # the nonlinear span trained

    first = train(tmp_path / "resumed", 2)
    assert first.returncode == 0, first.stderr
    second = train(tmp_path / "resumed", 4)
    assert second.returncode == 0, second.stderr
    assert "fitting the PCA layers" not in second.stdout  # a resumed run keeps its checkpoint's fit
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step_00000004.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_00000004.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_with_fewer_images_than_components_stops_with_one_error_line(tmp_path):
    from PIL import Image

    from helpers.inprocess import run_in_process
    from helpers.runs import REPO

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    result = run_in_process(["-t", "-c", REPO / "configs" / "pca_ae.toml", "--set", f"data.path={folder}",
                             "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "data.num_workers=0",
                             "--set", "train.device=cpu"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: PCA_3072_64 (the encoder's PCA number 1) needs at least 65 samples to fit 64 components, "
                      f"but 6 images gave 6; {folder} has no more readable images: use more, or keep fewer components"]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_processes_fit_the_same_pca_and_train_like_one(tmp_path):
    """Under torchrun every process fits the PCA to the same images (drawn with the run's seed
    from the whole data set, not its own share) and the replicas match one process."""
    import json

    from PIL import Image

    from helpers.ddp import assert_two_processes_match_one

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(folder / f"{index}.png")
    encoder, decoder = tmp_path / "enc.json", tmp_path / "dec.json"
    encoder.write_text(json.dumps(["Flat", "PCA_768_8"]))
    decoder.write_text(json.dumps(["PCAInv_8_768", "Reshape_3_16_16",
                                   {"residual": ["Center", "C2d_3_8_3_1_1_bias=0", "ReLU", "C2d_8_3_3_1_1_bias=0",
                                                 "Gain_0"]}]))
    common = [f"data.path={folder}", "data.num_workers=0", f"model.encoder={encoder}", f"model.decoder={decoder}",
              "model.latent=deterministic", "train.max_steps=3", "train.save_every=3", "train.lr=1e-4",
              "train.grad_clip=0", "train.log_every=1"]
    assert_two_processes_match_one(tmp_path, common)
