"""The one table of modes, and the two parsers built from it: ``python train.py -t`` (the
original's flags) and ``flexvae train`` (subcommands)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from . import analysis, handlers, sampling
from .common import DEFAULT_CONFIG


@dataclass(frozen=True)
class Mode:
    flag: str  # train.py's flag
    name: str  # flexvae's subcommand
    help: str
    handler: Callable  # handler(args) -> exit status
    value: tuple[str, str, str] | None = None  # (dest, metavar, help): a mode that takes one value


MODES = [
    Mode("-t", "train", "train the configured model (resumes a run directory that has a checkpoint)",
         handlers.train),
    Mode("-i", "reconstruct", "inference: reconstruct every image of a folder, with PSNR/SSIM per image",
         handlers.reconstruct),
    Mode("-e", "encode", "encode every image of a folder to latent files plus a manifest", handlers.encode),
    Mode("-d", "decode", "decode latent files back to images", handlers.decode),
    Mode("-mem", "mem", "find the largest training batch size that fits on the device", handlers.mem),
    Mode("--check", "check", "build and check the structures; print the per-layer table", handlers.check),
    Mode("--layers", "layers", "list every layer token with its arguments", handlers.layers),
    Mode("--terms", "terms", "list every loss term token (loss.terms) with its arguments and the schedule keywords",
         handlers.terms),
    Mode("--priors", "priors", "list every prior token (model.prior) with its arguments", handlers.priors),
    Mode("-eval", "evaluate", "evaluate a checkpoint on a folder: MSE, PSNR, SSIM, MS-SSIM, KL per channel, "
                              "active units, the run's own loss terms, importance-sampled NLL under the model's "
                              "likelihood, a two-sample test of prior samples against reconstructions, with --fid "
                              "FID and reconstruction FID, and with --input2 LABELLED the generation score of prior "
                              "samples (a judge CNN's Frechet distance, precision, recall, confident share and class "
                              "entropy, beside uniform noise's; conditional models: of each class; class latents: "
                              "their accuracy); JSON and a table",
         analysis.evaluate),
    Mode("-inter", "interpolate", "interpolate between --input and --input2 (images or folders) in latent space: "
                                  "linear and spherical PNG strips; with --classes A,B between two classes of a "
                                  "conditional model", analysis.interpolate),
    Mode("-pics", "pictures", "latent traversal grid, prior samples and training-history plots into "
                              "<run>/pictures", analysis.pictures),
    Mode("-analyze", "analyze", "per latent group (the top latent, then a hierarchy's groups): divergence "
                                "statistics, latent steps, white-noise receptive fields, most exciting inputs and, "
                                "with --input2 LABELLED, decodability by linear probes; into <run>/analysis",
         analysis.analyze),
    Mode("-probe", "probe", "linear probe: classify a labelled folder (--input) from latents vs PCA of pixels",
         analysis.probe),
    Mode("-matrix", "matrix", "train and evaluate every combination of an experiment matrix (--matrix FILE)",
         analysis.matrix),
    Mode("--fit-prior", "fit-prior", "fit a Gaussian mixture (or --density flow: a RealNVP flow) prior to the encoded training images (or --input) of "
                                     "a checkpoint; every sampling path then uses it", sampling.fit_prior),
    Mode("-sample", "sample", "draw --count images from a run's prior (its fitted prior when it has one) into "
                              "--output as PNGs", sampling.sample),
    Mode("--import-weights", "import-weights", "convert a Stable Diffusion VAE (diffusers folder or original "
                                               ".safetensors) into a flexvae checkpoint at --output (default "
                                               "runs/sd_vae/checkpoints/step_00000000.safetensors)",
         handlers.import_weights, ("import_weights", "SRC", "diffusers VAE folder or original .safetensors")),
    Mode("--export", "export", "write a model as another library's format into --output: --format diffusers "
                               "makes a folder that diffusers' AutoencoderKL.from_pretrained loads (SD-structured "
                               "models)", handlers.export),
    Mode("--shard", "shard", "turn a folder of images (--input) into webdataset tar shards (--output) for "
                             "data.source = 'webdataset': parallel (--workers), resumable, a manifest with counts and "
                             "sizes, labels kept (--labels folders or a CSV file)", handlers.shard),
    Mode("--init", "init", "write a starter project into DIR: a commented config and its structures, "
                           "ready to train on the images you put in DIR/images", handlers.init,
         ("init_dir", "DIR", "the project folder to create (or an empty existing one)")),
]
BY_NAME = {mode.name: mode for mode in MODES}
VALUED = [mode for mode in MODES if mode.value is not None]

# The modes that read each mode-specific option; any other mode refuses it rather than ignore it.
_MODEL_USERS = {"reconstruct", "encode", "decode", "evaluate", "interpolate", "pictures", "probe", "analyze",
                "fit-prior", "sample"}
_TILED = {"reconstruct", "encode", "decode"}
OPTION_MODES = {
    "ckpt": _MODEL_USERS | {"export"}, "input": _MODEL_USERS - {"sample"}, "output": (_MODEL_USERS - {"fit-prior"}) | {"import-weights", "export"},
    "no_ema": _MODEL_USERS | {"export"}, "format": {"export"}, "tile": _TILED, "overlap": _TILED,
    "fresh": {"train"}, "verbose": {"train"}, "sample": {"encode"},
    "side_by_side": {"reconstruct"}, "native_size": {"reconstruct"}, "write": {"mem"},
    "input2": {"interpolate", "probe", "evaluate", "analyze"},
    "matrix": {"matrix"}, "steps": {"interpolate", "pictures", "analyze"}, "nll_samples": {"evaluate"},
    "nll_sigma": {"evaluate"}, "fid": {"evaluate"}, "inception": {"evaluate"}, "labels": {"reconstruct", "encode", "evaluate", "fit-prior"},
    "classes": {"interpolate", "sample"}, "overwrite": _MODEL_USERS | {"train", "matrix", "import-weights"},
    "count": {"sample"}, "temperature": {"sample"}, "prior": {"sample", "pictures", "interpolate", "evaluate"},
    "components": {"fit-prior"}, "covariance": {"fit-prior"}, "density": {"fit-prior"},
    "shard_size": {"shard"}, "workers": {"shard"},
}
for _name in ("input", "output", "labels", "overwrite"):
    OPTION_MODES[_name] = OPTION_MODES[_name] | {"shard"}


def _add_options(parser: argparse.ArgumentParser, mode: Mode | None = None) -> None:
    """The options of ``mode`` (every option for train.py's one parser, ``mode`` None): a
    subcommand's -h lists only what that mode reads."""
    def option(*flags, **kwargs):
        name = flags[-1].lstrip("-").replace("-", "_")
        if mode is None or name not in OPTION_MODES or mode.name in OPTION_MODES[name]:
            parser.add_argument(*flags, **kwargs)

    parser.add_argument("-c", "--config", default=None,
                        help=f"TOML config (default: {DEFAULT_CONFIG}, else config.toml, else the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set train.lr=3e-4")
    option("--ckpt", help="checkpoint file, or a run directory (its latest checkpoint); "
                                       "default: train.out_dir")
    option("--input", help="input folder (default: data.path for -i/-e, <run>/latents for -d)")
    option("--output", help="output folder (default: inside the run directory); "
                                         "the checkpoint file for --import-weights")
    parser.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default: train.device)")
    option("--fresh", action="store_true", help="-t: start over; the previous run is moved to <run>/previous/<date-time>/")
    option("--verbose", action="store_true", help="-t: print the model's full layer table first")
    option("--sample", action="store_true", help="-e: store a posterior sample instead of the mean")
    option("--side-by-side", action="store_true", help="-i: write original and reconstruction side by side")
    option("--native-size", action="store_true", help="-i: reconstruct at each image's own resolution "
                                                      "(fully convolutional models)")
    option("--format", choices=["diffusers"], help="--export: the format to write (default and only: diffusers)")
    option("--tile", type=int, help="-i/-e/-d: process each image at its own size in tiles of this many pixels "
                                    "(a multiple of the model's downsampling); exact (equal to the untiled output) for a "
                                    "model without attention, else cross-faded")
    option("--overlap", type=int, help="-i/-e/-d with --tile: pixels by which tiles overlap (default: what the "
                                       "model's receptive field needs for exact tiling)")
    option("--write", action="store_true", help="-mem: store the batch size found in the config file")
    option("--overwrite", action="store_true", help="replace files in the output folder that flexvae did not write "
                                                    "(or that changed since); without it such files are never "
                                                    "replaced and the mode stops before writing")
    option("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    option("--input2", help="-inter: second image or folder; -probe: labelled test folder; "
                                 "-eval: labelled folder for the generation score of prior samples; "
                                 "-analyze: labelled folder for the decodability probes")
    option("--labels", help="-i/-e/-eval with a conditional model: the inputs' labels: auto (the sub-folder names "
                            "when every image is in a folder named after a class; default), folders, none or a "
                            "CSV file of 'relative path,label' rows")
    option("--classes", help="-inter with a conditional model: two class names A,B; decodes the same styles "
                             "while the class moves from A to B; -sample: the samples' classes, in turn")
    option("--count", type=int, help="-sample: how many images (64)")
    option("--shard-size", type=int, help="--shard: images per shard (10000)")
    option("--workers", type=int, help="--shard: shards written at once, one process each (2)")
    option("--temperature", type=float, help="-sample: scale of the prior's spread (1.0)")
    option("--prior", choices=["auto", "fitted", "model"], help="-sample, -pics, -inter, -eval: the run's fitted "
                                                                 "prior when it has one (auto, default), the fitted one, "
                                                                 "or the model's own (N(0, I) or its model.prior)")
    option("--components", type=int, help="--fit-prior: mixture components (10)")
    option("--density", choices=["mixture", "flow"], help="--fit-prior: a Gaussian mixture (default) or a RealNVP flow")
    option("--covariance", choices=["auto", "full", "diag"], help="--fit-prior: full or diagonal covariances "
                                                                   "(auto: full when there are enough images)")
    option("--matrix", help="-matrix: the experiment matrix TOML file")
    option("--steps", type=int, help="-inter: images per interpolation (8); -pics, -analyze: traversal and latent "
                                     "steps (9)")
    option("--nll-samples", type=int, help="-eval: importance samples per image for the NLL "
                                                        "(default 100, fewer above 64x64 px; 0 = skip)")
    option("--nll-sigma", help="-eval: decoder sigma of the Gaussian likelihood, or 'auto' "
                                            "(sqrt of the reconstruction MSE; default)")
    option("--fid", action="store_true", help="-eval: FID of prior samples and of reconstructions against the folder "
                                              "(torch-fidelity's Inception-v3; pip install -e '.[fid]')")
    option("--inception", help="-eval --fid: the Inception-v3 weights file (default: torch's hub cache)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def train_py_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="flexvae: VAEs declared as JSON token lists. Give exactly one mode.")
    group = parser.add_mutually_exclusive_group(required=True)
    for mode in MODES:
        if mode.value is not None:  # takes its one value as the flag's value
            group.add_argument(mode.flag, dest=mode.value[0], metavar=mode.value[1], help=mode.help)
        else:
            group.add_argument(mode.flag, dest="mode", action="store_const", const=mode.name, help=mode.help)
    _add_options(parser)
    _add_version(parser)
    return parser


def _add_version(parser: argparse.ArgumentParser) -> None:
    from ..version import __version__

    parser.add_argument("--version", action="version", version=f"flexvae {__version__}")


def flexvae_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexvae", description="flexvae: VAEs declared as JSON token lists.")
    _add_version(parser)
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode in MODES:
        _add_mode_arguments(sub.add_parser(mode.name, help=mode.help, description=mode.help), mode)
    return parser


def _add_mode_arguments(parser: argparse.ArgumentParser, mode: Mode) -> None:
    if mode.value is not None:
        parser.add_argument(mode.value[0], metavar=mode.value[1], help=mode.value[2])
    _add_options(parser, mode)


def mode_parser(mode: Mode, prog: str) -> argparse.ArgumentParser:
    """A parser of one mode's arguments alone (for its -h)."""
    parser = argparse.ArgumentParser(prog=prog, description=mode.help)
    _add_mode_arguments(parser, mode)
    return parser


def mode_of(args) -> Mode:
    return next((m for m in VALUED if getattr(args, m.value[0], None)), None) or BY_NAME[args.mode]


def check_options(args) -> None:
    """One error line for an option the chosen mode would silently ignore."""
    from ..errors import FlexVAEError

    mode = mode_of(args)
    for name, modes in OPTION_MODES.items():
        value = getattr(args, name, None)
        if value not in (None, False) and mode.name not in modes:
            users = ", ".join(f"{BY_NAME[m].flag} ({m})" for m in sorted(modes))
            raise FlexVAEError(f"--{name.replace('_', '-')} does nothing in {mode.flag} ({mode.name}); "
                               f"it is read by {users}")
    if getattr(args, "overlap", None) is not None and getattr(args, "tile", None) is None:
        raise FlexVAEError("--overlap does nothing without --tile SIZE")
    if getattr(args, "tile", None) is not None and getattr(args, "native_size", False):
        raise FlexVAEError("--tile already works at each image's own size; leave out --native-size")


def handler_for(args) -> Callable:
    """The handler of the parsed command line's mode."""
    return mode_of(args).handler
