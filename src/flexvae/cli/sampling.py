"""Handlers of the modes that draw from a run's prior: fit-prior and sample."""

from __future__ import annotations

import json

from ..errors import DataError
from . import common


def fit_prior(args) -> int:
    """Fit a Gaussian mixture (or, with --density flow, a RealNVP flow) to the encoded training images (or --input) of --ckpt's checkpoint
    and store it in <run>/priors/, where load_run and every sampling path find it."""
    from ..fitted_prior import fit_prior as fit, prior_path

    cfg, _ = common.load_config(args)
    device = common.device(args, cfg)
    model = common.load_run(args, cfg, device)
    components = common.count_option(args, "components", 1, 10, "a mixture")
    path = prior_path(model.path)
    common.claim_output(args, path.parent).check([path])
    prior = fit(model, args.input, components=components, covariance=args.covariance or "auto",
                seed=cfg.train.seed, batch_size=cfg.encode.batch_size, device=device, density=args.density or "mixture")
    prior.save(path)
    print(f"{prior.describe()}: {path}")
    return 0


def sample(args) -> int:
    """--count images from the prior into --output as PNGs (sample_00000.png, ...), seeded by
    train.seed, in batches of encode.batch_size."""
    import torch

    from ..data import save_image
    from ..files import write_text

    cfg, _ = common.load_config(args)
    device = common.device(args, cfg)
    count = common.count_option(args, "count", 1, 64, "the samples")
    temperature = 1.0 if args.temperature is None else args.temperature
    if not temperature > 0:
        raise DataError(f"--temperature must be positive, got {args.temperature}")
    model = common.load_run(args, cfg, device)
    vae, prior = model.vae, args.prior or "auto"  # --prior fitted without one: refused by common.load_run
    labels = _labels(vae, args.classes, count, device)
    names = [f"sample_{i:05d}.png" for i in range(count)]
    out = common.output_dir(args, common.run_dir(args, cfg), "prior_samples", [*names, "made_by.json"])
    used = "fitted" if vae.fitted_prior is not None and prior != "model" else "model"
    if used == "fitted":
        print(f"prior: {model.prior_note or vae.fitted_prior.describe()}")
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    batch = cfg.encode.batch_size
    with torch.no_grad():
        for start in range(0, count, batch):
            part = None if labels is None else labels[start:start + batch]
            images = vae.sample_prior(min(batch, count - start), generator=generator, labels=part,
                                      temperature=temperature, prior=prior)
            for offset, image in enumerate(images):
                save_image(image, out / names[start + offset])
    made_by = {**model.provenance(), "prior": used, "temperature": temperature, "seed": cfg.train.seed,
               "count": count, **({"classes": args.classes} if args.classes else {})}
    write_text(out / "made_by.json", json.dumps(made_by, indent=2) + "\n")
    print(f"{count} samples from the {used} prior (temperature {temperature:g}) into {out}")
    return 0


def _labels(vae, classes: str | None, count: int, device):
    """The samples' class indices: the --classes names in turn, or None (uniform, or no labels)."""
    import torch

    if not classes:
        return None
    if not vae.takes_labels or not vae.class_names:
        raise DataError("--classes draws samples of given classes, but this model takes no labels")
    names = [c.strip() for c in classes.split(",") if c.strip()]
    unknown = [c for c in names if c not in vae.class_names]
    if unknown:
        raise DataError(f"--classes: {unknown[0]!r} is not one of the model's classes "
                        f"({', '.join(vae.class_names[:20])})")
    order = [vae.class_names.index(c) for c in names]
    return torch.tensor([order[i % len(order)] for i in range(count)], device=device)

