"""The run configuration's schema: one frozen dataclass per TOML section.

Every field has a default, so an empty file (or no file) is a valid config. The
``[latent]`` section is not fixed here: it holds the parameter dataclass of the latent
type that ``model.latent`` names (see ``latents/registry.py``).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..fields import NON_NEGATIVE, POSITIVE, UNIT_CLOSED, UNIT_CLOSED_OPEN, UNIT_OPEN, UNIT_OPEN_CLOSED, setting
from ..latents.registry import NoParams

SEED_RANGE = ("between -2**32 and 2**32", lambda v: -2**32 < v < 2**32)
LABEL_SOURCE = ("'none', 'folders' or the path of a .csv file",
                lambda v: v in ("none", "folders") or v.strip().lower().endswith(".csv"))
FOLDER_NAME = ("a folder name (not empty; '.' is the working directory itself)", lambda v: v.strip() not in ("", "."))


@dataclass(frozen=True)
class DataConfig:
    source: str = setting(
        "folder", "'folder', 'webdataset' (tar shards) or a torchvision dataset: mnist, fashion-mnist, kmnist, "
        "cifar10, cifar100, svhn")
    path: str = setting("assets/photos", "image folder (source = folder), tar shards: a file, a folder of them or "
                        "a brace pattern such as shards/train-{000..127}.tar (webdataset), or dataset root")
    val_path: str = setting("", "optional separate validation image folder; empty = none")
    image_size: int = setting(32, "side length in pixels that images are resized to", POSITIVE)
    channels: Literal[1, 3, 4] = setting(3, "image channels: 1 (grey), 3 (RGB) or 4 (RGBA)")
    resize_filter: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = setting(
        "bilinear", "resampling filter: nearest, bilinear, bicubic, lanczos, box or hamming")
    pad_to_square: bool = setting(False, "pad images to a square before resizing instead of cropping")
    flip: bool = setting(True, "random horizontal flip (training only)")
    num_workers: int = setting(2, "data loader worker processes", NON_NEGATIVE)
    labels: str = setting(
        "none", "class labels: none, folders (each image's first sub-folder under path is its class) or a CSV "
        "file of 'relative path,label' rows; images without a label are unlabelled", LABEL_SOURCE)
    label_fraction: float = setting(
        1.0, "keep the labels of this share of the labelled images (per class, seeded by train.seed); the rest "
        "train unlabelled (semi-supervised)", UNIT_OPEN_CLOSED)
    cache: Literal["auto", "ram", "off"] = setting(
        "auto", "training: keep decoded, resized images in shared memory after their first read; "
        "auto = when they take under a quarter of the available RAM")


@dataclass(frozen=True)
class ModelConfig:
    encoder: str | list[str] = setting(
        "structures/small_encoder.json", "encoder: JSON token-list file or inline list of tokens")
    decoder: str | list[str] = setting(
        "structures/small_decoder.json", "decoder: JSON token-list file or inline list of tokens")
    latent: str = setting(
        "gaussian", "latent bottleneck: gaussian, deterministic, vq, fsq, categorical or mixed (Gaussian + class)")
    scaling_factor: float = setting(
        1.0, "latents are multiplied by this when encoded, divided by it before decoding", POSITIVE)
    plugins: list[str] = setting([], "Python modules or .py files that register extra layer tokens")
    prior: str = setting(
        "Normal", "the prior of a gaussian top latent: Normal (N(0, I), closed-form KL), MoG_components=10 (learned "
        "mixture), Vamp_components=50 (VampPrior) or Flow_layers=4_hidden=128 (RealNVP flow); a learned prior's KL is "
        "the Monte Carlo estimate (python train.py --priors lists them)")


@dataclass(frozen=True)
class LossConfig:
    terms: list[str] = setting(
        [], "the loss as term tokens, e.g. [\"NLL\", \"KL_weight=1e-4_warmup=1000\", \"LPIPS_weight=0.1\"] (python "
        "train.py --terms lists them); empty = the terms the keys below declare")
    objective: Literal["weighted", "elbo"] = setting(
        "weighted", "weighted: recon_weight * recon + kl_weight * KL, per-element means (the original FlexVAE); "
        "elbo: the likelihood's NLL + kl_weight * KL, summed per image (kl_weight = 1 is the ELBO)")
    likelihood: str = setting(
        "gaussian", "elbo: decoder likelihood: gaussian, laplace, bernoulli, logistic_mixture (8-bit images) or one "
        "a plugin registers (objective.register_likelihood)")
    scale: Literal["fixed", "learned", "channel", "optimal"] = setting(
        "learned", "elbo, gaussian/laplace: the scale is fixed (scale_value), learned (one value), channel "
        "(learned per channel) or optimal (the batch's maximum-likelihood value)")
    scale_value: float = setting(0.1, "elbo: the fixed scale, and where learned scales start", POSITIVE)
    mixture_components: int = setting(10, "elbo, logistic_mixture: mixture components", POSITIVE)
    recon: Literal["mse", "l1", "bce"] = setting("mse", "weighted: reconstruction loss: mse, l1 or bce")
    recon_weight: float = setting(1.0, "weighted: reconstruction loss weight (formerly alpha)", NON_NEGATIVE)
    kl_weight: float = setting(1e-4, "KL divergence weight (its final value under a schedule)", NON_NEGATIVE)
    kl_reduction: Literal["mean", "sum"] = setting(
        "mean", "weighted: KL reduction: mean (per element) or sum (per sample, averaged over the batch)")
    free_bits: float = setting(
        0.0, "KL floor in nats per latent channel (per group for categorical latents), averaged over the batch: "
        "a channel under it gets no KL gradient", NON_NEGATIVE)
    balance: Literal["fixed", "learned"] = setting(
        "fixed", "weighted: learned = each term's weight w is trained as w * exp(-s) * term + s")
    kl_schedule: Literal["constant", "linear", "cyclical"] = setting(
        "constant", "KL weight schedule: constant, linear (warmup) or cyclical")
    kl_warmup_steps: int = setting(0, "linear schedule: steps to ramp the KL weight from 0", NON_NEGATIVE)
    kl_cycle_steps: int = setting(1000, "cyclical schedule: period length in steps", POSITIVE)
    kl_cycle_ratio: float = setting(0.5, "cyclical schedule: fraction of a period spent ramping", UNIT_OPEN_CLOSED)
    ssim: bool = setting(False, "add ssim_weight * (1 - SSIM) to the loss")
    ssim_weight: float = setting(1.0, "SSIM loss weight (formerly beta)", NON_NEGATIVE)
    ssim_kind: Literal["auto", "ssim", "ms-ssim"] = setting(
        "auto", "SSIM variant: auto (chosen from the image size), ssim or ms-ssim")
    sparse: bool = setting(False, "add sparse_weight * L1 of the posterior mean to the loss")
    sparse_weight: float = setting(1e-3, "sparsity loss weight (formerly gamma)", NON_NEGATIVE)
    perceptual_weight: float = setting(0.0, "weight of the LPIPS perceptual distance (mean per image); 0 = off",
                                       NON_NEGATIVE)
    perceptual_net: Literal["vgg", "alex"] = setting("vgg", "LPIPS backbone: vgg (VGG16) or alex (AlexNet)")
    perceptual_weights: str = setting(
        "", "LPIPS backbone weights: empty = torchvision's cache (downloaded once), a .pth or .safetensors "
        "file, or 'random' (an untrained backbone: for tests only)")


@dataclass(frozen=True)
class AdversarialConfig:
    discriminator: str | list[str] = setting(
        "", "discriminator structure: JSON token-list file or inline list; empty = no adversarial training")
    weight: float = setting(0.5, "weight of the generator's adversarial term", NON_NEGATIVE)
    start: int = setting(0, "optimizer step from which the discriminator trains and the generator sees it",
                         NON_NEGATIVE)
    loss: Literal["hinge", "non_saturating"] = setting("hinge", "adversarial loss: hinge or non_saturating")
    adaptive: bool = setting(
        True, "scale the generator's term by |grad reconstruction| / |grad adversarial| at the decoder's last layer")
    max_adaptive_weight: float = setting(1e4, "upper bound of the adaptive weight", POSITIVE)
    lr: float = setting(2e-4, "discriminator peak learning rate (Adam; train's warm-up and schedule)", POSITIVE)
    betas: list[float] = setting([0.5, 0.9], "discriminator Adam betas", UNIT_CLOSED_OPEN, (2, 2))
    r1_weight: float = setting(0.0, "R1 gradient penalty on real images (gamma / 2 * |grad D|^2); 0 = off",
                               NON_NEGATIVE)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = setting(16, "images per optimizer micro-batch", POSITIVE)
    max_steps: int = setting(600, "optimizer steps to train for", POSITIVE)
    lr: float = setting(1e-3, "peak learning rate (AdamW)", POSITIVE)
    weight_decay: float = setting(0.01, "AdamW weight decay", NON_NEGATIVE)
    betas: list[float] = setting([0.9, 0.999], "AdamW betas [beta1, beta2]", UNIT_CLOSED_OPEN, (2, 2))
    warmup_steps: int = setting(0, "linear learning-rate warmup steps", NON_NEGATIVE)
    schedule: Literal["constant", "cosine"] = setting("cosine", "learning-rate schedule after warmup: constant or cosine")
    min_lr_ratio: float = setting(0.1, "cosine schedule: final learning rate as a fraction of lr", UNIT_CLOSED)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", POSITIVE)
    grad_clip: float = setting(1.0, "gradient norm clipping; 0 = off", NON_NEGATIVE)
    skip_spikes: bool = setting(
        False, "skip an update whose gradient norm (before clipping) is not finite or above skip_factor x the "
        "skip_quantile of the last skip_window norms (VDVAE's guard, with an adaptive threshold)")
    skip_quantile: float = setting(0.99, "skip_spikes: the quantile of the recent norms", UNIT_OPEN_CLOSED)
    skip_factor: float = setting(2.0, "skip_spikes: a norm above this multiple of the quantile is a spike", POSITIVE)
    skip_window: int = setting(200, "skip_spikes: how many recent norms the quantile is taken over", POSITIVE)
    ema: bool = setting(False, "keep an exponential moving average of the weights")
    ema_decay: float = setting(0.999, "EMA decay per step", UNIT_OPEN)
    seed: int = setting(0, "random seed, -2**32 < seed < 2**32", SEED_RANGE)
    device: str = setting("auto", "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    out_dir: str = setting("runs/default", "folder for checkpoints, samples and logs", FOLDER_NAME)
    save_every: int = setting(200, "save a checkpoint every N steps", POSITIVE)
    keep_last: int = setting(3, "number of recent checkpoints kept", POSITIVE)
    sample_every: int = setting(200, "write reconstruction samples every N steps", POSITIVE)
    log_every: int = setting(10, "log losses every N steps", POSITIVE)
    val_every: int = setting(0, "validate on data.val_path every N steps (and at the end); 0 = off", NON_NEGATIVE)
    init_images: int = setting(
        2048, "images a fresh run reads before its first step to fit the layers set from the data (PCA tokens), "
        "their mirror images too with data.flip; the whole data set when it has fewer", POSITIVE)
    fit_prior: int = setting(
        0, "at the end of the run, fit a Gaussian mixture of N components to the encoded training images: the prior "
        "every sampling path then uses (fit-prior; needs scikit-learn); 0 = off", NON_NEGATIVE)
    fit_prior_density: Literal["mixture", "flow"] = setting(
        "mixture", "train.fit_prior's density: a Gaussian mixture (N components), or a RealNVP flow (4 couplings of "
        "128 units, fitted by maximum likelihood)")
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32", "fp32, or bf16/fp16 autocast (fp16 adds a gradient scaler); norms and the loss stay fp32")
    channels_last: bool = setting(False, "channels-last memory layout for 2D/3D data (faster convolutions on GPU)")
    compile: bool = setting(False, "torch.compile the model; falls back to eager with a message where it fails")
    grad_checkpointing: Literal["off", "marked", "blocks"] = setting(
        "off", "recompute activations in backward: off, marked ('@' tokens and spans), blocks (every VAERB/VAEA too)")


STAGE_PARTS = ("all", "encoder", "latent", "decoder", "prior", "discriminator")


@dataclass(frozen=True)
class StageConfig:
    """One ``[[stage]]`` table: from ``start`` on, until the next stage's start."""

    start: int = setting(0, "optimizer step this stage begins at (stages in increasing order)", NON_NEGATIVE)
    name: str = setting("", "the stage's name in the log")
    train: list[str] = setting(
        ["all"], "what trains; everything else is frozen: all, encoder, latent, decoder, prior, discriminator, or "
        "positions of a structure, e.g. decoder:20-24 or encoder:1 (1-based, as structure errors count)")
    lr: float = setting(0.0, "peak learning rate in this stage, under train's warm-up and schedule; 0 = train.lr",
                        NON_NEGATIVE)
    image_size: int = setting(0, "images are resized to this side length in this stage; 0 = data.image_size",
                              NON_NEGATIVE)
    terms: list[str] = setting([], "the loss terms on in this stage, by name (NLL, KL, LPIPS, Adv ...); "
                                   "empty = every term")


