"""Rate against distortion: held-out PSNR, SSIM (and LPIPS where its weights exist) against
latent size, for the shipped autoencoder families, PCA and JPEG.

Training data: random ``size`` px crops of the bundled photos (assets/photos, 64 px) and, where
scikit-image is installed, of its bundled colour photographs (shrunk by ``--shrink``), each crop's
colour channels in a random order.
Held-out data: ``size`` px crops of scikit-learn's two sample photographs (china.jpg,
flower.jpg, never seen in training), shrunk by ``--shrink`` the same way. For each latent size (values per image: 64, 256, 1,024 by default):

- conv: the shipped small structures (f4, residual blocks, attention at 8 x 8), the latent's
  channels set to size / 64;
- dcae: the DC-AE-like preset's structures (structures/dcae_f32_*.json: residual spans with
  space-to-channel / channel-to-space shortcuts), f32: a 1 x 1 latent of ``size`` channels;
- vit: the ViT autoencoder preset's structures (8 px patches, 4 + 4 transformer blocks), a
  4 x 4 latent of size / 16 channels;
- pca: the PCA autoencoder preset (configs/pca_ae.toml): a PCA code of the whole crop with
  ``size`` components, set from the training crops before the first step, then a bias-free
  convolutional decoder span that starts as the identity and trains alone;
- PCA with that many components, fitted on the training crops and their mirror images (the
  autoencoders train with random flips: the same data), the best linear code;
- with the ViT: PCA of the 8 px squares with size / 16 components each, the best linear code with
  the ViT latent's layout (one short vector per patch);
- JPEG (Pillow, 4:2:0) at the highest quality whose entropy-coded data fits in as many bytes as
  the latent has values (one byte per latent value; JPEG's headers and tables are not counted,
  they are the same for every image).

Every autoencoder trains the same steps with the same settings: a deterministic latent and the
Gaussian likelihood with its optimal scale (mean squared error), batch 16, AdamW, cosine.

    python bench/bench_rate_distortion.py [--steps 2000] [--sizes 64 256 1024] [--threads 2]
    python bench/bench_rate_distortion.py --tiny     # seconds: what CI runs
Writes bench/results/rate_distortion.md and .png (pip install "flexvae[bench]": scikit-image for its
photographs, matplotlib for the plot; without them it trains on the bundled photos and writes no plot).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import load_text, start

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("conv", "dcae", "vit", "pca")
# the preset each family trains (its loss, stages); the structures are sized per latent below
PRESET = {"pca": "pca_ae.toml"}


# --- data ------------------------------------------------------------------------------------------

# scikit-image's colour photographs (the held-out photos are in colour; its grey ones and textures
# would teach the networks that the three channels are equal)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def training_sources(shrink: int) -> tuple[list, str]:
    """The training photographs as groups of uint8 (H, W, 3) arrays: the bundled photos (64 px),
    and where scikit-image is installed its bundled photographs and textures (grey ones as RGB),
    shrunk by ``shrink`` like the held-out photos; and a line saying which."""
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((ROOT / "assets" / "photos").rglob("*.png"))]
    try:
        from skimage import data
    except ImportError:
        return [images], f"the {len(images)} bundled photos (scikit-image is not installed)"
    bundled, images = images, []
    used = []
    for name in SKIMAGE_PHOTOS:
        try:
            array = np.asarray(getattr(data, name)())
        except Exception:  # an image this scikit-image would download: skipped offline
            continue
        image = Image.fromarray(array).convert("RGB")
        image = image.resize((image.width // shrink, image.height // shrink), Image.LANCZOS)
        images.append(np.asarray(image))
        used.append(name)
    return [bundled, images], (f"the {len(bundled)} bundled photos and {len(used)} of scikit-image's "
                               f"({', '.join(used)}), half the crops from each group")


def training_crops(size: int, count: int, folder: Path, shrink: int = 2, seed: int = 0):
    """``count`` random ``size`` px crops of the training photographs (each group equally often), their
    colour channels in a random order (a dozen photos hold few hues: without it the networks meet
    the held-out flower's purples for the first time at test), written to ``folder`` as PNGs (what
    the autoencoders train on); returned as (N, 3, size, size) floats in [-1, 1], with the line
    saying where they came from."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources, described = training_sources(shrink)
    folder.mkdir(parents=True, exist_ok=True)
    crops = []
    for index in range(count):
        group = sources[index % len(sources)]
        image = group[int(rng.integers(len(group)))]
        top, left = rng.integers(0, image.shape[0] - size + 1), rng.integers(0, image.shape[1] - size + 1)
        crop = image[top:top + size, left:left + size][..., rng.permutation(3)]  # colours: any order of channels
        Image.fromarray(crop).save(folder / f"{index:05d}.png")
        crops.append(crop)
    return np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1, described


