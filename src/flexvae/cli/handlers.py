"""Handlers of the modes that build, train and apply a model. Each parses nothing: it reads
the already parsed arguments and calls library functions with typed values."""

from __future__ import annotations

import sys
from pathlib import Path

from . import common
from ..errors import ConfigError


def layers(args) -> int:
    from ..assemble import load_plugins
    from ..build import LAYERS

    cfg, config_path = common.load_config(args)
    load_plugins(cfg.model.plugins, config_path)
    print(LAYERS.table())
    return 0


def terms(args) -> int:
    from ..assemble import load_plugins
    from ..objective import TERMS
    from ..objective.schedule import __doc__ as schedules

    cfg, config_path = common.load_config(args)
    load_plugins(cfg.model.plugins, config_path)  # a plugin may register terms too
    print(TERMS.table())
    print("\nEvery term also takes" + schedules.split("Every term token takes these keywords beside its own "
                                                   "arguments:", 1)[1].split('``"KL', 1)[0].rstrip())
    return 0


def priors(args) -> int:
    from ..assemble import load_plugins
    from ..priors import PRIORS

    cfg, config_path = common.load_config(args)
    load_plugins(cfg.model.plugins, config_path)  # a plugin may register priors too
    print("Normal()\n    N(0, I), the default: closed-form KL, no parameters")
    print(PRIORS.table())
    return 0


def check(args) -> int:
    from ..assemble import plan_from_config
    from ..fits import fit_warning

    cfg, config_path = common.load_config(args)
    plan = plan_from_config(cfg, config_path)
    print(plan.table())
    from ..inference.receptive import summary

    print(summary(plan))
    warning = fit_warning(plan, cfg.train.batch_size, common.device(args, cfg))
    if warning:
        print(warning, file=sys.stderr)
    return 0


def train(args) -> int:
    from ..train.trainer import train as run_training

    cfg, config_path = common.load_config(args)
    if config_path is None and cfg.data.source == "folder" and not Path(cfg.data.path).is_dir():
        raise ConfigError(f"no config found: neither {' nor '.join(common.DEFAULT_CONFIGS)} is in {Path.cwd()}, and "
                          f"the built-in defaults train on {cfg.data.path}, which is not here; start a project with "
                          "`flexvae init DIR` (then train from DIR), or name a config with -c CONFIG")
    run_training(cfg, config_path, fresh=args.fresh, device=args.device, verbose=args.verbose,
                 overwrite=args.overwrite)
    return 0


def mem(args) -> int:
    from ..config import write_batch_size
    from ..train.memory import find_max_batch

    cfg, config_path = common.load_config(args)
    result = find_max_batch(cfg, config_path, device=common.device(args, cfg))
    images = _image_count(cfg)
    if images is not None:
        result.limit_to(images, f"data.path holds {images:,} images, and a larger batch repeats images within a step")
    print(result.format())
    if args.write:
        write_batch_size(config_path, result.recommended)
        print(f"wrote train.batch_size = {result.recommended} to {config_path}")
    return 0


def _image_count(cfg) -> int | None:
    """How many image files data.path holds (a folder source), or None when that is not known."""
    from ..data import find_images
    from ..errors import DataError

    if cfg.data.source != "folder":
        return None
    try:
        return len(find_images(cfg.data.path))
    except DataError:
        return None


def reconstruct(args) -> int:
    from ..inference import reconstruct_folder

    cfg, _ = common.load_config(args)
    device = common.device(args, cfg)
    model = common.load_run(args, cfg, device)
    out = Path(args.output or common.run_dir(args, cfg) / "reconstructions")
    summary = reconstruct_folder(model, args.input or cfg.data.path, out, batch_size=cfg.encode.batch_size,
                                 num_workers=cfg.data.num_workers, side_by_side=args.side_by_side, device=device,
                                 native_size=args.native_size, tile=args.tile, overlap=args.overlap,
                                 overwrite=args.overwrite)
    skipped = f" ({summary['skipped']} unreadable skipped)" if summary["skipped"] else ""
    print(f"reconstructed {summary['images']} images{skipped} into {out}: mean PSNR {summary['psnr']:.2f} dB, "
          f"mean SSIM {summary['ssim']:.4f}; per-image values in {out / 'metrics.csv'}")
    return 0


