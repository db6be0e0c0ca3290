"""Vector quantization (VQ-VAE): each position's channel vector snaps to its nearest codebook entry.

    z_q = e_k,  k = argmin_j ||z_e - e_j||^2            (per position, over channels)
    loss = commitment * ||z_e - sg(z_q)||^2  [+ ||sg(z_e) - z_q||^2 when the codebook is learned by gradient]
    decoder input = z_e + sg(z_q - z_e)                (straight-through: gradients reach the encoder)

With ``decay > 0`` the codebook is not trained by gradient but follows an exponential moving
average of the vectors assigned to each code (Laplace-smoothed counts), updated in training
mode only. Codes whose moving-average use per training batch falls below ``dead_threshold``
times an even share (batch vectors / codebook size) are restarted from random encoder
outputs of the current batch; ``kmeans_init`` runs a few
Lloyd iterations on the first training batch to place the codebook. Codebook usage (the
fraction of codes used in the last ``usage_window`` training batches) and the perplexity of
the last batch's assignments are reported by ``metrics()``; they are never loss terms.

Under torch.distributed (DDP, more than one process) a training batch is the global batch:
the per-batch code counts and vector sums are summed over processes before they update the
moving averages, the usage record and the perplexity; restarted codes take rank 0's picks
and k-means starts from rank 0's samples and runs on the global batch. Every replica thus
applies the same update and keeps the same codebook. (A codebook learned by gradient needs
nothing more: DDP averages its gradients.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..fields import NON_NEGATIVE, POSITIVE, UNIT_CLOSED_OPEN, setting
from .quantized import QuantizedLatent
from .registry import register_latent

USAGE_DECAY_WITHOUT_EMA = 0.99  # how fast usage counts forget when the codebook is learned by gradient


def _squared_distances(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances, in float32 even under autocast
    (a half-precision matmul would pick the wrong nearest code)."""
    flat, codebook = flat.float(), codebook.float()
    if flat.is_meta:
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
    with torch.autocast(flat.device.type, enabled=False):
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)