@dataclass(frozen=True)
class EncodeConfig:
    format: Literal["safetensors", "npy", "webdataset"] = setting(
        "safetensors", "encoded latents: one safetensors or npy file per image, or webdataset tar shards")
    shard_size: int = setting(10000, "webdataset format: images per shard", POSITIVE)
    sample: bool = setting(False, "store a posterior sample instead of the mean")
    batch_size: int = setting(32, "images per encoding batch", POSITIVE)


@dataclass(frozen=True)
class MemConfig:
    margin: float = setting(0.9, "fraction of free device memory that may be used", UNIT_OPEN_CLOSED)
    probe_sizes: list[int] = setting([1, 2, 4], "batch sizes measured to fit memory use (at least 2)", POSITIVE, (2, None))
    max_batch: int = setting(4096, "largest batch size ever suggested", POSITIVE)


@dataclass(frozen=True)
class Config:
    """A whole run's settings, one section per TOML table (``load_config`` reads them; every
    key is on the configuration page); ``stage`` holds the training phases, if any."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The parameters of the latent type model.latent names (its registered dataclass).
    latent: object = field(default_factory=NoParams)
    loss: LossConfig = field(default_factory=LossConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    mem: MemConfig = field(default_factory=MemConfig)
    # Training stages ([[stage]] tables), in order of their start step; empty = one stage, all of the run.
    stage: tuple = ()


# Sections with a fixed schema; [latent] depends on model.latent; [[stage]] is a list of tables.
SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("latent", "stage")}
SECTION_ORDER = [f.name for f in dataclasses.fields(Config) if f.name != "stage"]

# old key -> its name now: still read, with a one-line note (silently from a checkpoint's stored config)
RENAMED_KEYS = {("loss", "alpha"): "recon_weight", ("loss", "beta"): "ssim_weight", ("loss", "gamma"): "sparse_weight",
                **{("loss", f"kld_{rest}"): f"kl_{rest}" for rest in ("weight", "reduction", "schedule", "warmup_steps",
                                                                     "cycle_steps", "cycle_ratio")}}
