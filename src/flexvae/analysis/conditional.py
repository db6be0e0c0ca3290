"""Conditional models (context tokens, class latents): sampling by class, class-to-class
interpolation, the conditional generation score, the class latent's accuracy, and the
training-history plot of the class diagnostics.

- conditional generation score: the judge of the generation score (judge.py: a small CNN
  trained on a labelled folder's real images) classifies ``n`` samples drawn for each class c; the score of c is the fraction classified as c, and the mean over
  the classes is reported beside the classifier's own held-out accuracy.
- class accuracy: the most likely class of a class latent's q(y|x) against the labels of a
  labelled folder; also the purity (each predicted class scored by its most common label),
  which measures an unsupervised class part whose categories need not follow label order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import save_grid
from ..errors import DataError
from .probe import labelled_images

DIAGNOSTICS = (("kl_style", "kl_class"), ("tau",), ("label_acc", "label_purity"))
DIAGNOSTIC_TITLES = ("KL per part (nats per image)", "class temperature", "agreement with the labels")


def class_index(vae, name: str) -> int:
    names = list(vae.class_names or ())
    if name not in names:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise DataError(f"class {name!r} is not one of the model's {len(names)} classes ({shown})")
    return names.index(name)


def require_conditional(vae, what: str) -> None:
    if not vae.takes_labels or not vae.classes:
        raise DataError(f"{what} needs a conditional model (context tokens or a class latent); this one takes no labels")


@torch.no_grad()
def class_interpolation(vae, first: int, second: int, steps: int = 8, styles: int = 8, seed: int = 0) -> torch.Tensor:
    """(styles, steps, C, H, W): each row one prior style, decoded while the class weights move
    linearly from ``first`` to ``second`` (the same style latent in every column). The styles
    come from the fitted prior when the model has one (its mixture of ``first``, when fitted per
    class), else from the model's prior."""
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    fitted = vae.fitted_prior
    if fitted is not None and vae.latent.class_count is None:
        z = fitted.sample(styles, generator=generator, device=device,
                          labels=torch.full((styles,), first, device=device))
    else:
        z = vae.latent.sample_prior(styles, vae.latent_shape, generator=generator, device=device)
    columns = []
    for step in range(steps):
        t = step / (steps - 1)
        weights = torch.zeros(styles, vae.classes, device=device)
        weights[:, first], weights[:, second] = weights[:, first] + 1 - t, weights[:, second] + t
        columns.append(vae.to_image(vae.decode(vae.latent.with_labels(z, weights), weights)))
    return torch.stack(columns, dim=1)


def write_class_interpolation(ctx, classes: str, out_dir, steps: int = 8, seed: int = 0) -> Path:
    vae = ctx.vae
    require_conditional(vae, "-inter --classes")
    names = [n.strip() for n in str(classes).split(",")]
    if len(names) != 2 or not all(names):
        raise DataError(f"--classes takes two class names A,B, got {classes!r}")
    first, second = class_index(vae, names[0]), class_index(vae, names[1])
    grid = class_interpolation(vae, first, second, steps=steps, seed=seed)
    path = Path(out_dir) / f"classes_{_safe(names[0])}_to_{_safe(names[1])}.png"
    save_grid(list(grid), path)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "class"


@torch.no_grad()
def conditional_score(ctx, labelled_root, n: int = 100, seed: int = 0, device="cpu", classifier=None) -> dict:
    """Per class c of the model: the fraction of ``n`` samples drawn for c that the labelled
    folder's judge (judge.py) assigns to c (classes the folder lacks are left out)."""
    from .generation import fit_classifier
    from .probe import encode_labelled

    vae = ctx.vae
    require_conditional(vae, "the conditional generation score")
    accuracy = None
    if classifier is None:
        _, pixels, labels = encode_labelled(ctx, labelled_root, device=device)
        classifier, accuracy = fit_classifier(pixels, labels, seed, ctx.data_shape)
    known = {str(c) for c in classifier.classes_}
    per_class = {}
    generator = torch.Generator(device=device).manual_seed(seed)
    for index, name in enumerate(vae.class_names):
        if name not in known:
            continue
        labels = torch.full((n,), index, device=device)
        samples = vae.sample_prior(n, generator=generator, labels=labels).flatten(1).double().cpu().numpy()
        predicted = classifier.predict(samples)
        per_class[name] = float(np.mean([str(p) == name for p in predicted]))
    if not per_class:
        raise DataError(f"{labelled_root}: none of its classes is one of the model's ({', '.join(vae.class_names[:10])})")
    return {"classifier_accuracy": accuracy, "samples_per_class": n, "mean": float(np.mean(list(per_class.values()))),
            "worst": min(per_class.values()), "per_class": per_class}


@torch.no_grad()
def class_accuracy(ctx, labelled_root, device="cpu", batch_size: int = 64) -> dict:
    """Accuracy and purity of a class latent's most likely class on a labelled folder."""
    from ..data import make_loader

    vae = ctx.vae
    if vae.latent.class_count is None:
        raise DataError(f"the class accuracy needs a latent with a class part (model.latent = 'mixed'); "
                        f"this model's is {vae.latent.kind}")
    dataset, names = labelled_images(ctx, labelled_root)
    index = {name: i for i, name in enumerate(vae.class_names)}
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        raise DataError(f"{labelled_root}: class {unknown[0]!r} is not one of the model's classes "
                        f"({', '.join(vae.class_names[:10])})")
    predicted, truth = [], []
    for batch in make_loader(dataset, batch_size, shuffle=False, num_workers=0, device_type=torch.device(device).type):
        if batch.images is None:
            continue
        posterior = vae.encode(batch.images.to(device))
        predicted.append(vae.latent.class_probs(posterior).argmax(1).cpu())
        truth += [index[names[i]] for i in batch.indices]
    if not truth:
        raise DataError(f"no readable image in {labelled_root}")
    from ..latents.mixed import label_agreement

    found = label_agreement(torch.cat(predicted), torch.tensor(truth), vae.classes)
    return {"images": len(truth), "accuracy": float(found["label_acc"]), "purity": float(found["label_purity"]),
            "chance": float(np.bincount(truth).max() / len(truth))}


@torch.no_grad()
def class_prior_grid(vae, path, per_class: int = 8, seed: int = 0) -> Path:
    """One row of prior samples per class (the first 16), each row from the same seed."""
    from ..train.samples import prior_rows

    device = next(vae.parameters()).device
    save_grid(prior_rows(vae, per_class, seed, device), path)
    return Path(path)


def plot_class_history(columns: dict, path) -> Path | None:
    """history_classes.png: per-part KL, the class temperature and the agreement of the class
    part with the labels over training (AE-LEGO's diagnostics), from metrics.csv's columns."""
    from .pictures import _figure, _save

    panels = [(names, title) for names, title in zip(DIAGNOSTICS, DIAGNOSTIC_TITLES)
              if any(n in columns for n in names)]
    if not panels:
        return None
    fig, axes = _figure(1, len(panels))
    steps = columns["step"]
    for ax, (names, title) in zip(axes, panels):
        for n in names:
            if n in columns:
                values = columns[n]
                ax.plot(steps, values, lw=1.2, label=n, marker="o" if len(steps) < 20 else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if names[0] == "label_acc":
            ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    return _save(fig, Path(path))
