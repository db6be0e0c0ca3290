"""Command line: ``python train.py -t`` (the original's flags) and ``flexvae train`` (subcommands).

Each mode is a thin call into the package. User mistakes (FlexVAEError) print one line and
exit with status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import FlexVAEError

DEFAULT_CONFIG = "configs/config.toml"

# (flag for train.py, subcommand for flexvae, help)
MODES = [
    ("-t", "train", "train the configured model (resumes a run directory that has a checkpoint)"),
    ("-i", "reconstruct", "inference: reconstruct every image of a folder, with PSNR/SSIM per image"),
    ("-e", "encode", "encode every image of a folder to latent files plus a manifest"),
    ("-d", "decode", "decode latent files back to images"),
    ("-mem", "mem", "find the largest training batch size that fits on the device"),
    ("--check", "check", "build and check the structures; print the per-layer table"),
    ("--layers", "layers", "list every layer token with its arguments"),
    ("-eval", "evaluate", "evaluate a checkpoint on a folder: MSE, PSNR, SSIM, MS-SSIM, KL per channel, "
                          "active units, importance-sampled NLL; JSON and a table"),
    ("-inter", "interpolate", "interpolate between --input and --input2 (images or folders) in latent space: "
                              "linear and spherical PNG strips"),
    ("-pics", "pictures", "latent traversal grid, prior samples and training-history plots into <run>/pictures"),
    ("-probe", "probe", "linear probe: classify a labelled folder (--input) from latents vs PCA of pixels"),
    ("-matrix", "matrix", "train and evaluate every combination of an experiment matrix (--matrix FILE)"),
]
IMPORT_HELP = ("convert a Stable Diffusion VAE (diffusers folder or original .safetensors) into a flexvae "
               "checkpoint at --output (default runs/sd_vae/checkpoints/step_00000000.safetensors)")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=None,
                        help=f"TOML config (default: {DEFAULT_CONFIG}, or built-in defaults if it is missing)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set train.lr=3e-4")
    parser.add_argument("--ckpt", help="checkpoint file, or a run directory (its latest checkpoint); "
                                       "default: train.out_dir")
    parser.add_argument("--input", help="input folder (default: data.path for -i/-e, <run>/latents for -d)")
    parser.add_argument("--output", help="output folder (default: inside the run directory); "
                                         "the checkpoint file for --import-weights")
    parser.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default: train.device)")
    parser.add_argument("--fresh", action="store_true", help="-t: ignore existing checkpoints and start over")
    parser.add_argument("--sample", action="store_true", help="-e: store a posterior sample instead of the mean")
    parser.add_argument("--side-by-side", action="store_true", help="-i: write original and reconstruction side by side")
    parser.add_argument("--write", action="store_true", help="-mem: store the batch size found in the config file")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    parser.add_argument("--input2", help="-inter: second image or folder; -probe: labelled test folder")
    parser.add_argument("--matrix", help="-matrix: the experiment matrix TOML file")
    parser.add_argument("--steps", type=int, help="-inter: images per interpolation (8); -pics: traversal steps (9)")
    parser.add_argument("--nll-samples", type=int, help="-eval: importance samples per image for the NLL "
                                                        "(default 100, fewer above 64x64 px; 0 = skip)")
    parser.add_argument("--nll-sigma", help="-eval: decoder sigma of the Gaussian likelihood, or 'auto' "
                                            "(sqrt of the reconstruction MSE; default)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def train_py_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="flexvae: VAEs declared as JSON token lists. Give exactly one mode.")
    group = parser.add_mutually_exclusive_group(required=True)
    for flag, name, text in MODES:
        group.add_argument(flag, dest="mode", action="store_const", const=name, help=text)
    group.add_argument("--import-weights", metavar="SRC", help=IMPORT_HELP)
    _add_options(parser)
    return parser


def flexvae_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexvae", description="flexvae: VAEs declared as JSON token lists.")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for _, name, text in MODES:
        _add_options(sub.add_parser(name, help=text, description=text))
    importer = sub.add_parser("import-weights", help=IMPORT_HELP, description=IMPORT_HELP)
    importer.add_argument("import_weights", metavar="SRC", help="diffusers VAE folder or original .safetensors")
    _add_options(importer)
    return parser


def _load_config(args):
    from .config import load_config

    path = args.config
    if path is None:
        path = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None
    return load_config(path, args.set), path


def _device(args, cfg) -> str:
    from .config import resolve_device

    return resolve_device(args.device or cfg.train.device)


def _load_model(args, cfg, device):
    from .inference import ModelContext
    from .loading import model_from_checkpoint
    from .train.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(args.ckpt or cfg.train.out_dir)
    ckpt = load_checkpoint(path, with_train_state=False)
    model, stored_cfg, plan = model_from_checkpoint(ckpt, device=device, prefer_ema=not args.no_ema,
                                                    extra_plugins=cfg.model.plugins)
    print(f"model: {path} (step {ckpt.step})")
    return ModelContext.from_checkpoint(model, stored_cfg, plan), ckpt


def _run_dir(args, cfg) -> Path:
    if args.ckpt:
        ckpt = Path(args.ckpt)
        if ckpt.is_file():
            return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        return ckpt.parent if ckpt.name == "checkpoints" else ckpt
    return Path(cfg.train.out_dir)


def run_mode(args) -> int:
    if getattr(args, "import_weights", None):
        from .convert_sd import import_command

        return import_command(args)
    cfg, config_path = _load_config(args)
    mode = args.mode
    if mode == "layers":
        from .loading import load_plugins
        from .registry import LAYERS
        from . import build  # noqa: F401  (registers the built-in tokens)

        load_plugins(cfg.model.plugins, config_path)
        print(LAYERS.table())
        return 0
    if mode == "check":
        from .loading import plan_from_config

        print(plan_from_config(cfg, config_path).table())
        return 0
    if mode == "train":
        from .train.trainer import train

        train(cfg, config_path, fresh=args.fresh, device=args.device)
        return 0
    if mode == "mem":
        from .train.memory import find_max_batch, write_batch_size

        result = find_max_batch(cfg, config_path, device=_device(args, cfg))
        print(result.format())
        if args.write:
            size = result.recommended
            write_batch_size(config_path, size)
            print(f"wrote train.batch_size = {size} to {config_path}")
        return 0

    if mode in ("evaluate", "interpolate", "pictures", "probe", "matrix"):
        from .analysis.commands import run_analysis

        return run_analysis(mode, args, cfg)
    device = _device(args, cfg)
    dist = None
    if mode == "encode":  # under torchrun, every process encodes its share of the folder
        import torch

        from .train.distributed import from_environment, setup

        dist = from_environment()
        device = str(setup(dist, torch.device(device)))
    ctx, _ = _load_model(args, cfg, device)
    run_dir = _run_dir(args, cfg)
    workers = cfg.data.num_workers
    if mode == "reconstruct":
        from .inference import reconstruct_folder

        out = Path(args.output or run_dir / "reconstructions")
        summary = reconstruct_folder(ctx, args.input or cfg.data.path, out, batch_size=cfg.encode.batch_size,
                                     num_workers=workers, side_by_side=args.side_by_side, device=device)
        print(f"reconstructed {summary['images']} images into {out}: mean PSNR {summary['psnr']:.2f} dB, "
              f"mean SSIM {summary['ssim']:.4f}; per-image values in {out / 'metrics.csv'}")
    elif mode == "encode":
        from .inference import encode_folder

        out = Path(args.output or run_dir / "latents")
        summary = encode_folder(ctx, args.input or cfg.data.path, out, fmt=cfg.encode.format,
                                sample=args.sample or cfg.encode.sample, batch_size=cfg.encode.batch_size,
                                num_workers=workers, device=device, seed=cfg.train.seed, dist=dist)
        from .train.distributed import cleanup

        cleanup(dist)
        if not dist.is_main:
            return 0
        print(f"encoded into {out}: {json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in summary.items()})}")
    elif mode == "decode":
        from .inference import decode_folder

        out = Path(args.output or run_dir / "decoded")
        summary = decode_folder(ctx, args.input or run_dir / "latents", out, batch_size=cfg.encode.batch_size,
                                device=device)
        print(f"decoded {summary['decoded']} latents into {out} ({summary['failed']} failed)")
    return 0


def main(argv=None, prog: str = "flexvae") -> int:
    parser = train_py_parser() if prog == "train.py" else flexvae_parser()
    args = parser.parse_args(argv)
    try:
        return run_mode(args)
    except FlexVAEError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # -t turns Ctrl-C into a TrainingError after saving; other modes stop here
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
