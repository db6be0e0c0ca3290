"""The judge's scores (analysis/judge.py) and FID (analysis/fid.py): distances against float64
references, and real images scoring better than noise, a blurred copy and a constant image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flexvae.analysis.judge import (
    class_scores,
    frechet_distance,
    precision_recall,
    sample_scores,
    train_judge,
    two_sample_test,
)
from flexvae.errors import FlexVAEError


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # 8 x 8, [-1, 1]
    images = torch.nn.functional.interpolate(images, size=16, mode="bilinear", align_corners=False)
    return images.numpy(), data.target


@pytest.fixture(scope="module")
def judged():
    torch.set_num_threads(2)
    images, labels = _digits()
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1200], order[1200:1600]
    judge = train_judge(images[train], labels[train], seed=0, epochs=15)
    return judge, images[train], images[test]


# ---------------------------------------------------------------------------------- FID
def _random_inception(path):
    """A randomly initialised torch-fidelity Inception saved where the loader looks (a test double
    for the real weights, which cannot be downloaded here)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    original_load, original_url = fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url = original_load, original_url
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


# ------------------------------------------------------------- generation score
class _FixedClassifier:
    """predict_proba returns the rows it was given: the score's arithmetic alone."""

    classes_ = __import__("numpy").array(["a", "b"])

    def predict_proba(self, samples):
        return samples


def test_the_frechet_distance_is_the_scipy_formula_in_float64():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(1.0, 2.0, size=(200, 6))
    mean = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    reference = mean @ mean + np.trace(ca + cb - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_precision_and_recall_follow_their_definition():
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    # k = 1: radii are the distance to the nearest other real point: 1, 1, 1, 8
    fake = np.array([[0.5], [5.0], [30.0]])  # inside the 0-ball, inside the 10-ball (10 - 5 <= 8), outside
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3)
    # the fakes' radii: 4.5, 4.5, 25: real 0, 1, 2 lie within 4.5 of 0.5; 10 lies within 25 of 30
    assert recall == pytest.approx(1.0)


def test_class_scores_count_confident_images_and_the_histograms_entropy():
    probs = np.array([[0.95, 0.05], [0.5, 0.5], [0.08, 0.92], [0.97, 0.03]])
    score = class_scores(probs, ["a", "b"])
    assert score["confident"] == pytest.approx(0.75)
    assert score["class_entropy_bits"] == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))
    assert score["predicted_classes"] == {"a": 0.75, "b": 0.25}


def test_the_judge_classifies_held_out_digits(judged):
    judge, _, test = judged
    assert judge.accuracy > 0.9


def test_real_digits_score_better_than_noise_a_blurred_copy_and_a_constant_image(judged):
    judge, train, test = judged
    rng = np.random.default_rng(1)
    real = sample_scores(judge, test, train[:400])
    fakes = {"noise": rng.uniform(-1, 1, test.shape).astype(np.float32),
             "blurred": torch.nn.functional.avg_pool2d(torch.tensor(train[:400]), 5, 1, 2).numpy(),
             "constant": np.zeros_like(test[:400])}
    for name, images in fakes.items():
        score = sample_scores(judge, test, images)
        assert score["frechet"] > 3 * real["frechet"], name
        assert score["precision"] < real["precision"] or score["recall"] < real["recall"], name
    assert real["class_entropy_bits"] > 3.2
    assert sample_scores(judge, test, fakes["constant"])["class_entropy_bits"] == 0.0


def test_the_two_sample_test_tells_noise_apart_and_not_two_halves_of_the_same_digits(judged):
    _, train, test = judged
    rng = np.random.default_rng(2)
    shuffled = train[rng.permutation(len(train))]
    assert two_sample_test(shuffled[:300], shuffled[300:600], seed=0, epochs=10) < 0.65
    assert two_sample_test(test, rng.uniform(-1, 1, test.shape).astype(np.float32), seed=0, epochs=10) > 0.95


def test_without_the_weights_file_fid_says_where_to_put_it(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    from flexvae.analysis.fid import INCEPTION_FILE, Inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FlexVAEError) as error:
        Inception()
    message = str(error.value)
    assert INCEPTION_FILE in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--inception FILE" in message and "\n" not in message


