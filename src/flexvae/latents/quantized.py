"""What the discrete latents (vq, fsq) share: a posterior holding integer codes and the
bookkeeping that turns codes into decoder inputs and back."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..utils import format_shape
from .base import DiscreteLatent, PointPosterior, check_code_range


class QuantizedPosterior(PointPosterior):
    """A quantized code: sampling and the mode both return the quantized value (with a
    straight-through gradient to the encoder), the KL term is zero, and ``codes`` holds the
    integer index of every position, shape (B, *spatial)."""

    def __init__(self, value: torch.Tensor, codes: torch.Tensor, losses: dict | None = None,
                 pre_quant: torch.Tensor | None = None):
        super().__init__(value)
        self.codes = codes
        self.losses = dict(losses or {})
        self.pre_quant = pre_quant  # the encoder's output before quantization

    def aux_losses(self) -> dict:
        return self.losses


class QuantizedLatent(DiscreteLatent):
    """Base of the quantized latents. A subclass holds ``self.quantizer`` (with
    ``forward(z) -> (z_q, codes, losses)``, ``num_codes``, ``lookup(codes)``, ``dim`` and
    ``metrics()``) and words what the encoder must output in build errors via ``_requirement``."""

    def _requirement(self, dim: int) -> str:
        return f"a {self.kind} latent with code dimension {dim} needs {dim}"

    def latent_shape(self, encoder_shape: tuple[int, ...]) -> tuple[int, ...]:
        channels, dim = encoder_shape[0], self.quantizer.dim
        if channels != dim:
            raise ValueError(
                f"the encoder outputs {channels} channels (shape {format_shape(encoder_shape)}), "
                f"but {self._requirement(dim)}; make the last layer output {dim} channels"
            )
        return tuple(encoder_shape)

    def forward(self, h: torch.Tensor, step: int | None = None) -> QuantizedPosterior:
        z_q, codes, losses = self.quantizer(h)
        return QuantizedPosterior(z_q, codes, losses, pre_quant=h)

    # ------------------------------------------------------------ integer codes
    def code_shape(self, latent_shape) -> tuple[int, ...]:
        """Per-sample shape of the integer codes: one code per position."""
        return tuple(latent_shape[1:])

    def codes(self, posterior, z: torch.Tensor | None = None) -> torch.Tensor:
        """Integer codes (B, *spatial); a sample ``z`` of a quantized posterior is its mode."""
        return posterior.codes

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (B, *spatial) -> the raw latent (B, C, *spatial) the decoder takes."""
        return self.quantizer.lookup(check_code_range(codes, self.quantizer.num_codes))

    def sample_prior(self, n, latent_shape, generator=None, device=None) -> torch.Tensor:
        """Discrete latents have a uniform prior: every code of every position is equally likely."""
        codes = torch.randint(0, self.quantizer.num_codes, (n, *self.code_shape(latent_shape)),
                              generator=generator, device=device)
        return self.quantizer.lookup(codes)

    def metrics(self) -> dict:
        return self.quantizer.metrics()


class CodeUsage(nn.Module):
    """Codebook usage and perplexity of a quantizer without a codebook table (fsq, lfq, bsq):
    the distinct codes of the last ``window`` training batches over the number of codes, and
    exp of the entropy of the last batch's code histogram. Not saved (a diagnostic)."""

    def __init__(self, num_codes: int, window: int = 100, max_codes: int = 1 << 20):
        super().__init__()
        self.num_codes, self.window, self.max_codes = int(num_codes), int(window), int(max_codes)
        self.recent: list = []
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        flat = codes.detach().reshape(-1)
        values, counts = torch.unique(flat, return_counts=True)
        probs = counts.double() / counts.sum()
        self.perplexity.copy_(torch.exp(-(probs * probs.log()).sum()).to(self.perplexity.dtype))
        self.recent.append(values.cpu())
        while len(self.recent) > self.window or sum(len(v) for v in self.recent) > self.max_codes:
            self.recent.pop(0)

    def metrics(self, prefix: str) -> dict:
        used = len(torch.unique(torch.cat(self.recent))) if self.recent else 0
        return {f"{prefix}_usage": used / self.num_codes, f"{prefix}_perplexity": float(self.perplexity)}
