"""FID: the Frechet distance between Inception-v3 pool features (2,048 values) of two image
sets, through torch-fidelity (the optional ``fid`` extra).

Why torch-fidelity: its Inception is the TensorFlow graph of the original FID code ported
bit-for-bit (same weights, same bilinear resize to 299 px), so its numbers compare with
published FIDs; it takes a local weights file, so it runs offline; it is maintained. Its own
loader unpickles that file without restriction, so flexvae reads the file itself with
``torch.load(weights_only=True)``, checks it, and hands torch-fidelity a copy holding only the
checked tensors.

The weights file is ``weights-inception-2015-12-05-6726825d.pth``; it is looked for in torch's
hub cache (``$TORCH_HOME/hub/checkpoints``), or given with ``--inception FILE``. Offline and
without it, one line says where to put it.

Every result records its protocol (``protocol``): the images' size (the model's data
preprocessing: resize and centre crop to data.image_size), their count, 8-bit rounding, grey
images repeated to three channels, the resize inside the network, mean or sampled latents, and
the SHA-256 of the weights file, so that two FIDs can be compared.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import FlexVAEError
from .judge import frechet_distance

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
FEATURE = "2048"
MAX_WEIGHT_VALUES = 50_000_000  # Inception-v3 holds about 24 million


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _require_fidelity():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise FlexVAEError("FID needs torch-fidelity: pip install -e '.[fid]' (or pip install torch-fidelity)") from None
    return FeatureExtractorInceptionV3


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Inception:
    """torch-fidelity's Inception-v3 with checked local weights: ``features(images)`` (N, 2048)."""

    def __init__(self, weights=None, device="cpu"):
        cls = _require_fidelity()
        path = Path(weights) if weights else default_weights_path()
        if not path.is_file():
            raise FlexVAEError(f"FID needs the Inception-v3 weights file {INCEPTION_FILE}: {path} does not exist. "
                               f"Download {INCEPTION_URL} on a machine with internet and put it at {path}, or name "
                               "it with --inception FILE")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FlexVAEError(f"{path}: not a weights file of tensors ({str(exc).splitlines()[0][:200]})") from None
        if (not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state.items())
                or sum(v.numel() for v in state.values()) > MAX_WEIGHT_VALUES):
            raise FlexVAEError(f"{path}: not an Inception-v3 state dict (names -> tensors)")
        self.sha256 = _sha256(path)
        self.path = path
        # torch-fidelity loads its file with a plain pickle: give it a copy of the checked tensors
        with tempfile.TemporaryDirectory() as tmp:
            checked = os.path.join(tmp, "inception.pth")
            torch.save({k: v.clone() for k, v in state.items()}, checked)
            try:
                self.net = cls("inception-v3-compat", [FEATURE], feature_extractor_weights_path=checked).to(device)
            except RuntimeError as exc:  # missing or mis-shaped tensors
                raise FlexVAEError(f"{path}: not the Inception-v3 of torch-fidelity "
                                   f"({str(exc).splitlines()[0][:200]})") from None
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, images, batch: int = 32) -> np.ndarray:
        """Pool features of images (N, C, H, W) in [-1, 1]: rounded to 8 bits, grey repeated to RGB."""
        images = torch.as_tensor(images)
        out = []
        for start in range(0, len(images), batch):
            x = images[start:start + batch].float()
            x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            elif x.shape[1] != 3:
                raise FlexVAEError(f"FID takes grey or RGB images, these have {x.shape[1]} channels")
            out.append(self.net(x.to(self.device))[0].double().cpu())
        return torch.cat(out).numpy()

    def protocol(self, images: int, image_size, latents: str | None = None) -> dict:
        return {"feature_network": "Inception-v3 pool3 (2048), torch-fidelity inception-v3-compat",
                "weights": str(self.path), "weights_sha256": self.sha256,
                "images": int(images), "image_size": list(image_size),
                "preprocessing": "the model's: resize and centre crop to data.image_size",
                "rounding": "8-bit", "resize": "bilinear to 299 px inside the network (TensorFlow 1 compatible)",
                "grey": "repeated to three channels", **({"latents": latents} if latents else {})}


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Frechet distance of two Inception feature sets (float64)."""
    return frechet_distance(features_a, features_b)