def held_out_crops(size: int, shrink: int, limit: int) -> np.ndarray:
    """Non-overlapping ``size`` px crops of scikit-learn's sample photos, shrunk by ``shrink``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    crops = []
    for photo in load_sample_images().images:
        image = Image.fromarray(photo)
        image = np.asarray(image.resize((image.width // shrink, image.height // shrink), Image.LANCZOS))
        for top in range(0, image.shape[0] - size + 1, size):
            for left in range(0, image.shape[1] - size + 1, size):
                crops.append(image[top:top + size, left:left + size])
    crops = np.stack(crops)[np.random.default_rng(1).permutation(len(crops))[:limit]]
    return crops.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1


# --- the baselines -----------------------------------------------------------------------------------

def as_trained(train: np.ndarray) -> np.ndarray:
    """The training crops as the autoencoders see them (data.flip): each one and its mirror image."""
    return np.concatenate([train, train[..., ::-1]])


def pca_reconstruct(train: np.ndarray, test: np.ndarray, components: int) -> np.ndarray:
    pca = pca_fit(train.reshape(len(train), -1), components)
    return pca.inverse_transform(pca.transform(test.reshape(len(test), -1))).reshape(test.shape).clip(-1, 1)


def block_pca_reconstruct(train: np.ndarray, test: np.ndarray, components: int, block: int) -> np.ndarray:
    """PCA of the ``block`` px squares, ``components`` per square: the best linear code with the
    layout of a patch-wise latent (the ViT's), where each latent position sees only its patch."""
    def squares(x):
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // block, block, w // block, block).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, c * block * block)

    n, c, h, w = test.shape
    codes = squares(test)
    pca = pca_fit(squares(train), components)
    out = pca.inverse_transform(pca.transform(codes)).reshape(n, h // block, w // block, c, block, block)
    return out.transpose(0, 3, 1, 4, 2, 5).reshape(test.shape).clip(-1, 1)


def pca_fit(flat: np.ndarray, components: int):
    from sklearn.decomposition import PCA

    return PCA(n_components=min(components, *flat.shape), random_state=0).fit(flat)


def jpeg_payload(data: bytes) -> int:
    """Bytes of a JPEG's entropy-coded data: from the end of the start-of-scan header to the end marker."""
    start = data.index(b"\xff\xda")
    header = int.from_bytes(data[start + 2:start + 4], "big")
    return len(data) - (start + 2 + header) - 2


def jpeg_reconstruct(test: np.ndarray, budget: int):
    """Per image, the highest JPEG quality whose payload fits in ``budget`` bytes; (images, mean
    payload bytes, share of images that fit at all)."""
    from PIL import Image

    out, sizes, fitted = [], [], 0
    for image in test:
        pixels = ((image.transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        best = None
        for quality in range(95, 0, -1):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=2)
            data = buffer.getvalue()
            if jpeg_payload(data) <= budget or quality == 1:
                best = data
                break
        fitted += jpeg_payload(best) <= budget
        sizes.append(jpeg_payload(best))
        decoded = np.asarray(Image.open(io.BytesIO(best)).convert("RGB")).astype(np.float32)
        out.append(decoded.transpose(2, 0, 1) / 127.5 - 1)
    return np.stack(out), float(np.mean(sizes)), fitted / len(test)


# --- the autoencoders --------------------------------------------------------------------------------

def structures(family: str, values: int, size: int):
    """(encoder, decoder) token lists of a family for a latent of ``values`` values per image."""
    def load(name):
        return json.loads((ROOT / "structures" / name).read_text())

    if family == "conv":  # f4
        channels = values // (size // 4) ** 2
        encoder, decoder = load("small_encoder.json"), load("small_decoder.json")
        return encoder[:-1] + [f"C2d_?_{channels}_3_1_1"], [f"C2d_{channels}_64_3_1_1"] + decoder[1:]
    if family == "dcae":  # f32 at 32 px: 1 x 1 positions
        positions = (size // 32) ** 2
        channels = values // positions
        encoder, decoder = load("dcae_f32_encoder.json"), load("dcae_f32_decoder.json")
        width = 256
        encoder[-1] = ({"residual": [f"C2d_?_{channels}_3_1_1"], "shortcut": f"S2C_1_{channels}"}
                       if width % channels == 0 else f"C2d_?_{channels}_3_1_1")
        decoder[0] = ({"residual": [f"C2d_{channels}_{width}_3_1_1"], "shortcut": f"C2S_1_{width}"}
                      if width % channels == 0 else f"C2d_{channels}_{width}_3_1_1")
        return encoder, decoder
    if family == "vit":  # 8 px patches
        channels = values // (size // 8) ** 2
        encoder, decoder = load("vit_ae_encoder.json"), load("vit_ae_decoder.json")
        return encoder[:-1] + [f"C2d_?_{channels}_1_1_0"], [f"C2d_{channels}_128_1_1_0"] + decoder[1:]
    if family == "pca":  # a global code: the PCA of the whole crop, then a nonlinear decoder span
        pixels = 3 * size * size
        encoder, decoder = load("pca_ae_encoder.json"), load("pca_ae_decoder.json")
        return encoder[:-1] + [f"PCA_{pixels}_{values}"], [f"PCAInv_{values}_{pixels}", f"Reshape_3_{size}_{size}"] + decoder[2:]
    raise ValueError(family)


def train_autoencoder(family: str, values: int, size: int, data: Path, run: Path, steps: int, lr: float):
    from flexvae.checkpoint import load_run
    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    encoder, decoder = structures(family, values, size)
    (run.parent / f"{run.name}_enc.json").write_text(json.dumps(encoder))
    (run.parent / f"{run.name}_dec.json").write_text(json.dumps(decoder))
    cfg = load_config(ROOT / "configs" / PRESET.get(family, "config.toml"), [
        f"data.path={data}", f"data.image_size={size}", "data.flip=true", f"train.out_dir={run}",
        f"train.max_steps={steps}", f"train.save_every={steps}", f"train.sample_every={steps}", "train.device=cpu",
        "data.num_workers=0", "train.fit_prior=0", "model.latent=deterministic", f"train.lr={lr}",
        f"train.warmup_steps={min(200, steps // 10)}", "train.batch_size=16", "train.ema=false",
        f"train.init_images={len(list(data.glob('*.png')))}",  # a PCA layer sees every crop, as the PCA row does
        f"model.encoder={run.parent / f'{run.name}_enc.json'}", f"model.decoder={run.parent / f'{run.name}_dec.json'}"])
    tick = time.perf_counter()
    Trainer(cfg, None, quiet=True).train()
    seconds = time.perf_counter() - tick
    return load_run(run).vae, seconds


# --- scores ---------------------------------------------------------------------------------------------

def lpips_scorer():
    """LPIPS (AlexNet) where the package and its weights are here; else (None, why)."""
    try:
        from flexvae.perceptual import load_perceptual

        return load_perceptual("alex"), None
    except Exception as exc:  # no lpips package, or no weights offline: the full reason on stderr
        print(f"note: no LPIPS: {exc}", file=sys.stderr)
        return None, "the lpips package or its AlexNet weights are not on this machine"


def scores(recon: np.ndarray, test: np.ndarray, lpips=None) -> dict:
    from flexvae.metrics import psnr, ssim

    a, b = torch.from_numpy(np.ascontiguousarray(recon)).float(), torch.from_numpy(test).float()
    row = {"psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean())}
    if lpips is not None:
        with torch.no_grad():
            row["lpips"] = float(lpips(a, b).mean())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--size", type=int, default=32, help="crop side in pixels")
    parser.add_argument("--crops", type=int, default=2000, help="training crops")
    parser.add_argument("--held-out", type=int, default=200, help="held-out crops")
    parser.add_argument("--shrink", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rate_distortion"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run in seconds (CI): 64 values, 20 steps")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.sizes, args.crops, args.held_out = 20, [64], 64, 16
    start("bench_rate_distortion", args.threads)
    torch.manual_seed(0)
    started, load = time.perf_counter(), load_text()
    lpips, lpips_note = lpips_scorer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "crops"
        train, args.sources = training_crops(args.size, args.crops, data, args.shrink)
        test = held_out_crops(args.size, args.shrink, args.held_out)
        args.held_out = len(test)  # at most --held-out: the two photos hold so many
        print(f"{len(train)} training crops of {args.sources}; {len(test)} held-out crops of {args.size} px; "
              f"{args.threads} threads, {load}", flush=True)
        for values in args.sizes:
            for family in args.families:
                vae, seconds = train_autoencoder(family, values, args.size, data, Path(tmp) / f"{family}_{values}",
                                                 args.steps, args.lr)
                with torch.no_grad():
                    recon = torch.cat([vae.reconstruct(torch.from_numpy(test[i:i + 64]))
                                       for i in range(0, len(test), 64)]).numpy()
                params = sum(p.numel() for p in vae.parameters())
                rows.append({"values": values, "method": family, **scores(recon, test, lpips),
                             "note": f"{params / 1e6:.1f}M parameters, {args.steps} steps, {seconds:.0f} s"})
                print(rows[-1], flush=True)
            reconstruction = pca_reconstruct(as_trained(train), test, values)
            rows.append({"values": values, "method": "PCA", **scores(reconstruction, test, lpips),
                         "note": f"fitted on the {len(train)} training crops and their mirror images"})
            if "vit" in args.families and values % (args.size // 8) ** 2 == 0:
                per_patch = values // (args.size // 8) ** 2
                rows.append({"values": values, "method": "PCA, 8 px blocks",
                             **scores(block_pca_reconstruct(as_trained(train), test, per_patch, 8), test, lpips),
                             "note": f"{per_patch} per block: the ViT latent's layout"})
            images, payload, fitted = jpeg_reconstruct(test, values)
            rows.append({"values": values, "method": "JPEG", **scores(images, test, lpips),
                         "note": f"{payload:.0f} bytes of data per image on average; {fitted:.0%} fit in {values}"})
            print(*(row for row in rows if row["values"] == values and row["method"] not in args.families), flush=True)
    write_results(args, rows, lpips_note, time.perf_counter() - started, load)
    return 0


def command_line() -> str:
    """This run's options, less ``--out`` (a path of this machine)."""
    words, skip = [], False
    for word in sys.argv[1:]:
        if not skip and not word.startswith("--out"):
            words.append(" " + word)
        skip = word == "--out"
    return "".join(words)


def write_results(args, rows: list, lpips_note, seconds: float, load: float) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Rate against distortion on held-out photo crops", "",
             f"`python bench/bench_rate_distortion.py{command_line()}` (one run: {seconds:.0f} s on "
             f"{platform.machine()} with {args.threads} threads, {load} at the start, "
             f"{load_text()} at the end). {args.crops} training crops of {args.size} px from "
             f"{args.sources}, shrunk {args.shrink}x, colour channels in a random order; held-out: "
             f"{args.held_out} crops of scikit-learn's sample photos (shrunk {args.shrink}x). "
             f"Autoencoders: {args.steps} steps each, deterministic latent, mean squared error. "
             f"Higher PSNR and SSIM are better" + (", lower LPIPS" if lpips_note is None else
                                                    f"; LPIPS not computed ({lpips_note})") + ".", "",
             "| latent values | method | PSNR (dB) | SSIM |" + (" LPIPS |" if lpips_note is None else "") + " note |",
             "|---|---|---|---|" + ("---|" if lpips_note is None else "") + "---|"]
    for row in rows:
        lpips = f" {row['lpips']:.3f} |" if "lpips" in row else ""
        lines.append(f"| {row['values']} | {row['method']} | {row['psnr']:.2f} | {row['ssim']:.3f} |{lpips} "
                     f"{row['note']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot (matplotlib is missing: pip install 'flexvae[plots]')", file=sys.stderr)
        return
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        for axis, key in zip(axes, ("psnr", "ssim")):
            axis.plot([r["values"] for r in mine], [r[key] for r in mine], marker="o", label=method)
    for axis, label in zip(axes, ("PSNR (dB)", "SSIM")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("latent values per image (JPEG: bytes)")
        axis.set_ylabel(label)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    sys.exit(main())