def _world_size() -> int:
    """Processes sharing the codebook: more than one only in an initialized torch.distributed group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_across_processes(counts: torch.Tensor, sums: torch.Tensor | None):
    """All-reduce (sum) per-code counts (K,) and, when given, vector sums (K, D) in one call."""
    packed = torch.cat([counts.unsqueeze(1)] + ([sums] if sums is not None else []), dim=1)
    dist.all_reduce(packed)
    return packed[:, 0], (packed[:, 1:] if sums is not None else None)


class VectorQuantizer(nn.Module):
    """Quantizes channel-first maps (B, D, *spatial) against a codebook of ``codebook_size`` x ``dim``.

    ``forward`` returns ``(z_q, codes, losses)``: the straight-through quantized map, the
    integer codes (B, *spatial) and the loss terms by name.
    """

    receptive_margin = 0  # each position quantized on its own (tiling: receptive.py)

    def __init__(self, codebook_size: int, dim: int, commitment: float = 0.25, decay: float = 0.99,
                 dead_threshold: float = 0.0, kmeans_init: bool = False, kmeans_iters: int = 10,
                 usage_window: int = 100, eps: float = 1e-5):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"codebook size and dimension must be positive, got {codebook_size} and {dim}")
        if commitment < 0:
            raise ValueError(f"the commitment weight must be >= 0, got {commitment}")
        if not 0 <= decay < 1:
            raise ValueError(f"the EMA decay must be in [0, 1) (0 = learn the codebook by gradient), got {decay}")
        if dead_threshold < 0:
            raise ValueError(f"the dead-code threshold must be >= 0, got {dead_threshold}")
        self.codebook_size, self.dim = int(codebook_size), int(dim)
        self.commitment, self.decay, self.dead_threshold = float(commitment), float(decay), float(dead_threshold)
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), int(kmeans_iters)
        self.usage_window, self.eps = int(usage_window), float(eps)
        initial = torch.randn(self.codebook_size, self.dim)
        if self.ema:
            self.register_buffer("embedding", initial)
        else:
            self.embedding = nn.Parameter(initial)
        # EMA statistics: vectors assigned per batch and their sum, both starting at zero (their
        # ratio, the code's new value, then needs no bias correction). A code that has never
        # received a vector keeps its initial value.
        self.register_buffer("cluster_size", torch.zeros(self.codebook_size))
        self.register_buffer("embed_sum", torch.zeros(self.codebook_size, self.dim))
        self.register_buffer("initialized", torch.tensor(not self.kmeans_init))
        # Diagnostics only (not saved): training batches seen, last batch each code was used in.
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("last_used", torch.full((self.codebook_size,), -1, dtype=torch.long),
                             persistent=False)
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)

    @property
    def ema(self) -> bool:
        return self.decay > 0

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, dim={self.dim}, commitment={self.commitment}, "
                f"decay={self.decay}, dead_threshold={self.dead_threshold}, kmeans_init={self.kmeans_init}")

    # ------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor):
        if z.dim() < 2 or z.shape[1] != self.dim:
            raise ValueError(
                f"VQ with code dimension {self.dim} needs {self.dim} channels, got shape {tuple(z.shape[1:])}"
            )
        channels_last = z.movedim(1, -1)
        flat = channels_last.reshape(-1, self.dim)
        measure = not z.is_meta  # the builder's shape trace runs on meta tensors: no statistics there
        update = self.training and measure
        with torch.no_grad():
            flat_f = flat.detach().float()
            if update and self.kmeans_init and not bool(self.initialized):
                self._kmeans(flat_f)
            codes = _squared_distances(flat_f, self.embedding.detach().float()).argmin(dim=1)
        z_q = F.embedding(codes, self.embedding).view(channels_last.shape).movedim(-1, 1).to(z.dtype)
        losses = {"vq_commit": self.commitment * F.mse_loss(z.float(), z_q.detach().float())}
        if not self.ema:
            losses["vq_codebook"] = F.mse_loss(z_q.float(), z.detach().float())
        out = z + (z_q - z).detach()
        if measure:
            with torch.no_grad():
                counts = torch.bincount(codes, minlength=self.codebook_size).float()
                if update:
                    counts = self._update(flat_f, codes, counts)
                probs = counts / counts.sum().clamp_min(1)
                self.perplexity.copy_(torch.exp(-(probs * probs.clamp_min(1e-10).log()).sum()))
        return out, codes.view(channels_last.shape[:-1]), losses

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (B, *spatial) -> codebook vectors as a channel-first map (B, D, *spatial)."""
        return F.embedding(codes.long(), self.embedding).movedim(-1, 1)

    # ------------------------------------------------------------ training state
    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One training batch's update; returns the batch's code counts (summed over processes
        under torch.distributed, like every statistic used here)."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat) if self.ema else None
        vectors = flat.shape[0]
        if _world_size() > 1:
            # The global batch's statistics, identical on every replica.
            counts, sums = _sum_across_processes(counts, sums)
            vectors = counts.sum()
        self.calls += 1
        self.last_used.copy_(torch.where(counts > 0, self.calls, self.last_used))
        if self.ema:
            self.cluster_size.lerp_(counts, 1 - self.decay)
            self.embed_sum.lerp_(sums, 1 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total  # Laplace
            updated = self.embed_sum / smoothed.unsqueeze(1)
            self.embedding.copy_(torch.where((self.cluster_size > 0).unsqueeze(1), updated, self.embedding))
        else:
            self.cluster_size.lerp_(counts, 1 - USAGE_DECAY_WITHOUT_EMA)
        if self.dead_threshold > 0:
            self._restart_dead(flat, vectors)
        return counts

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, vectors) -> None:
        """A code is dead when its moving-average use per batch falls below ``dead_threshold``
        times an even share (``vectors``, the batch's vector count, / codebook size); it then
        takes the value of a random encoder output of this batch (of rank 0's share under
        torch.distributed). Written without a data-dependent branch (no device sync)."""
        threshold = self.dead_threshold * vectors / self.codebook_size
        dead = self.cluster_size < threshold
        fresh = flat[torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)]
        if _world_size() > 1:
            dist.broadcast(fresh, src=0)  # the random picks differ per process: all take rank 0's
        self.embedding.copy_(torch.where(dead.unsqueeze(1), fresh, self.embedding))
        self.cluster_size.copy_(torch.where(dead, threshold, self.cluster_size))
        self.embed_sum.copy_(torch.where(dead.unsqueeze(1), fresh * threshold, self.embed_sum))

    @torch.no_grad()
    def _kmeans(self, flat: torch.Tensor) -> None:
        """A few Lloyd iterations on one batch of encoder outputs, started from random samples
        (under torch.distributed: rank 0's samples, and iterations over the global batch)."""
        n = flat.shape[0]
        if n >= self.codebook_size:
            pick = torch.randperm(n, device=flat.device)[:self.codebook_size]
        else:
            pick = torch.randint(0, n, (self.codebook_size,), device=flat.device)
        centers = flat[pick].clone()
        distributed = _world_size() > 1
        if distributed:
            dist.broadcast(centers, src=0)
        counts = torch.zeros(self.codebook_size, device=flat.device)
        for _ in range(self.kmeans_iters):
            assign = _squared_distances(flat, centers).argmin(dim=1)
            counts = torch.bincount(assign, minlength=self.codebook_size).float()
            sums = torch.zeros_like(centers).index_add_(0, assign, flat)
            if distributed:
                counts, sums = _sum_across_processes(counts, sums)
            centers = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1), centers)
        self.embedding.copy_(centers)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centers * counts.unsqueeze(1))
        self.initialized.fill_(True)

    # -------------------------------------------------------------- diagnostics
    def usage(self) -> float:
        """Fraction of codes used at least once in the last ``usage_window`` training batches."""
        recent = (self.last_used >= 0) & (self.calls - self.last_used < self.usage_window)
        return float(recent.float().mean())

    def metrics(self) -> dict:
        """Codebook usage and perplexity (exp of the entropy of the last batch's code histogram)."""
        return {"vq_usage": self.usage(), "vq_perplexity": float(self.perplexity)}


@dataclass(frozen=True)
class VQParams:
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


@register_latent("vq", VQParams, doc="vector quantization against a learned codebook")
class VQLatent(QuantizedLatent):
    """The encoder outputs ``code_dim`` channels per position; each position becomes one of
    ``codebook_size`` codes (log2(codebook_size) bits per position)."""

    def __init__(self, codebook_size: int = 512, code_dim: int = 4, commitment: float = 0.25,
                 ema_decay: float = 0.99, dead_threshold: float = 0.1, kmeans_init: bool = False):
        super().__init__()
        self.quantizer = VectorQuantizer(codebook_size, code_dim, commitment, ema_decay, dead_threshold,
                                         kmeans_init)
