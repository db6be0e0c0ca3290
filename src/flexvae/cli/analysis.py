"""Handlers of the analysis modes (-eval, -inter, -pics, -probe, -matrix). Models come from
the checkpoint alone (``--ckpt`` or ``train.out_dir``): its stored config supplies the
preprocessing and the default data."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..files import write_text
from . import common

# What -pics and -analyze may write into their folder (checked for foreign files before any work)
PICTURES = ("traversal.png", "traversal.txt", "prior.png", "partial_posterior.png", "kl_channels.csv",
            "history_losses.png", "history_schedule.png", "history_kl_channels.png", "history_classes.png")
ANALYSIS = ("latent_steps.png", "receptive_fields.png", "most_exciting.png", "divergence.png", "decodability.png",
            "analysis.json")


def _context(args):
    cfg, _ = common.load_config(args)
    return cfg, common.device(args, cfg), common.run_dir(args, cfg)


def evaluate(args) -> int:
    """Under torchrun every process evaluates its share of the batches (analysis/split.py); rank 0
    gathers the sums, runs the sample checks and writes the report."""
    from ..train.distributed import cleanup, from_environment

    dist = from_environment()
    try:
        return _evaluate(args, dist)
    finally:
        cleanup(dist)


def _evaluate(args, dist) -> int:
    import torch

    from ..train.distributed import setup

    cfg, device, run_dir = _context(args)
    device = str(setup(dist, torch.device(device)))
    nll_samples = common.count_option(args, "nll_samples", 0, None, "the NLL (0 = skip it)")
    from ..analysis.common import image_dataset, image_loader, write_json
    from ..analysis.evaluate import evaluate_model, format_report

    model = common.load_run(args, cfg, device)
    from ..analysis.sample_checks import checks_apply, sample_checks

    inception = None
    if args.fid and dist.is_main:  # refused, or its weights loaded, before any work
        if not checks_apply(model.vae):
            raise DataError(f"--fid scores prior samples of a continuous unconditional latent; this model's latent is "
                            f"{model.vae.latent.kind}{' and takes labels' if model.vae.takes_labels else ''}")
        from ..analysis.fid import Inception

        inception = Inception(args.inception, device)
    if dist.is_main:
        out = common.output_dir(args, run_dir, "evaluation", ("evaluation.json", "evaluation.md"))
    dataset = image_dataset(model, args.input, model.cfg)
    if dist.enabled:
        from ..analysis.split import SplitBatches

        loader = SplitBatches(dataset, cfg.encode.batch_size, device, cfg.data.num_workers, dist)
    else:
        loader = image_loader(dataset, cfg.encode.batch_size, device, cfg.data.num_workers)
    sigma = args.nll_sigma or "auto"
    if sigma != "auto":
        try:
            sigma = float(sigma)
        except ValueError:
            raise DataError(f"--nll-sigma must be a positive number or 'auto', got {args.nll_sigma!r}") from None
        if not sigma > 0:
            raise DataError(f"--nll-sigma must be positive, got {args.nll_sigma!r}")
    from ..objective import Objective

    objective = Objective.from_config(model.cfg, model.data_shape, setup=False)  # the run's own terms
    result = evaluate_model(model.vae, loader, nll_samples=nll_samples, nll_sigma=sigma,
                            device=device, seed=cfg.train.seed, progress=True, objective=objective,
                            step=model.step)
    data = args.input or model.cfg.data.val_path or f"{model.cfg.data.path} ({model.cfg.data.source})"
    result = {"checkpoint": str(model.path), "step": model.step, "data": str(data),
              "nll_samples": nll_samples, **result}
    if not dist.is_main:
        return 0
    if dist.enabled:
        result["processes"] = dist.world_size
    if checks_apply(model.vae):
        loader = image_loader(dataset, cfg.encode.batch_size, device, cfg.data.num_workers)
        result.update(sample_checks(model.vae, loader, device, seed=cfg.train.seed, inception=inception))
    if args.input2:  # a labelled folder: score the prior samples with a judge trained on its images
        from ..analysis.conditional import class_accuracy, conditional_score
        from ..analysis.generation import generation_score

        score = generation_score(model, args.input2, seed=cfg.train.seed, device=device, with_classifier=True)
        classifier = score.pop("fitted")
        result["generation"] = {"labelled": str(args.input2), **score}
        if model.vae.takes_labels:
            result["conditional_generation"] = {"labelled": str(args.input2), **conditional_score(
                model, args.input2, seed=cfg.train.seed, device=device, classifier=classifier)}
        if model.vae.latent.class_count is not None:
            result["class_accuracy"] = {"labelled": str(args.input2),
                                        **class_accuracy(model, args.input2, device=device)}
    report = format_report(result)
    write_json(result, out / "evaluation.json")
    write_text(out / "evaluation.md", f"Evaluation of {model.path} (step {model.step}) on {data}\n\n{report}\n")
    print(report)
    print(f"written: {out / 'evaluation.json'} and {out / 'evaluation.md'}")
    return 0


def interpolate(args) -> int:
    cfg, device, run_dir = _context(args)
    from ..analysis.interpolate import interpolate_inputs

    steps = common.count_option(args, "steps", 2, 8, "an interpolation (both ends included)")
    if args.classes:
        from ..analysis.conditional import write_class_interpolation

        if args.input or args.input2:
            raise DataError("-inter --classes A,B interpolates prior styles between two classes; leave out "
                            "--input and --input2")
        model = common.load_run(args, cfg, device)
        path = write_class_interpolation(model, args.classes, common.output_dir(args, run_dir, "interpolation"),
                                         steps=steps, seed=cfg.train.seed)
        print(f"8 styles, {steps} steps from class to class: {path}")
        return 0
    if not args.input or not args.input2:
        raise DataError("interpolation needs two inputs: --input A --input2 B (two images, or two folders "
                        "whose images pair up in sorted order), or --classes A,B for a conditional model")
    model = common.load_run(args, cfg, device)
    out = common.output_dir(args, run_dir, "interpolation",
                             ("interpolate_linear.png", "interpolate_slerp.png", "interpolate_pairs.txt"))
    summary = interpolate_inputs(model, args.input, args.input2, out, steps=steps, device=device)
    print(f"{summary['pairs']} pair(s), {summary['steps']} steps: " + ", ".join(summary["files"].values()))
    return 0


def pictures(args) -> int:
    cfg, device, run_dir = _context(args)
    steps = common.count_option(args, "steps", 2, 9, "a traversal (both ends included)")
    from ..analysis import MissingDependency
    from ..analysis.common import image_dataset, sample_images
    from ..analysis.pictures import (kl_per_channel_history, plot_history, prior_grid, traversal_grid,
                                     write_kl_history)
    from ..metrics import METRICS_FILE, read_metrics

    model = common.load_run(args, cfg, device)
    out = common.output_dir(args, run_dir, "pictures", PICTURES)
    # the training grid's seed: the same random images (not the first files of a class-sorted folder)
    images = sample_images(image_dataset(model, args.input, model.cfg, train=True), 64, model.cfg.train.seed).to(device)
    info = traversal_grid(model.vae, images[:1], images, out / "traversal.png", steps=steps)
    print(f"traversal of channels {info['channels']} (largest KL first): {out / 'traversal.png'}")
    if model.vae.takes_labels and model.vae.classes:
        from ..analysis.conditional import class_prior_grid

        print(f"prior samples, one row per class: {class_prior_grid(model.vae, out / 'prior.png', seed=cfg.train.seed)}")
    else:
        print(f"prior samples: {prior_grid(model.vae, out / 'prior.png', seed=cfg.train.seed)}")
    if model.vae.groups:
        from ..analysis.latent_groups import partial_posterior_grid

        partial_posterior_grid(model.vae, images[:8], out / "partial_posterior.png", seed=cfg.train.seed)
        print(f"partial posterior (row k: the first k of the groups top, {', '.join(model.vae.groups)} "
              f"from 8 images, the rest from the prior): {out / 'partial_posterior.png'}")
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        print(f"no {metrics}: training-history plots skipped")
        return 0
    history = kl_per_channel_history(run_dir, images, device=device)
    if history["steps"]:
        write_kl_history(history, out / "kl_channels.csv")
    try:
        from ..analysis.conditional import plot_class_history

        columns = read_metrics(metrics)
        written = plot_history(columns, out, history)
        written += [p for p in [plot_class_history(columns, out / "history_classes.png")] if p is not None]
    except MissingDependency as exc:
        raise MissingDependency(f"traversal and prior grids written; history plots not: {exc}") from None
    print("training history: " + ", ".join(str(p) for p in written))
    return 0


def probe(args) -> int:
    cfg, device, run_dir = _context(args)
    from ..analysis.common import write_json
    from ..analysis.probe import format_probe, run_probe

    if not args.input:
        raise DataError("the probe needs a labelled image folder: --input ROOT with one sub-folder per class "
                        "(and optionally --input2 TEST_ROOT laid out the same way)")
    model = common.load_run(args, cfg, device)
    out = common.output_dir(args, run_dir, "probe", ("probe.json", "probe.md"))
    result = run_probe(model, args.input, args.input2, seed=cfg.train.seed, device=device)
    text = format_probe(result)
    write_json({"checkpoint": str(model.path), "step": model.step, **result}, out / "probe.json")
    write_text(out / "probe.md", text + "\n")
    print(text)
    print(f"written: {out / 'probe.json'} and {out / 'probe.md'}")
    return 0


def analyze(args) -> int:
    cfg, device, run_dir = _context(args)
    steps = common.count_option(args, "steps", 2, 9, "the latent steps (both ends included)")
    from ..analysis import MissingDependency
    from ..analysis import units as tools
    from ..analysis.common import image_dataset, sample_images, write_json
    from ..data import save_grid

    model = common.load_run(args, cfg, device)
    vae, out = model.vae, common.output_dir(args, run_dir, "analysis", ANALYSIS)
    images = sample_images(image_dataset(model, args.input, model.cfg, train=True), 256, model.cfg.train.seed).to(device)
    result = {"checkpoint": str(model.path), "step": model.step, "images": int(images.shape[0]),
              "groups": ["top", *vae.groups], "divergence": tools.divergence_statistics(vae, images)}
    rows, result["latent_steps"] = tools.latent_steps(vae, images[:1], images, steps=steps)
    save_grid(rows, out / "latent_steps.png")
    units = tools.chosen_units(vae, images)
    result["units"] = [{"group": g, "channel": c, "position": list(p)} for g, c, p in units]
    tools.unit_grid(vae, units, images, out / "receptive_fields.png", "receptive", seed=cfg.train.seed)
    tools.unit_grid(vae, units, images[:64], out / "most_exciting.png", "exciting", seed=cfg.train.seed)
    written = ["latent_steps.png", "receptive_fields.png", "most_exciting.png"]
    if args.input2:
        result["decodability"] = _decodability(model, args.input2, device, cfg.train.seed)
    try:
        tools.plot_divergence(result["divergence"], out / "divergence.png")
        written.append("divergence.png")
        if "decodability" in result:
            tools.plot_decodability(result["decodability"], out / "decodability.png")
            written.append("decodability.png")
    except MissingDependency as exc:
        print(f"note: {exc}; the plots are left out, the figures are in analysis.json")
    write_json(result, out / "analysis.json")
    for name, stats in result["divergence"].items():
        line = f"{name}: KL {stats['mean']:.2f} +- {stats['std']:.2f} nats per image"
        if "decodability" in result:
            line += f", linear probe {result['decodability'][name]:.3f} (chance {result['decodability']['chance']:.3f})"
        print(line)
    print(f"written into {out}: analysis.json, " + ", ".join(written))
    return 0


def _decodability(model, root, device, seed) -> dict:
    import numpy as np
    import torch

    from ..analysis.probe import labelled_images
    from ..analysis.units import decodability, group_means
    from ..data import make_loader

    dataset, names = labelled_images(model, root)
    values, kept = {}, []
    for batch in make_loader(dataset, 64, shuffle=False, num_workers=0):
        if batch.images is None:
            continue
        with torch.no_grad():
            for name, v in group_means(model.vae, batch.images.to(device)).items():
                values.setdefault(name, []).append(v.flatten(1).double().cpu())
        kept += batch.indices
    if not kept:
        raise DataError(f"no readable image in {root}")
    latents = {name: torch.cat(v).numpy() for name, v in values.items()}
    return {"labelled": str(root), **decodability(model.vae, latents, np.array([names[i] for i in kept]), seed)}


def matrix(args) -> int:
    from ..analysis.matrix import run_matrix

    if not args.matrix:
        raise DataError("give the matrix file: --matrix FILE.toml")
    result = run_matrix(args.matrix, device=args.device, extra_overrides=args.set, overwrite=args.overwrite)
    print(Path(result["markdown"]).read_text())
    print(f"written: {result['markdown']} and {result['csv']}")
    return 1 if any(r["status"].startswith("failed") for r in result["rows"]) else 0
