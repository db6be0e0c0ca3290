"""Labels, context tokens and the mixed (Gaussian + class) latent."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flexvae.build import plan_vae
from flexvae.config import load_config
from flexvae.data.labels import input_labels, keep_fraction, read_labels
from flexvae.errors import ConfigError, DataError, StructureError
from flexvae.latents import MixedLatent
from helpers.inprocess import run_in_process
from helpers.runs import TINY

CLASSES = ("a", "b", "c")
# the tiny structures with the label embedded in the encoder and FiLM in the decoder
COND_ENCODER = '["C2d_3_8_3_1_1", "CtxCat_3", "VAERB_11_8", "Down_?_8", "GN_4_?", "SiLU", "C2d_?_4_3_1_1"]'
COND_DECODER = '["C2d_2_8_3_1_1", "CtxFiLM_?", "VAERB_8_8", "UpS_2", "C2d_?_8_3_1_1", "GN_4_8", "SiLU", "C2d_8_3_3_1_1"]'
# a mixed latent: 5 encoder channels = 2 x 1 style channel + 3 class logits; the decoder takes 1 + 3
MIXED_ENCODER = '["C2d_3_8_3_1_1", "VAERB_8_8", "Down_?_8", "GN_4_?", "SiLU", "C2d_?_5_3_1_1"]'
MIXED_COND_ENCODER = '["C2d_3_8_3_1_1", "CtxCat_3", "VAERB_11_8", "Down_?_8", "GN_4_?", "SiLU", "C2d_?_5_3_1_1"]'
MIXED_DECODER = '["C2d_4_8_3_1_1", "VAERB_8_8", "UpS_2", "C2d_?_8_3_1_1", "GN_4_8", "SiLU", "C2d_8_3_3_1_1"]'


def labelled_folder(root, per_class: int = 4, classes=CLASSES, unlabelled: int = 0):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            values = rng.integers(0, 80, (20, 20, 3)) + 80 * c
            Image.fromarray(values.astype(np.uint8)).save(root / name / f"{i}.png")
    for i in range(unlabelled):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"free{i}.png")
    return root


def cond_args(images, run, *extra):
    return ["-c", TINY, "--set", f"train.out_dir={run}", "--set", f"data.path={images}", "--set", "data.labels=folders",
            "--set", f"model.encoder={COND_ENCODER}", "--set", f"model.decoder={COND_DECODER}",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", *extra]


def mixed_args(images, run, *extra):
    return ["-c", TINY, "--set", f"train.out_dir={run}", "--set", f"data.path={images}", "--set", "data.labels=folders",
            "--set", "model.latent=mixed", "--set", "latent.classes=0", "--set", f"model.decoder={MIXED_DECODER}",
            "--set", f"model.encoder={MIXED_ENCODER}",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", *extra]


# ------------------------------------------------------------------ labels
def test_folder_labels_sort_classes_and_leave_root_images_unlabelled(tmp_path):
    rels = ["10/x.png", "2/y.png", "2/z.png", "top.png", "10/deep/w.png"]
    labels = read_labels("folders", rels, tmp_path)
    assert labels.classes == ("2", "10")  # whole numbers sort as numbers
    assert labels.indices.tolist() == [1, 0, 0, -1, 1]
    assert labels.labelled == 4


def test_folder_labels_need_sub_folders(tmp_path):
    with pytest.raises(DataError, match="no image of .* is in a sub-folder"):
        read_labels("folders", ["a.png", "b.png"], tmp_path)
    with pytest.raises(DataError, match="name 1 class; conditioning needs at least 2"):
        read_labels("folders", ["a/x.png"], tmp_path)


def test_csv_labels_header_comments_and_unlisted_images(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n# a comment\n./x.png,cat\nsub/y.png , dog\n\n")
    labels = read_labels("labels.csv", ["x.png", "sub/y.png", "z.png"], tmp_path, csv_path=csv)
    assert labels.classes == ("cat", "dog") and labels.indices.tolist() == [0, 1, -1]


@pytest.mark.parametrize("text, message", [
    ("x.png,cat\nmissing.png,dog\n", r"labels.csv:2: 'missing.png' is not an image of the data folder"),
    ("x.png,cat\nx.png,dog\n", r"labels.csv:2: x.png is labelled twice \('cat' and 'dog'\)"),
    ("x.png\n", r"labels.csv:1: expected 'relative path,label', found 'x.png'"),
    ("x.png,a,b\n", r"labels.csv:1: expected 'relative path,label'"),
])
def test_csv_label_errors_name_file_and_line(tmp_path, text, message):
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=message):
        read_labels("labels.csv", ["x.png", "y.png"], tmp_path, csv_path=csv)


def test_missing_csv_is_one_error(tmp_path):
    with pytest.raises(DataError, match="label file not found"):
        read_labels("nope.csv", ["x.png"], tmp_path, csv_path=tmp_path / "nope.csv")


def test_label_fraction_keeps_a_seeded_share_of_each_class():
    indices = torch.tensor([0] * 50 + [1] * 30 + [-1] * 5)
    kept = keep_fraction(indices, 0.1, seed=3)
    assert int((kept[:50] == 0).sum()) == 5 and int((kept[50:80] == 1).sum()) == 3
    assert (kept[80:] == -1).all() and set(kept.tolist()) <= {-1, 0, 1}
    assert torch.equal(kept, keep_fraction(indices, 0.1, seed=3))
    assert not torch.equal(kept, keep_fraction(indices, 0.1, seed=4))
    assert int((keep_fraction(torch.tensor([0, 1, 1]), 0.01, 0) >= 0).sum()) == 2  # at least one per class


def test_a_models_classes_map_other_folders_and_reject_unknown_ones(tmp_path):
    labels = read_labels("folders", ["b/1.png", "a/2.png"], tmp_path, classes=("a", "b", "c"))
    assert labels.indices.tolist() == [1, 0] and labels.classes == ("a", "b", "c")
    with pytest.raises(DataError, match=r"class 'z' is not one of the model's 3 classes \(a, b, c\)"):
        read_labels("folders", ["z/1.png", "a/2.png"], tmp_path, classes=("a", "b", "c"))


def test_input_labels_auto_uses_class_folders_only(tmp_path):
    labels, note = input_labels("auto", ["a/1.png", "c/2.png"], tmp_path, CLASSES)
    assert labels.indices.tolist() == [0, 2] and "labels (folders)" in note
    labels, note = input_labels("auto", ["a/1.png", "holiday/2.png"], tmp_path, CLASSES)
    assert labels is None and "labels: none" in note
    assert input_labels("none", ["a/1.png"], tmp_path, CLASSES)[0] is None


def test_labels_follow_images_through_the_cache(tmp_path):
    from flexvae.data import ImageFolder, collate
    from flexvae.data.cache import CachedLoader, fill_cache

    root = labelled_folder(tmp_path / "img", per_class=2, unlabelled=2)
    dataset = ImageFolder(root, channels=3, image_size=16)
    dataset.set_labels(read_labels("folders", dataset.relpaths, root))
    plain = collate([dataset[i] for i in range(len(dataset))])
    assert plain.labels.tolist() == [0, 0, 1, 1, 2, 2, -1, -1]
    dataset.enable_cache("ram")
    fill_cache(dataset, 0)
    cached = next(iter(CachedLoader(dataset, len(dataset), list(range(len(dataset))))))
    assert torch.equal(cached.labels, plain.labels) and torch.equal(cached.images, plain.images)


# ------------------------------------------------------------------ context tokens
@pytest.mark.parametrize("shape, encoder, decoder", [
    ((1, 8), ["C1d_1_4_3_1_1", "CtxCat_2", "C1d_6_4_3_1_1"], ["CtxFiLM_2", "C1d_2_1_3_1_1"]),
    ((1, 8, 8), ["C2d_1_4_3_1_1", "CtxFiLM_?", "C2d_4_4_3_1_1"], ["CtxCat_3", "C2d_5_1_3_1_1"]),
    ((1, 4, 4, 4), ["C3d_1_4_3_1_1", "CtxCat_1", "C3d_5_4_3_1_1"], ["CtxFiLM_?", "C3d_2_1_3_1_1"]),
])
def test_context_tokens_in_1d_2d_3d_change_the_output_and_train_their_embedding(shape, encoder, decoder):
    torch.manual_seed(0)
    vae = plan_vae(encoder, decoder, shape, classes=3).build()
    vae.class_names = CLASSES
    with torch.no_grad():  # FiLM starts as the identity: give its table values so labels differ
        for module in [*vae.encoder, *vae.decoder]:
            if hasattr(module, "table"):
                module.table.normal_()
    x = torch.randn(2, *shape)
    z = vae.encode(x).mode()
    first, second = vae.decode(z, torch.tensor([0, 0])), vae.decode(z, torch.tensor([1, 2]))
    assert first.shape == x.shape and not torch.allclose(first, second)
    out = vae(x, labels=torch.tensor([1, -1]))
    out.recon.square().sum().backward()
    tables = [m.table for m in [*vae.encoder, *vae.decoder] if hasattr(m, "table")]
    assert len(tables) == 2 and all(t.grad is not None and t.grad[:2].abs().sum() > 0 for t in tables)
    assert all(t.grad[0].abs().sum() == 0 for t in tables)  # class 0 was not in the batch


def test_film_starts_as_the_identity_and_soft_labels_mix_embeddings():
    from flexvae.layers.context import ContextConcat, ContextFiLM, class_weights

    film = ContextFiLM(4, classes=3)
    x = torch.randn(2, 4, 5)
    assert torch.equal(film(x, torch.tensor([0, 2])), x)
    cat = ContextConcat(2, classes=3)
    mixed = cat(x, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))[:, 4:, 0]
    assert torch.allclose(mixed[0], (cat.table[0] + cat.table[1]) / 2) and torch.allclose(mixed[1], cat.table[2])
    assert torch.equal(cat(x, None)[:, 4:], torch.zeros(2, 2, 5))  # "no label" row starts at zero
    assert class_weights(torch.tensor([1, -1]), 3).tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        class_weights(torch.tensor([3]), 3)


def test_a_context_token_without_labels_is_reported_at_its_position():
    with pytest.raises(StructureError) as info:
        plan_vae(["C2d_1_4_3_1_1", "CtxCat_2", "C2d_6_2_3_1_1"], ["C2d_1_1_3_1_1"], (1, 8, 8))
    text = str(info.value)
    assert "position 2" in text and "CtxCat_2" in text and "data.labels to 'folders'" in text


def test_a_context_token_is_shape_checked_like_any_token():
    with pytest.raises(StructureError, match=r"channel mismatch: channels=5, but the previous layer's output has 4"):
        plan_vae(["C2d_1_4_3_1_1", "CtxFiLM_5", "C2d_4_2_3_1_1"], ["C2d_1_1_3_1_1"], (1, 8, 8), classes=2)
    with pytest.raises(StructureError, match="C2d_5_2_3_1_1"):  # CtxCat adds its 2 features: 6 channels follow
        plan_vae(["C2d_1_4_3_1_1", "CtxCat_2", "C2d_5_2_3_1_1"], ["C2d_1_1_3_1_1"], (1, 8, 8), classes=2)


# ------------------------------------------------------------------ mixed latent
def _mixed(classes=3, weight=1.0, spatial=(2, 2)):
    torch.manual_seed(0)
    latent = MixedLatent(classes=classes, classify_weight=weight)
    h = torch.randn(4, 2 * 3 + classes, *spatial)
    return latent, h


def test_mixed_latent_kl_is_the_sum_of_its_parts_against_torch_distributions():
    from torch.distributions import Categorical, Normal, kl_divergence

    latent, h = _mixed()
    posterior = latent(h)
    mean, logvar, logits = h[:, :3], h[:, 3:6], h[:, 6:].flatten(2).mean(2)
    gauss = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    cat = kl_divergence(Categorical(logits=logits), Categorical(probs=torch.full((4, 3), 1 / 3)))
    torch.testing.assert_close(posterior.kl(), gauss + cat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(posterior.kl_groups().sum(1), gauss + cat, rtol=1e-5, atol=1e-5)
    assert posterior.kl_groups().shape == (4, 4)  # 3 style channels + the class variable
    parts = posterior.diagnostics()
    torch.testing.assert_close(parts["kld_style"], gauss.mean())
    torch.testing.assert_close(parts["kld_class"], cat.mean())
    assert latent.latent_shape((9, 2, 2)) == (6, 2, 2)


def test_mixed_latent_observes_labels_on_the_labelled_rows():
    latent, h = _mixed(weight=0.5)
    posterior = latent(h)
    labels = torch.tensor([2, -1, 0, -1])
    posterior.observe(labels)
    z = posterior.sample(generator=torch.Generator().manual_seed(1))
    assert z.shape == (4, 6, 2, 2)
    assert z[0, 3:, 0, 0].tolist() == [0, 0, 1] and z[2, 3:, 1, 1].tolist() == [1, 0, 0]
    class_kl = posterior.class_kl()
    assert (class_kl[[0, 2]] == 0).all() and (class_kl[[1, 3]].sum(1) > 0).all()
    logits = h[:, 6:].flatten(2).mean(2)
    expected = 0.5 * F.cross_entropy(logits[[0, 2]], torch.tensor([2, 0]), reduction="sum") / 4
    torch.testing.assert_close(posterior.aux_losses()["classify"], expected)
    assert posterior.mode()[0, 3:, 0, 0].tolist() == [0, 0, 1]
    unsupervised = MixedLatent(classes=3, classify_weight=0.0)(h)
    unsupervised.observe(labels)
    assert unsupervised.aux_losses() == {} and (unsupervised.class_kl() > 0).any(dim=1).all()
    assert math.isfinite(float(unsupervised.diagnostics()["label_purity"]))


def test_mixed_latent_noise_makes_the_sample_and_priors_take_labels():
    latent, h = _mixed()
    posterior = latent(h)
    shape = latent.latent_shape(tuple(h.shape[1:]))
    noise = torch.randn(4, *latent.noise_shape(shape))
    assert noise.shape == (4, 3 * 4 + 3)
    torch.testing.assert_close(posterior.sample(noise=noise)[:, :3], posterior.gaussian.sample(noise=noise[:, :12].view(4, 3, 2, 2)))
    z = latent.sample_prior(5, shape, generator=torch.Generator().manual_seed(0))
    assert z.shape == (5, *shape) and (z[:, 3:].sum(1) == 1).all()
    forced = latent.with_labels(z, torch.tensor([0, 1, 2, -1, 1]))
    assert forced[1, 3:, 0, 0].tolist() == [0, 1, 0] and torch.equal(forced[3], z[3]) and torch.equal(forced[:, :3], z[:, :3])


def test_mixed_latent_channel_errors():
    with pytest.raises(ValueError, match=r"needs 2 x c \+ 3 channels"):
        MixedLatent(classes=3).latent_shape((4, 2, 2))
    with pytest.raises(ValueError, match="at least 2 classes"):
        MixedLatent(classes=1)


def test_class_count_from_labels_and_mismatches(tmp_path):
    from flexvae.assemble import make_latent

    cfg = load_config(None, ["model.latent=mixed"])
    with pytest.raises(ConfigError, match="latent.classes = 0 takes the number of classes from the labels, but "
                                          "data.labels = 'none'"):
        make_latent(cfg)
    assert make_latent(cfg, CLASSES).class_count == 3
    cfg = load_config(None, ["model.latent=mixed", "latent.classes=5"])
    with pytest.raises(ConfigError, match=r"latent.classes = 5, but the labels have 3 classes \(a, b, c\)"):
        make_latent(cfg, CLASSES)


# ------------------------------------------------------------------ through train.py
def test_conditional_run_stores_classes_and_samples_by_class(tmp_path):
    import flexvae

    images = labelled_folder(tmp_path / "img", unlabelled=2)
    result = run_in_process(["-t", *cond_args(images, tmp_path / "run")])
    assert result.returncode == 0, result.stderr
    assert "labels (folders): 12 of 14 images labelled, 3 classes (a, b, c); used by context tokens" in result.stdout
    vae = flexvae.load_model(tmp_path / "run")
    assert vae.class_names == CLASSES and vae.takes_labels
    samples = vae.sample_prior(3, labels=torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 2\]"):
        vae.sample_prior(1, labels=torch.tensor([3]))
    with pytest.raises(ValueError, match="2 labels for 3 samples"):
        vae.sample_prior(3, labels=torch.tensor([0, 1]))
    grid = Image.open(sorted((tmp_path / "run" / "samples").glob("*.png"))[-1])
    assert grid.size[1] == 5 * 16 + 6 * 2  # fixed, reconstructions, one row per class (2 px gaps)


def test_a_plain_model_takes_no_labels(tmp_path):
    from flexvae.build import plan_vae

    vae = plan_vae("structures/tiny_encoder.json", "structures/tiny_decoder.json", (3, 16, 16)).build()
    with pytest.raises(ValueError, match="this model takes no labels"):
        vae.sample_prior(2, labels=torch.tensor([0, 1]))


def test_labels_need_a_folder_source_and_a_token_needs_labels(tmp_path):
    images = labelled_folder(tmp_path / "img")
    result = run_in_process(["-t", *cond_args(images, tmp_path / "run", "--set", "data.labels=none")])
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert "CtxCat embeds the class label, but this model has no labels" in result.stderr
    result = run_in_process(["-t", *cond_args(images, tmp_path / "run", "--set", "data.source=webdataset")])
    assert result.returncode != 0 and "data.labels = 'folders' reads the labels of an image folder" in result.stderr


def test_resume_refuses_a_different_class_set(tmp_path):
    images = labelled_folder(tmp_path / "img")
    assert run_in_process(["-t", *cond_args(images, tmp_path / "run", "--set", "train.max_steps=2")]).returncode == 0
    labelled_folder(images, classes=("a", "b", "c", "d"))
    result = run_in_process(["-t", *cond_args(images, tmp_path / "run")])
    assert result.returncode != 0
    assert "holds a run trained on 3 label classes" in result.stderr and "now gives 4 (a, b, c, d)" in result.stderr


def test_resumed_mixed_run_equals_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    images = labelled_folder(tmp_path / "img", unlabelled=3)
    # a constant schedule: under cosine, max_steps itself shapes the learning rate
    extra = ["--set", "data.label_fraction=0.5", "--set", "train.schedule=constant"]
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "whole", *extra)]).returncode == 0
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "split", *extra, "--set", "train.max_steps=2")]).returncode == 0
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "split", *extra)]).returncode == 0
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step_00000004.safetensors"))
    split = load_file(str(tmp_path / "split" / "checkpoints" / "step_00000004.safetensors"))
    weights = [k for k in whole if k.startswith("model.")]
    assert weights and all(torch.equal(whole[k], split[k]) for k in weights)
    header = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kld_style", "kld_class", "tau", "label_acc", "label_purity"} <= set(header)


def test_corrupt_stored_classes_are_refused(tmp_path):
    from flexvae.checkpoint import load_checkpoint, load_run, save_checkpoint
    from flexvae.errors import CheckpointError

    images = labelled_folder(tmp_path / "img")
    assert run_in_process(["-t", *cond_args(images, tmp_path / "run", "--set", "train.max_steps=2")]).returncode == 0
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.safetensors")
    for bad in (["a", "a", "b"], "abc", ["a"], ["a", "b"]):
        meta = {**ckpt.metadata, "classes": bad}
        path = save_checkpoint(tmp_path / "bad.safetensors", ckpt.model_state, meta)
        with pytest.raises(CheckpointError):
            load_run(path)


def test_encode_stores_labels_and_class_probabilities_and_decode_reads_them(tmp_path):
    images = labelled_folder(tmp_path / "img", unlabelled=1)
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "run", "--set", f"model.encoder={MIXED_COND_ENCODER}",
                                             "--set", "train.max_steps=2")]).returncode == 0
    result = run_in_process(["-e", *mixed_args(images, tmp_path / "run", "--set", f"model.encoder={MIXED_COND_ENCODER}"),
                             "--input", images, "--output", tmp_path / "lat", "--labels", "folders"])
    assert result.returncode == 0, result.stderr
    entries = {e["path"]: e for e in map(json.loads, (tmp_path / "lat" / "manifest.jsonl").read_text().splitlines())}
    assert entries["b/1.png"]["label"] == "b" and entries["free0.png"]["label"] is None
    probs = entries["a/0.png"]["class_probs"]
    assert set(probs) == set(CLASSES) and sum(probs.values()) == pytest.approx(1, abs=1e-5)

    cond = tmp_path / "cond"
    assert run_in_process(["-t", *cond_args(images, cond, "--set", "train.max_steps=2")]).returncode == 0
    assert run_in_process(["-e", *cond_args(images, cond), "--input", images, "--output", tmp_path / "lat2",
                           "--labels", "folders"]).returncode == 0
    decoded = run_in_process(["-d", *cond_args(images, cond), "--input", tmp_path / "lat2", "--output", tmp_path / "dec"])
    assert decoded.returncode == 0, decoded.stderr
    assert "12 latent file(s) labelled" in decoded.stderr
    recon = run_in_process(["-i", *cond_args(images, cond), "--input", images, "--output", tmp_path / "rec"])
    assert recon.returncode == 0 and "labels: none (not every image" in recon.stderr  # free0.png is in the root
    tiled = run_in_process(["-i", *cond_args(images, cond), "--input", images, "--output", tmp_path / "t", "--tile", "16"])
    assert tiled.returncode != 0 and "this model is conditional" in tiled.stderr


def test_class_interpolation_and_pictures(tmp_path):
    images = labelled_folder(tmp_path / "img")
    run = tmp_path / "run"
    assert run_in_process(["-t", *cond_args(images, run)]).returncode == 0
    result = run_in_process(["-inter", *cond_args(images, run), "--classes", "a,c", "--steps", "4"])
    assert result.returncode == 0, result.stderr
    grid = Image.open(run / "interpolation" / "classes_a_to_c.png")
    assert grid.size == (4 * 16 + 5 * 2, 8 * 16 + 9 * 2)
    bad = run_in_process(["-inter", *cond_args(images, run), "--classes", "a,z"])
    assert bad.returncode != 0 and "class 'z' is not one of the model's 3 classes" in bad.stderr
    plain = run_in_process(["-inter", "-c", TINY, "--ckpt", run, "--classes", "a"])
    assert plain.returncode != 0 and "--classes takes two class names A,B" in plain.stderr


def test_class_interpolation_ends_are_the_class_samples():
    from flexvae.analysis.conditional import class_interpolation

    torch.manual_seed(0)
    vae = plan_vae(["C2d_1_4_3_1_1"], ["CtxCat_2", "C2d_4_1_3_1_1"], (1, 8, 8), classes=3).build().eval()
    vae.class_names = CLASSES
    grid = class_interpolation(vae, 0, 2, steps=3, styles=2, seed=5)
    z = vae.latent.sample_prior(2, vae.latent_shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(grid[:, 0], vae.to_image(vae.decode(z, torch.tensor([0, 0]))))
    torch.testing.assert_close(grid[:, 2], vae.to_image(vae.decode(z, torch.tensor([2, 2]))))


@pytest.mark.slow
def test_two_processes_with_labels_match_one_process(tmp_path):
    """torchrun with 2 CPU processes on a partly labelled folder (a FiLM decoder and a
    supervised mixed latent): each process gets its images' labels, so the replicas stay
    identical and match one process with the same global batch."""
    from helpers.ddp import assert_two_processes_match_one

    images = labelled_folder(tmp_path / "img", unlabelled=4)
    decoder = MIXED_DECODER.replace('"C2d_4_8_3_1_1", ', '"C2d_4_8_3_1_1", "CtxFiLM_?", ')
    common = [f"data.path={images}", "data.num_workers=0", "data.labels=folders", "data.label_fraction=0.5",
              "model.latent=mixed", "latent.classes=0", f"model.encoder={MIXED_ENCODER}", f"model.decoder={decoder}",
              "train.max_steps=4", "train.save_every=4", "train.grad_accum=2", "train.lr=1e-4", "train.grad_clip=0",
              "train.log_every=1"]
    assert_two_processes_match_one(tmp_path, common, columns=("loss", "classify"))


def test_eval_scores_conditional_samples_and_the_class_latent_and_pics_plot_the_diagnostics(tmp_path):
    images = labelled_folder(tmp_path / "img", per_class=6)
    run = tmp_path / "run"
    args = mixed_args(images, run, "--set", "train.max_steps=6", "--set", "train.log_every=2")
    assert run_in_process(["-t", *args]).returncode == 0
    result = run_in_process(["-eval", *args, "--input", images, "--input2", images, "--nll-samples", "0"])
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "evaluation" / "evaluation.json").read_text())
    cond, acc = report["conditional_generation"], report["class_accuracy"]
    assert set(cond["per_class"]) == set(CLASSES) and all(0 <= v <= 1 for v in cond["per_class"].values())
    assert cond["mean"] == pytest.approx(np.mean(list(cond["per_class"].values())))
    assert acc["images"] == 18 and 0 <= acc["accuracy"] <= acc["purity"] <= 1 and acc["chance"] == pytest.approx(1 / 3)
    assert "class latent accuracy (18 images" in result.stdout
    pics = run_in_process(["-pics", *args])
    assert pics.returncode == 0, pics.stderr
    assert (run / "pictures" / "history_classes.png").is_file() and "prior samples, one row per class" in pics.stdout
    assert Image.open(run / "pictures" / "prior.png").size[1] == 3 * 16 + 4 * 2


def test_class_accuracy_agrees_with_a_direct_count(tmp_path):
    from flexvae.analysis.conditional import class_accuracy
    from flexvae.checkpoint import load_run

    images = labelled_folder(tmp_path / "img", per_class=3)
    assert run_in_process(["-t", *mixed_args(images, tmp_path / "run", "--set", "train.max_steps=2")]).returncode == 0
    ctx = load_run(tmp_path / "run")
    found = class_accuracy(ctx, images)
    x = ctx.load_images(sorted(images.rglob("*.png")))
    truth = torch.tensor([CLASSES.index(p.parent.name) for p in sorted(images.rglob("*.png"))])
    predicted = ctx.vae.latent.class_probs(ctx.vae.encode(x)).argmax(1)
    assert found["accuracy"] == pytest.approx(float((predicted == truth).float().mean()))


def test_context_tokens_work_in_hierarchical_structures():
    """Labels reach context tokens on both sides of a hierarchy's latent groups (one pass's state)."""
    torch.manual_seed(0)
    encoder = ["C2d_1_8_3_1_1", "CtxFiLM_?", "Keep_name=x8", "Down_?_8", "C2d_8_4_3_1_1"]
    decoder = ["C2d_2_8_3_1_1", "UpS_2", "CtxCat_2", "Z_3_enc=x8", "C2d_10_1_3_1_1"]
    vae = plan_vae(encoder, decoder, (1, 8, 8), classes=3).build().eval()
    vae.class_names = CLASSES
    with torch.no_grad():
        for module in [*vae.encoder, *vae.decoder]:
            if hasattr(module, "table"):
                module.table.normal_()
    x = torch.randn(2, 1, 8, 8)
    a, b = vae.reconstruct(x, torch.tensor([0, 0])), vae.reconstruct(x, torch.tensor([1, 2]))
    assert not torch.allclose(a, b) and vae.groups == ["x8"] and vae.takes_labels
    assert vae.sample_prior(3, labels=torch.tensor([0, 1, 2])).shape == (3, 1, 8, 8)
    out = vae(x, labels=torch.tensor([1, 2]))
    assert list(out.groups) == ["x8"] and out.kl().shape == (2,)


def test_check_and_mem_read_the_classes_of_a_labelled_config(tmp_path):
    images = labelled_folder(tmp_path / "img")
    check = run_in_process(["--check", *cond_args(images, tmp_path / "run")])
    assert check.returncode == 0, check.stderr
    assert "CtxCat_3" in check.stdout and "(11, 16, 16)" in check.stdout  # 8 channels + a 3-d embedding
    mixed = run_in_process(["--check", *mixed_args(images, tmp_path / "run")])
    assert mixed.returncode == 0 and "latent: mixed, shape (4, 8, 8)" in mixed.stdout  # 1 style + 3 classes


@pytest.mark.slow
def test_the_m2_preset_samples_the_class_it_is_asked_for(tmp_path):
    """configs/digits_m2.toml as shipped: its samples of class c look like c to a pixel classifier
    of the real digits (with a 10-dimensional style they did not: 0.17)."""
    import subprocess
    import sys
    from pathlib import Path

    from flexvae.analysis.conditional import conditional_score
    from flexvae.analysis.generation import fit_classifier
    from flexvae.analysis.probe import encode_labelled
    from flexvae.checkpoint import load_run
    from flexvae.train.trainer import Trainer

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "scripts" / "make_digits.py"), str(tmp_path / "digits"),
                    "--holdout", "0.25"], check=True, capture_output=True)
    config = repo / "configs" / "digits_m2.toml"
    cfg = load_config(config, [f"data.path={tmp_path / 'digits' / 'train'}", f"train.out_dir={tmp_path / 'm2'}",
                               "train.device=cpu", "train.sample_every=1500", "train.save_every=1500"])
    Trainer(cfg, config, quiet=True).train()
    run = load_run(tmp_path / "m2")
    _, pixels, labels = encode_labelled(run, tmp_path / "digits" / "train")
    classifier, accuracy = fit_classifier(pixels, labels, 0, run.data_shape)
    score = conditional_score(run, tmp_path / "digits" / "train", n=100, seed=0, classifier=classifier)
    assert accuracy > 0.9
    assert score["mean"] > 0.8, score


def test_a_conditional_model_fits_one_prior_per_class_and_samples_the_classes_asked_for(tmp_path):
    import flexvae

    images = labelled_folder(tmp_path / "images", per_class=4)
    run = tmp_path / "run"
    assert run_in_process(["-t", *cond_args(images, run, "--set", "train.max_steps=2")]).returncode == 0
    fitted = run_in_process(["--fit-prior", *cond_args(images, run, "--ckpt", run, "--components", "1")])
    assert fitted.returncode == 0, fitted.stderr
    assert f"one per class ({len(CLASSES)})" in fitted.stdout
    loaded = flexvae.load_run(run)
    prior = loaded.vae.fitted_prior
    assert prior.per_class and sorted(prior.mixtures) == list(range(len(CLASSES)))
    # a one-component mixture per class is that class's encoded mean and spread: a draw with a tiny
    # temperature is the mean of its class
    z = prior.sample(3, generator=torch.Generator().manual_seed(0), labels=torch.tensor([0, 1, 2]),
                     temperature=1e-6)
    for c in range(3):
        torch.testing.assert_close(z[c].flatten(), prior.mixtures[c]["means"][0].float(), rtol=0, atol=1e-5)
    out = tmp_path / "samples"
    proc = run_in_process(["-sample", *cond_args(images, run, "--ckpt", run, "--count", "4", "--output", out,
                                                 "--classes", f"{CLASSES[1]},{CLASSES[2]}")])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "made_by.json").read_text())["classes"] == f"{CLASSES[1]},{CLASSES[2]}"
    inter = run_in_process(["-inter", *cond_args(images, run, "--ckpt", run, "--classes",
                                                 f"{CLASSES[0]},{CLASSES[1]}", "--steps", "3")])
    assert inter.returncode == 0, inter.stderr


@pytest.mark.slow
def test_a_conditional_model_fits_one_flow_per_class(tmp_path):
    import flexvae
    from flexvae.priors.flow import FlowNetwork

    images = labelled_folder(tmp_path / "images", per_class=4)
    run = tmp_path / "run"
    assert run_in_process(["-t", *cond_args(images, run, "--set", "train.max_steps=2")]).returncode == 0
    fitted = run_in_process(["--fit-prior", *cond_args(images, run, "--ckpt", run, "--density", "flow")])
    assert fitted.returncode == 0, fitted.stderr
    assert "a RealNVP flow of 4 couplings" in fitted.stdout and f"one per class ({len(CLASSES)})" in fitted.stdout
    prior = flexvae.load_run(run).vae.fitted_prior
    assert prior.density == "flow" and all(isinstance(f, FlowNetwork) for f in prior.mixtures.values())
    labels = torch.tensor([0, 1, 2, 0])
    a, b = (prior.sample(4, generator=torch.Generator().manual_seed(0), labels=labels) for _ in range(2))
    assert torch.equal(a, b)
    # each class's rows are drawn from that class's flow, classes in order from one generator
    generator = torch.Generator().manual_seed(0)
    expected = {c: prior.mixtures[c].sample(n, generator) for c, n in ((0, 2), (1, 1), (2, 1))}
    torch.testing.assert_close(a.flatten(1)[[0, 3]], expected[0])
    torch.testing.assert_close(a.flatten(1)[1:2], expected[1])
    torch.testing.assert_close(a.flatten(1)[2:3], expected[2])
