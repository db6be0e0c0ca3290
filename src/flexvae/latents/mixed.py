"""A mixed latent: a diagonal Gaussian part (the style) and one categorical variable over the
classes (the class), at once: Kingma et al.'s M2 semi-supervised VAE, AE-LEGO's Hydra idea.

The encoder outputs 2c + K channels at every position: c means, c log-variances, then K
class logits, which are averaged over the positions into one categorical variable per image.
The decoder sees c + K channels: the Gaussian sample, then the class as a one-hot (hard) or
softmax (soft) Gumbel-softmax sample, repeated over every position. The temperature follows
the categorical latent's schedule (``tau_start``, ``tau_min``, ``tau_rate``).

KL: the Gaussian part's KL to N(0, I) plus the class part's KL to a uniform prior over K.

Supervision (``classify_weight`` > 0): for an image whose label is known (``observe``), the
decoder gets that class and the loss gets ``classify_weight`` times the cross-entropy of
q(y|x) against it (summed over the batch's labelled images, divided by the batch size, so a
run with 10% of labels wants a weight about ten times larger for the same pull per labelled
image); the class part's KL is left out for those images, as y is observed, not inferred. Unlabelled images infer their class. With
``classify_weight = 0`` labels are only used for the logged agreement (``label_acc``,
``label_purity``).

Sampling noise is one normal vector per image (the Gaussian part's values, then K more turned
into uniform values by the normal CDF for the Gumbel draws), so the trainer draws it for the
global batch like a Gaussian latent's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fields import NON_NEGATIVE, POSITIVE, setting
from ..utils import format_shape
from .base import Latent, Posterior, batch_sum, sum_positions
from .categorical import gumbel_softmax, temperature
from .gaussian import DiagonalGaussian
from .registry import register_latent


def _spread(v: torch.Tensor, spatial) -> torch.Tensor:
    """(B, K) -> (B, K, *spatial), the same values at every position."""
    return v.view(*v.shape, *([1] * len(spatial))).expand(*v.shape, *spatial)


class MixedPosterior(Posterior):
    def __init__(self, gaussian: DiagonalGaussian, logits: torch.Tensor, tau: float, hard: bool,
                 classify_weight: float):
        self.gaussian, self.logits = gaussian, logits  # logits (B, K)
        self.tau, self.hard, self.classify_weight = tau, hard, classify_weight
        self.labels: torch.Tensor | None = None

    @property
    def classes(self) -> int:
        return self.logits.shape[1]

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.gaussian.mean.shape[2:])

    @property
    def probs(self) -> torch.Tensor:
        """q(y|x), (B, K)."""
        return F.softmax(self.logits.float(), dim=1)

    def _join(self, gaussian: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return torch.cat([gaussian, _spread(classes.to(gaussian.dtype), self.spatial)], dim=1)

    @property
    def mean(self) -> torch.Tensor:
        return self._join(self.gaussian.mean, self.probs)

    def observe(self, labels: torch.Tensor) -> None:
        self.labels = labels.to(self.logits.device).long()

    def _known(self) -> torch.Tensor | None:
        """Rows whose class is given (supervised and labelled), as a bool mask; None when none."""
        if self.labels is None or self.classify_weight <= 0:
            return None
        known = self.labels >= 0
        return known if bool(known.any()) else None

    def _with_known(self, classes: torch.Tensor) -> torch.Tensor:
        known = self._known()
        if known is None:
            return classes
        one_hot = F.one_hot(self.labels.clamp(min=0), self.classes).to(classes.dtype)
        return torch.where(known[:, None], one_hot, classes)

    def sample(self, generator=None, noise=None) -> torch.Tensor:
        """``noise``: (B, Gaussian values + K) standard normal values, drawn from ``generator`` unless given."""
        count = self.gaussian.mean[0].numel()
        if noise is None:
            noise = torch.randn((self.logits.shape[0], count + self.classes), generator=generator,
                                device=self.logits.device)
        noise = noise.to(self.logits.device, torch.float32)
        z = self.gaussian.sample(noise=noise[:, :count].view(self.gaussian.mean.shape))
        uniform = torch.special.ndtr(noise[:, count:])
        y = gumbel_softmax(self.logits.float(), uniform, self.tau, self.hard, dim=1)
        return self._join(z, self._with_known(y))

    def mode(self) -> torch.Tensor:
        one_hot = F.one_hot(self.logits.argmax(dim=1), self.classes).float()
        return self._join(self.gaussian.mode(), self._with_known(one_hot))

    def class_kl(self) -> torch.Tensor:
        """KL(q(y|x) || uniform) per class value, (B, K); zero for rows whose class is given."""
        log_q = F.log_softmax(self.logits.float(), dim=1)
        kl = log_q.exp() * (log_q + math.log(self.classes))
        known = self._known()
        return kl if known is None else kl.masked_fill(known[:, None], 0.0)

    def kl_elements(self) -> torch.Tensor:
        positions = max(1, math.prod(self.spatial))
        return self._join(self.gaussian.kl_elements().float(), self.class_kl() / positions)

    def kl_groups(self) -> torch.Tensor:
        """(B, c + 1): each Gaussian channel, then the class variable."""
        return torch.cat([sum_positions(self.gaussian.kl_elements().float()), self.class_kl().sum(1, keepdim=True)],
                         dim=1)

    def variance(self) -> torch.Tensor:
        probs = self.probs
        return self._join(self.gaussian.variance(), probs * (1 - probs))

    def aux_losses(self) -> dict:
        """``classify``: the weighted cross-entropy on the labelled rows, once labels were observed
        (zero for a batch without one, so every batch and process logs the same terms)."""
        if self.labels is None or self.classify_weight <= 0:
            return {}
        known = self._known()
        if known is None:
            return {"classify": self.logits.float().sum() * 0.0}
        # summed over the labelled rows, divided by the batch: like every per-image term, the same
        # whether a batch is split across processes or micro-batches or not
        nll = F.cross_entropy(self.logits.float()[known], self.labels[known], reduction="sum") / len(known)
        return {"classify": self.classify_weight * nll}

    def diagnostics(self) -> dict:
        log_q = F.log_softmax(self.logits.float(), dim=1)
        found = {
            "kl_style": batch_sum(self.gaussian.kl_elements().float()).mean().detach(),
            "kl_class": (log_q.exp() * (log_q + math.log(self.classes))).sum(1).mean().detach(),
            "tau": torch.tensor(float(self.tau)),
        }
        if self.labels is not None:
            found.update(label_agreement(self.logits.detach().argmax(1), self.labels, self.classes))
        return found


def label_agreement(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> dict:
    """Over the labelled rows: ``label_acc`` (predicted class = label) and ``label_purity``
    (the share of rows whose predicted category's most common label is their own: the
    agreement of an unsupervised class part, whose categories need not be in label order).
    NaN when no row is labelled."""
    known = labels >= 0
    count = int(known.sum())
    if count == 0:
        nan = torch.tensor(float("nan"))
        return {"label_acc": nan, "label_purity": nan.clone()}
    predicted, labels = predicted[known].long(), labels[known].long().to(predicted.device)
    table = torch.bincount(predicted * classes + labels, minlength=classes * classes).view(classes, classes)
    return {"label_acc": (predicted == labels).float().mean().cpu(),
            "label_purity": (table.max(dim=1).values.sum().float() / count).cpu()}


@dataclass(frozen=True)
class MixedParams:
    classes: int = setting(0, "mixed: values of the class variable; 0 = the number of classes of data.labels",
                           NON_NEGATIVE)
    classify_weight: float = setting(
        1.0, "mixed: weight of the class part's cross-entropy, summed over labelled images / batch size; "
        "0 = unsupervised", NON_NEGATIVE)
    tau_start: float = setting(1.0, "mixed: Gumbel-softmax temperature at step 0", POSITIVE)
    tau_min: float = setting(0.5, "mixed: lowest temperature, also used outside training", POSITIVE)
    tau_rate: float = setting(1e-3, "mixed: temperature decay per step", NON_NEGATIVE)
    hard: bool = setting(True, "mixed: one-hot class samples with straight-through gradients")


@register_latent("mixed", MixedParams, doc="a Gaussian part and a class variable (M2), optionally supervised by labels")
class MixedLatent(Latent):
    noise_kind = "normal"

    def __init__(self, classes: int = 0, classify_weight: float = 1.0, tau_start: float = 1.0,
                 tau_min: float = 0.5, tau_rate: float = 1e-3, hard: bool = True):
        super().__init__()
        if classes < 2:
            raise ValueError(f"the class variable needs at least 2 classes, got {classes}")
        if not 0 < tau_min <= tau_start or tau_rate < 0:
            raise ValueError(f"need 0 < tau_min <= tau_start and tau_rate >= 0, got "
                             f"tau_min={tau_min}, tau_start={tau_start}, tau_rate={tau_rate}")
        self.class_count = int(classes)
        self.classify_weight = float(classify_weight)
        self.tau_start, self.tau_min, self.tau_rate = float(tau_start), float(tau_min), float(tau_rate)
        self.hard = bool(hard)

    def extra_repr(self) -> str:
        return f"classes={self.class_count}, classify_weight={self.classify_weight}, hard={self.hard}"

    def latent_shape(self, encoder_shape: tuple[int, ...]) -> tuple[int, ...]:
        channels, k = encoder_shape[0], self.class_count
        style = channels - k
        if style < 2 or style % 2:
            raise ValueError(
                f"the encoder outputs {channels} channels (shape {format_shape(encoder_shape)}), but a mixed "
                f"latent with {k} classes needs 2 x c + {k} channels: c means, c log-variances and {k} class "
                f"logits (c >= 1); make the last layer output {max(2, style + style % 2) + k} channels")
        return (style // 2 + k, *encoder_shape[1:])

    def forward(self, h: torch.Tensor, step: int | None = None) -> MixedPosterior:
        k = self.class_count
        mean, logvar = h[:, :-k].chunk(2, dim=1)
        logits = h[:, -k:].flatten(2).mean(2) if h.dim() > 2 else h[:, -k:]
        return MixedPosterior(DiagonalGaussian(mean, logvar), logits,
                              temperature(step, self.tau_start, self.tau_min, self.tau_rate), self.hard,
                              self.classify_weight)

    def noise_shape(self, latent_shape) -> tuple[int, ...]:
        style = (latent_shape[0] - self.class_count) * math.prod(latent_shape[1:])
        return (style + self.class_count,)

    def sample_prior(self, n, latent_shape, generator=None, device=None) -> torch.Tensor:
        """N(0, I) style and a uniformly drawn class."""
        k = self.class_count
        z = torch.randn((n, latent_shape[0] - k, *latent_shape[1:]), generator=generator, device=device)
        classes = torch.randint(0, k, (n,), generator=generator, device=device)
        return torch.cat([z, _spread(F.one_hot(classes, k).float(), latent_shape[1:])], dim=1)

    def with_labels(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Raw latents whose class part is ``labels``: indices (-1 rows keep theirs) or (n, K) weights."""
        k = self.class_count
        if labels.is_floating_point():
            classes = labels[:, :k].to(z.device, z.dtype)
            keep = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        else:
            labels = labels.to(z.device).long()
            classes, keep = F.one_hot(labels.clamp(min=0), k).to(z.dtype), labels < 0
        spread = _spread(classes, z.shape[2:])
        part = torch.where(keep.view(-1, *([1] * (z.dim() - 1))), z[:, -k:], spread)
        return torch.cat([z[:, :-k], part], dim=1)

    def class_probs(self, posterior: MixedPosterior) -> torch.Tensor:
        """q(class | x), (B, K)."""
        return posterior.probs