def test_a_weights_file_that_is_a_pickle_of_code_is_refused_unread(tmp_path):
    pytest.importorskip("torch_fidelity")
    import pickle

    from flexvae.analysis.fid import Inception

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": Payload()}, protocol=2))
    with pytest.raises(FlexVAEError, match="not a weights file of tensors"):
        Inception(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_and_noise_scores_worse_than_real_images(tmp_path, monkeypatch):
    from flexvae.analysis.fid import INCEPTION_FILE, Inception, fid

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _random_inception(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE)
    net = Inception()
    assert len(net.sha256) == 64
    from sklearn.datasets import load_sample_images

    photos = torch.tensor(np.stack(load_sample_images().images), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
    crops = torch.cat([photos[:, :, y:y + 64, x:x + 64] for y in range(0, 384, 64) for x in range(0, 384, 64)])
    generator = torch.Generator().manual_seed(0)
    crops = crops[torch.randperm(len(crops), generator=generator)]
    a, b = crops[:36], crops[36:72]
    fa, fb = net.features(a), net.features(b)
    assert fa.shape == (36, 2048)
    assert fid(fa, fa) == pytest.approx(0.0, abs=1e-6)
    noise = torch.rand(36, 3, 64, 64, generator=generator) * 2 - 1
    assert fid(fa, net.features(noise)) > fid(fa, fb)
    assert net.protocol(36, (3, 64, 64))["weights_sha256"] == net.sha256


@pytest.mark.slow
def test_eval_fid_writes_both_fids_with_their_protocol(tmp_path, monkeypatch):
    import json

    from flexvae.analysis.fid import INCEPTION_FILE
    from helpers.inprocess import run_in_process
    from helpers.runs import make_images, tiny

    weights = _random_inception(tmp_path / "weights" / INCEPTION_FILE)
    images = make_images(tmp_path / "images", 8)
    run = tmp_path / "run"
    trained = run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=2", "--set", "train.save_every=2")])
    assert trained.returncode == 0, trained.stderr
    result = run_in_process(["-eval", "--ckpt", str(run), "--input", str(images), "--nll-samples", "0", "--fid",
                             "--inception", str(weights), "--output", str(tmp_path / "ev")])
    assert result.returncode == 0, result.stderr
    fid = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["fid"]
    assert fid["samples"] > 0 and fid["reconstructions"] > 0 and fid["prior"] == "model's"
    assert fid["protocol"]["images"] == 8 and fid["protocol"]["image_size"] == [3, 16, 16]
    assert fid["protocol"]["rounding"] == "8-bit" and len(fid["protocol"]["weights_sha256"]) == 64
    assert "reconstruction FID" in result.stdout
    missing = run_in_process(["-eval", "--ckpt", str(run), "--input", str(images), "--nll-samples", "0", "--fid",
                              "--inception", str(tmp_path / "nowhere.pth"), "--output", str(tmp_path / "ev2")])
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert f"FID needs the Inception-v3 weights file {INCEPTION_FILE}" in missing.stderr.strip().splitlines()[-1]


def test_images_larger_than_64_px_are_shrunk_before_the_judge_sees_them():
    from flexvae.analysis.judge import shrink

    big = torch.rand(4, 3, 200, 100)
    assert shrink(big).shape == (4, 3, 64, 32) and shrink(torch.rand(2, 1, 48, 40)).shape == (2, 1, 48, 40)
    torch.testing.assert_close(shrink(torch.full((1, 1, 128, 128), 0.3)), torch.full((1, 1, 64, 64), 0.3))
    rng = np.random.default_rng(0)
    dark, light = rng.uniform(-1, -0.5, (12, 1, 128, 128)), rng.uniform(0.5, 1, (12, 1, 128, 128))
    judge = train_judge(np.concatenate([dark, light]).astype(np.float32), ["dark"] * 12 + ["light"] * 12,
                        seed=0, epochs=5)
    assert judge.accuracy == 1.0 and judge.features(light[:3]).shape == (3, 128)
    assert list(judge.predict(light[:3].reshape(3, -1))) == ["light"] * 3  # flattened pixels of the data shape too


def test_generation_score_counts_confident_samples_and_the_class_entropy():
    import numpy as np

    from flexvae.analysis.generation import score_samples

    probs = np.array([[0.95, 0.05], [0.5, 0.5], [0.08, 0.92], [0.97, 0.03]])
    score = score_samples(_FixedClassifier(), probs)
    assert score["confident"] == pytest.approx(0.75)  # three of four above 0.9
    # predicted classes a, a, b, a: histogram (3/4, 1/4)
    assert score["class_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert score["class_entropy_bits"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert score["max_entropy"] == pytest.approx(math.log(2))
    assert score["predicted_classes"] == {"a": 0.75, "b": 0.25}
