"""Binary quantizers: lookup-free (LFQ) and binary spherical (BSQ) quantization.

Each of ``bits`` channels of a position is quantized to its sign, so a position is one of
2^bits codes (bit i of the code is channel i > 0) with no codebook to look up or learn.

- LFQ (Yu et al. 2023, MAGVIT-v2): q = sign(z) in {-1, +1}^bits.
- BSQ (Zhao et al. 2024): the position's vector is first projected to the unit sphere,
  u = z / |z|, then q = sign(u) / sqrt(bits), which lies on the sphere too; the quantization
  error is bounded, which keeps training stable at large codebooks.

Both pass gradients straight through (q + the input - stop_gradient(input)) and add

- ``<kind>_commit``: commitment * |x - sg(q)|^2 (x = z for LFQ, u for BSQ);
- ``<kind>_entropy``: entropy_weight * (E[H(q(c | x))] - diversity * H(E[q(c | x)])), with the
  soft assignment q(c | x) proportional to exp(-|x - c|^2 / entropy_temperature) over the
  codes c. It factorises over the bits: bit i is +1 with probability sigmoid(4 x_i s / T)
  (s = 1 for LFQ, 1/sqrt(bits) for BSQ), so the per-position entropy is the exact sum of the
  bits' binary entropies, with no 2^bits enumeration. The codebook entropy H(E[q]) is taken
  as the sum of the bits' marginal entropies over the batch: an upper bound of the joint
  entropy, equal to it when the bits are independent. Low per-position entropy makes each
  code confident; high codebook entropy spreads the batch over all codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fields import NON_NEGATIVE, POSITIVE, setting
from .quantized import CodeUsage, QuantizedLatent
from .registry import register_latent

MAX_BITS = 48  # codes are int64; 2^48 codes is far beyond any codebook in use


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in nats, elementwise (p kept 1e-6 inside (0, 1) so the gradient stays finite)."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def binary_entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(sigmoid(l)) = softplus(l) - sigmoid(l) l, stable for any l (sharp temperatures saturate p)."""
    return F.softplus(logits) - torch.sigmoid(logits) * logits


class BinaryQuantizer(nn.Module):
    """Quantizes channel-first maps (B, bits, *spatial); ``forward`` returns ``(q, codes, losses)``."""

    receptive_margin = 0  # each position quantized on its own (tiling: receptive.py)

    def __init__(self, bits: int, spherical: bool = False, commitment: float = 0.25, entropy_weight: float = 0.1,
                 diversity: float = 1.0, entropy_temperature: float = 0.01):
        super().__init__()
        if not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be from 1 to {MAX_BITS}, got {bits}")
        self.bits, self.spherical = int(bits), bool(spherical)
        self.kind = "bsq" if spherical else "lfq"
        self.commitment, self.entropy_weight = float(commitment), float(entropy_weight)
        self.diversity, self.temperature = float(diversity), float(entropy_temperature)
        self.scale = 1 / math.sqrt(bits) if spherical else 1.0
        self.num_codes = 2 ** self.bits
        self.register_buffer("_powers", 2 ** torch.arange(self.bits, dtype=torch.long), persistent=False)
        self.usage = CodeUsage(self.num_codes)

    @property
    def dim(self) -> int:
        return self.bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}, spherical={self.spherical}"

    def _shape(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.view(1, -1, *([1] * (ndim - 2)))

    def forward(self, z: torch.Tensor):
        if z.dim() < 2 or z.shape[1] != self.bits:
            raise ValueError(f"{self.kind.upper()} with {self.bits} bits needs {self.bits} channels, "
                             f"got shape {tuple(z.shape[1:])}")
        x = z.float()
        if self.spherical:
            x = F.normalize(x, dim=1)
        hard = torch.where(x > 0, 1.0, -1.0) * self.scale
        q = x + (hard - x).detach()  # straight through
        codes = self.codes_of(hard)
        losses = {f"{self.kind}_commit": self.commitment * F.mse_loss(x, hard)}
        if self.entropy_weight > 0:
            logits = 4 * x * self.scale / self.temperature  # (B, bits, *S): P(bit = +1) = sigmoid(logits)
            per_position = binary_entropy_of_logits(logits).sum(1).mean()
            marginal = torch.sigmoid(logits).transpose(0, 1).reshape(self.bits, -1).mean(1)
            codebook = binary_entropy(marginal).sum()
            losses[f"{self.kind}_entropy"] = self.entropy_weight * (per_position - self.diversity * codebook)
        if self.training:
            self.usage.update(codes)
        return q.to(z.dtype), codes, losses

    def codes_of(self, hard: torch.Tensor) -> torch.Tensor:
        """Signs (B, bits, *spatial) -> integer codes (B, *spatial): bit i set where channel i > 0."""
        return ((hard.detach() > 0).long() * self._shape(self._powers, hard.dim())).sum(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (B, *spatial) -> the quantized map (B, bits, *spatial)."""
        bits = (codes.long().unsqueeze(1) // self._shape(self._powers, codes.dim() + 1)) % 2
        return (bits.float() * 2 - 1) * self.scale

    def metrics(self) -> dict:
        return self.usage.metrics(self.kind)


def _params(kind: str):
    @dataclass(frozen=True)
    class BinaryParams:
        bits: int = setting(18, f"{kind}: bits per position (2^bits codes); the encoder's last layer outputs this "
                                "many channels", POSITIVE)
        commitment: float = setting(0.25, "vq: commitment loss weight beta in beta * |z_e - sg(z_q)|^2",
                                    NON_NEGATIVE)  # one key, one meaning: the vq latent's
        entropy_weight: float = setting(0.1, f"{kind}: weight of the entropy loss (0 = none)", NON_NEGATIVE)
        diversity: float = setting(1.0, f"{kind}: weight of the codebook entropy inside the entropy loss",
                                   NON_NEGATIVE)
        entropy_temperature: float = setting(0.01, f"{kind}: temperature of the soft code assignment", POSITIVE)

    return BinaryParams


LFQParams, BSQParams = _params("lfq, bsq"), _params("lfq, bsq")
LFQParams.__name__ = LFQParams.__qualname__ = "LFQParams"
BSQParams.__name__ = BSQParams.__qualname__ = "BSQParams"


class _BinaryLatent(QuantizedLatent):
    spherical = False

    def __init__(self, bits=18, commitment=0.25, entropy_weight=0.1, diversity=1.0, entropy_temperature=0.01):
        super().__init__()
        self.quantizer = BinaryQuantizer(bits, self.spherical, commitment, entropy_weight, diversity,
                                         entropy_temperature)

    def _requirement(self, dim: int) -> str:
        return f"an {self.kind} latent with {dim} bits needs one channel per bit: {dim}"


@register_latent("lfq", LFQParams, doc="lookup-free quantization: each channel to its sign, 2^bits codes")
class LFQLatent(_BinaryLatent):
    """The encoder outputs ``bits`` channels; each position becomes one of 2^bits codes."""


@register_latent("bsq", BSQParams, doc="binary spherical quantization: signs on the unit sphere, 2^bits codes")
class BSQLatent(_BinaryLatent):
    """The encoder outputs ``bits`` channels; projected to the sphere, each position becomes one of 2^bits codes."""

    spherical = True
