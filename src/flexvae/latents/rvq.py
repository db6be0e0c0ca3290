"""Residual vector quantization (RVQ; Zeghidour et al. 2021, SoundStream; Lee et al. 2022,
RQ-VAE): ``levels`` codebooks quantize in turn what the ones before left over.

    r_0 = z,  c_l = nearest code of codebook l to r_l,  r_{l+1} = r_l - c_l,  z_q = c_0 + ... + c_{L-1}

Each level is a ``VectorQuantizer`` (vq.py: EMA codebook, dead-code restarts, k-means start),
fed its residual without gradient; the encoder gets the straight-through gradient of the sum
and a commitment loss per level, averaged (``rvq_commit``). A position's integer code is the
mixed-radix number of its level codes (level 0 the lowest digit), so a position is one of
codebook_size^levels codes and -e / -d handle it as any quantized latent. Usage and perplexity
are logged per level's codebook, averaged over the levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fields import NON_NEGATIVE, POSITIVE, UNIT_CLOSED_OPEN, setting
from .quantized import QuantizedLatent
from .registry import register_latent
from .vq import VectorQuantizer

MAX_CODE_BITS = 62  # the combined code of a position is an int64


class ResidualQuantizer(nn.Module):
    """``levels`` VectorQuantizers on successive residuals; ``forward(z) -> (z_q, codes, losses)``."""

    receptive_margin = 0  # each position quantized on its own (tiling: receptive.py)

    def __init__(self, levels: int, codebook_size: int, dim: int, commitment: float = 0.25, decay: float = 0.99,
                 dead_threshold: float = 0.1, kmeans_init: bool = False):
        super().__init__()
        if levels < 1 or codebook_size < 2:
            raise ValueError(f"RVQ needs at least 1 level and 2 codes, got {levels} and {codebook_size}")
        if (codebook_size ** levels).bit_length() > MAX_CODE_BITS:
            raise ValueError(f"{codebook_size}^{levels} codes do not fit in a 64-bit code; use fewer levels")
        self.levels, self.codebook_size, self.dim = int(levels), int(codebook_size), int(dim)
        self.num_codes = self.codebook_size ** self.levels
        self.quantizers = nn.ModuleList(
            VectorQuantizer(codebook_size, dim, commitment, decay, dead_threshold, kmeans_init) for _ in range(levels))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}, dim={self.dim}"

    def forward(self, z: torch.Tensor):
        residual = z.detach()
        total = torch.zeros_like(z)
        codes = None
        commit, codebook = [], []
        for level, quantizer in enumerate(self.quantizers):
            _, level_codes, losses = quantizer(residual)
            chosen = quantizer.lookup(level_codes).to(z.dtype)
            total = total + chosen
            residual = residual - chosen
            codes = level_codes * self.codebook_size ** level + (0 if codes is None else codes)
            if "vq_codebook" in losses:  # a codebook learned by gradient: pull code l to the residual it took
                codebook.append(losses["vq_codebook"])
            commit.append(quantizer.commitment * F.mse_loss(z.float(), (z.detach() - residual).float()))
        losses = {"rvq_commit": torch.stack(commit).mean()}
        if codebook:
            losses["rvq_codebook"] = torch.stack(codebook).mean()
        return z + (total - z).detach(), codes, losses

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (B, *spatial) -> the sum of each level's code vector, (B, dim, *spatial)."""
        codes = codes.long()
        total = None
        for quantizer in self.quantizers:
            part = quantizer.lookup(codes % self.codebook_size)
            total = part if total is None else total + part
            codes = torch.div(codes, self.codebook_size, rounding_mode="floor")
        return total

    def metrics(self) -> dict:
        usage = [q.usage() for q in self.quantizers]
        perplexity = [float(q.perplexity) for q in self.quantizers]
        return {"rvq_usage": sum(usage) / len(usage), "rvq_perplexity": sum(perplexity) / len(perplexity)}


@dataclass(frozen=True)
class RVQParams:
    rvq_levels: int = setting(4, "rvq: codebooks applied in turn to what the ones before left over", POSITIVE)
    codebook_size: int = setting(512, "vq: codebook entries (log2 of it = bits per latent position)", POSITIVE)
    code_dim: int = setting(4, "vq: code dimension; the encoder's last layer outputs this many channels", POSITIVE)
    commitment: float = setting(0.25, "vq: commitment loss weight beta in beta * |z_e - sg(z_q)|^2", NON_NEGATIVE)
    ema_decay: float = setting(
        0.99, "vq: EMA decay of the codebook updates; 0 = learn the codebook by gradient (adds a codebook loss)",
        UNIT_CLOSED_OPEN)
    dead_threshold: float = setting(
        0.1, "vq: restart codes whose average use falls below this fraction of an even share "
             "(batch vectors / codebook size) from random encoder outputs; 0 = never", NON_NEGATIVE)
    kmeans_init: bool = setting(False, "vq: initialise the codebook by k-means on the first training batch")


@register_latent("rvq", RVQParams, doc="residual vector quantization: rvq_levels codebooks in turn")
class RVQLatent(QuantizedLatent):
    """The encoder outputs ``code_dim`` channels per position; each position becomes
    ``rvq_levels`` codes, one per codebook, combined into one integer."""

    requantizes_exactly = False  # greedy residual quantization of a decoded sum may pick other codes

    def __init__(self, rvq_levels: int = 4, codebook_size: int = 512, code_dim: int = 4, commitment: float = 0.25,
                 ema_decay: float = 0.99, dead_threshold: float = 0.1, kmeans_init: bool = False):
        super().__init__()
        self.quantizer = ResidualQuantizer(rvq_levels, codebook_size, code_dim, commitment, ema_decay,
                                           dead_threshold, kmeans_init)