def encode(args) -> int:
    import torch

    from ..inference import encode_folder
    from ..train.distributed import cleanup, from_environment, setup

    cfg, _ = common.load_config(args)
    dist = from_environment()  # under torchrun, every process encodes its share of the folder
    device = str(setup(dist, torch.device(common.device(args, cfg))))
    model = common.load_run(args, cfg, device)
    out = Path(args.output or common.run_dir(args, cfg) / "latents")
    try:
        summary = encode_folder(model, args.input or cfg.data.path, out, fmt=cfg.encode.format,
                                sample=args.sample or cfg.encode.sample, batch_size=cfg.encode.batch_size,
                                num_workers=cfg.data.num_workers, device=device, seed=cfg.train.seed, dist=dist,
                                tile=args.tile, overlap=args.overlap, shard_size=cfg.encode.shard_size,
                                overwrite=args.overwrite)
    finally:
        cleanup(dist)
    if dist.is_main:
        from ..inference.encode import format_summary

        print(format_summary(summary, out))
    return 0


def decode(args) -> int:
    from ..inference import decode_folder

    cfg, _ = common.load_config(args)
    device = common.device(args, cfg)
    model = common.load_run(args, cfg, device)
    run = common.run_dir(args, cfg)
    out = Path(args.output or run / "decoded")
    summary = decode_folder(model, args.input or run / "latents", out, batch_size=cfg.encode.batch_size,
                            device=device, tile=args.tile, overlap=args.overlap, overwrite=args.overwrite)
    bad = f"; {summary['non_finite_files']} held NaN or infinite values" if summary["non_finite_files"] else ""
    print(f"decoded {summary['decoded']} latents into {out} ({summary['failed']} failed{bad})")
    return 0


def import_weights(args) -> int:
    """The base config is ``-c``, else configs/sd_vae.toml when present, else the defaults;
    ``--set data.image_size=N`` overrides the source's sample size."""
    from ..config import load_config
    from ..convert_sd import DEFAULT_IMPORT_CONFIG, DEFAULT_OUTPUT
    from ..convert_sd import import_weights as run_import

    config_path = args.config
    if config_path is None and Path(DEFAULT_IMPORT_CONFIG).is_file():
        config_path = DEFAULT_IMPORT_CONFIG
    base = load_config(config_path, args.set)
    sets_size = any(s.partition("=")[0].strip() == "data.image_size" for s in args.set)
    output = Path(args.output or DEFAULT_OUTPUT)
    folder = output.parent if output.suffix == ".safetensors" else output
    common.claim_output(args, folder.parent if folder.name == "checkpoints" else folder)  # the run folder
    result = run_import(args.import_weights, output, base,
                        image_size=base.data.image_size if sets_size else None)
    for note in result.notes:
        print(f"note: {note}")
    print(result.summary(args.import_weights))
    if result.plan.data_shape[1] != base.data.image_size:
        print(f"note: data.image_size is {result.plan.data_shape[1]} (the source's sample size) but "
              f"{base.data.image_size} in {config_path or 'the defaults'}; -t resumes only with the same "
              f"size: train with --set data.image_size={result.plan.data_shape[1]} or import with "
              f"--set data.image_size={base.data.image_size}")
    return 0


def export(args) -> int:
    from ..convert_sd.exporter import export_diffusers

    cfg, _ = common.load_config(args)
    if not args.output:
        raise ConfigError("--export needs --output: the new folder to write the model into")
    model = common.load_run(args, cfg, "cpu")
    out = export_diffusers(model, args.output)
    print(f"exported {model.path} as a diffusers AutoencoderKL into {out} (config.json, "
          "diffusion_pytorch_model.safetensors); load it with AutoencoderKL.from_pretrained")
    return 0


def init(args) -> int:
    from ..project import write_starter_project

    folder = write_starter_project(args.init_dir)
    print(f"wrote a starter project in {folder}: config.toml, structures/, images/")
    print(f"next: put your images in {folder / 'images'} (any depth), then run, from {folder}:")
    print("  flexvae train        (or: python train.py -t -c config.toml from a clone)")
    return 0


def shard(args) -> int:
    from ..data.make_shards import describe, make_shards
    from ..errors import DataError

    if not args.input or not args.output:
        raise DataError("--shard needs --input FOLDER (the images) and --output FOLDER (the shards)")
    shard_size = common.count_option(args, "shard_size", 1, 10000, "images per shard")
    workers = common.count_option(args, "workers", 1, 2, "shards written at once")
    common.claim_output(args, Path(args.output))
    manifest = make_shards(args.input, args.output, shard_size, workers, args.labels)
    print(f"{args.output}: {describe(manifest)}; manifest.json lists them (data.source = 'webdataset', "
          f"data.path = '{args.output}')")
    return 0
