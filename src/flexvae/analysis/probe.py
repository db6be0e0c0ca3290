"""Linear probe: how linearly separable are the classes in the latent space?

A labelled image folder (each image's label is its first sub-folder name: ``root/<label>/...``)
is encoded to posterior means, flattened. The same classifier, standardised features ->
multinomial logistic regression (scikit-learn, optional extra ``probe``), is fitted on

- the VAE latents (d = latent size),
- PCA of the raw pixels with the same d components (capped at what the training split
  allows: min(d, n_train - 1, n_pixels), as n points span at most n - 1 directions), fitted
  on the training split only,
- the raw pixels themselves (a reference with every dimension).

The split is stratified (``test_fraction``, seeded), or a separate labelled test folder.
Accuracies are on the test images; chance = the most frequent test class's share.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from ..data import ImageFolder, make_loader
from ..errors import DataError
from . import require


def labelled_images(ctx, root) -> tuple[ImageFolder, list[str]]:
    """The images under ``root`` with their labels (first path component under root)."""
    dataset = ImageFolder(root, channels=ctx.data_shape[0], image_size=ctx.data_shape[1],
                          resize_filter=ctx.resize_filter, pad_to_square=ctx.pad_to_square)
    labels = []
    for rel in dataset.relpaths:
        parts = rel.split("/")
        if len(parts) < 2:
            raise DataError(f"{root}: {rel} is not inside a label folder; a labelled folder holds "
                            "one sub-folder per class (root/<label>/image.png)")
        labels.append(parts[0])
    return dataset, labels


@torch.no_grad()
def encode_labelled(ctx, root, batch_size: int = 64, device="cpu"):
    """(latent means (N, d), pixels (N, C*H*W), labels (N,)) as numpy arrays."""
    dataset, labels = labelled_images(ctx, root)
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=0, device_type=torch.device(device).type)
    latents, pixels, kept = [], [], []
    for batch in loader:
        if batch.images is None:
            continue
        x = batch.images.to(device)
        latents.append(ctx.vae.encode(x).mode().flatten(1).double().cpu())
        pixels.append(x.flatten(1).double().cpu())
        kept += batch.indices
    if not latents:
        raise DataError(f"no readable image in {root}")
    return torch.cat(latents).numpy(), torch.cat(pixels).numpy(), np.array([labels[i] for i in kept])


def _classifier(seed: int):
    require("sklearn", "the latent probe")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))


def _fit_score(train_x, train_y, test_x, test_y, seed) -> float:
    model = _classifier(seed)
    model.fit(train_x, train_y)
    return float(model.score(test_x, test_y))


def probe_arrays(latents, pixels, labels, *, test=None, test_fraction: float = 0.25, seed: int = 0) -> dict:
    """Accuracies of the same linear classifier on latents, PCA(pixels, same d) and pixels.

    ``test`` = (latents, pixels, labels) of a separate test set; otherwise a stratified split.
    """
    require("sklearn", "the latent probe")
    from sklearn.decomposition import PCA
    from sklearn.model_selection import train_test_split

    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise DataError(f"the probe needs at least two classes (label folders); found {classes}")
    if test is None:
        index = np.arange(len(labels))
        try:
            train_i, test_i = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)
        except ValueError as exc:
            raise DataError(f"cannot make a stratified split of {len(labels)} images: {exc}") from None
        tr = (latents[train_i], pixels[train_i], labels[train_i])
        te = (latents[test_i], pixels[test_i], labels[test_i])
    else:
        tr, te = (latents, pixels, labels), test
    d = tr[0].shape[1]
    components = max(1, min(d, tr[1].shape[0] - 1, tr[1].shape[1]))
    pca = PCA(n_components=components, random_state=seed).fit(tr[1])
    result = {
        "classes": classes,
        "train_images": int(len(tr[2])),
        "test_images": int(len(te[2])),
        "latent_dims": int(d),
        "pca_dims": int(components),
        "pixel_dims": int(tr[1].shape[1]),
        "chance": float(max(Counter(te[2].tolist()).values()) / len(te[2])),
        "vae_accuracy": _fit_score(tr[0], tr[2], te[0], te[2], seed),
        "pca_accuracy": _fit_score(pca.transform(tr[1]), tr[2], pca.transform(te[1]), te[2], seed),
        "pca_explained_variance": float(pca.explained_variance_ratio_.sum()),
        "pixels_accuracy": _fit_score(tr[1], tr[2], te[1], te[2], seed),
        "split": "separate test folder" if test is not None else f"stratified, test fraction {test_fraction}, seed {seed}",
    }
    return result


def run_probe(ctx, root, test_root=None, test_fraction: float = 0.25, seed: int = 0, device="cpu") -> dict:
    require("sklearn", "the latent probe")
    latents, pixels, labels = encode_labelled(ctx, root, device=device)
    test = encode_labelled(ctx, test_root, device=device) if test_root else None
    result = probe_arrays(latents, pixels, labels, test=test, test_fraction=test_fraction, seed=seed)
    result["data"] = str(root) + (f" (test: {test_root})" if test_root else "")
    return result


def format_probe(result: dict) -> str:
    from .common import markdown_table

    rows = [
        ("VAE latent means", result["latent_dims"], result["vae_accuracy"]),
        (f"PCA of pixels ({result['pca_explained_variance']:.1%} of variance)", result["pca_dims"],
         result["pca_accuracy"]),
        ("raw pixels", result["pixel_dims"], result["pixels_accuracy"]),
        ("chance (largest class)", None, result["chance"]),
    ]
    head = (f"{len(result['classes'])} classes, {result['train_images']} train / {result['test_images']} test images "
            f"({result['split']}); standardised features + logistic regression")
    return head + "\n\n" + markdown_table(["features", "dims", "test accuracy"], rows)
