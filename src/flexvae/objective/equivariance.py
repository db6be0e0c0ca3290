"""EQ-VAE's equivariance term (Kouzelis et al. 2025, "EQ-VAE: Equivariance Regularized Latent
Space for Improved Generative Image Modeling"): decoding a transformed latent should give the
transformed image, D(tau(z)) ~ tau(x), for scalings and rotations tau. A latent space that
transforms like the image is simpler for a diffusion model to learn, at no cost to
reconstruction.

Each micro-batch draws one tau (seeded by train.seed, the step and the micro-batch, so every
process and a resumed run draw the same): a rotation by a multiple of 90 degrees (``rotate``)
and a downscaling of the latent's grid by s in [``scale``, 1] (antialiased bilinear); the
image is brought to the decoded size the same way. The value is the mean squared error of the
decoded image values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..train.runtime import TERM_STREAM, noise_key
from .term import Arg, Term, register_term

EQUIVARIANCE_STREAM = TERM_STREAM + 1


def _resize(t: torch.Tensor, size) -> torch.Tensor:
    if tuple(t.shape[2:]) == tuple(size):
        return t
    return F.interpolate(t.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


@register_term("Equiv", Arg("scale", float, 0.5, "smallest latent scaling drawn (1 = no scaling)"),
               Arg("rotate", bool, True, "also rotate by multiples of 90 degrees"),
               doc="EQ-VAE: mean squared error between D(tau(z)) and tau(x), tau a random scaling and rotation")
class Equiv(Term):
    log_name = "equiv"

    def __init__(self, scale: float = 0.5, rotate: bool = True):
        super().__init__()
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], found {scale}")
        self.scale, self.rotate = scale, rotate

    def check(self, data_shape, objective):
        if len(data_shape) != 3:
            raise ConfigError(f"the Equiv term needs 2D images; this data has shape {tuple(data_shape)}")

    def check_latent(self, latent_shape):
        if len(latent_shape) != 3:
            raise ConfigError(f"the Equiv term scales and rotates a latent grid (channels x height x width); this "
                              f"model's latent is {' x '.join(map(str, latent_shape))}")

    def transform(self, seed: int, step: int, micro: int) -> tuple[int, float]:
        """(quarter turns, latent scale) of one micro-batch."""
        generator = torch.Generator().manual_seed(noise_key(seed, step, micro, EQUIVARIANCE_STREAM))
        turns = int(torch.randint(0, 4, (), generator=generator)) if self.rotate else 0
        scale = self.scale + (1 - self.scale) * float(torch.rand((), generator=generator))
        return turns, scale

    def forward(self, batch):
        turns, scale = self.transform(batch.seed, batch.step, batch.micro)
        z = batch.out.z
        if scale < 1:
            size = [max(1, round(side * scale)) for side in z.shape[2:]]
            z = _resize(z, size).to(batch.out.z.dtype)
        z = torch.rot90(z, turns, dims=(-2, -1))
        with batch.autocast():
            decoded = batch.model.decode(z, labels=batch.labels)
        image = batch.model.loss_image(decoded).float()
        target = _resize(torch.rot90(batch.x, turns, dims=(-2, -1)), image.shape[2:])
        return F.mse_loss(image, target.float())
