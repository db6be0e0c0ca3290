"""Decoder likelihoods p(x | z) of the ELBO objective, in nats per image.

Images live in [-1, 1]; 8-bit images sit on a grid of 256 levels 2/255 apart. The decoder
outputs the likelihood's parameters (``param_channels`` channels per position):

- ``gaussian``: mean; the scale sigma is fixed (``loss.scale_value``), learned (one value
  or one per channel) or ``optimal``: the batch's maximum-likelihood sigma,
  sigma^2 = mean squared error (the calibrated decoder of sigma-VAE). By the envelope
  theorem its gradient is zero at that optimum, so it is used detached; a running average
  of it is kept for evaluation, where a fixed sigma makes the density a proper one.
- ``laplace``: mean, with a scale b handled the same way (optimal b = mean absolute error).
- ``bernoulli``: logits of pixel values (x + 1) / 2 in [0, 1] (a proper likelihood only for
  binary images).
- ``logistic_mixture``: the discretized logistic mixture of PixelCNN++ and VDVAE: K
  components, each with a mean and a log scale per channel, channel c's mean shifted by
  tanh coefficients times channels 0..c-1 of x; a probability mass over the 256 levels.

Bits per dimension are NLL / (D ln 2) of a probability mass over the 256 levels:
``log_mass`` is ``log_prob`` for the logistic mixture and Bernoulli; for the Gaussian and
Laplace it is the mass of each value's bin, [x - 1/255, x + 1/255] (the lowest and highest
levels take the tails beyond them), computed from the CDF in float64. A density times the bin
width would overstate a sharp decoder's likelihood (its bits/dim go negative below one grey
level of noise); a mass never exceeds 1, so bits/dim stay at or above 0.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

GREY_LEVELS_PER_UNIT = 127.5  # 8-bit grey levels per unit of x in [-1, 1]
LOG_SCALE_MIN = -6.0  # sigma >= 0.0025, a third of a grey level: keeps the density finite
HALF_BIN = 1.0 / 255  # half the distance between two 8-bit levels in [-1, 1]
RUNNING_MOMENTUM = 0.01
SCALES = ("fixed", "learned", "channel", "optimal")
# name -> Likelihood class; each class registers itself with @register_likelihood beside its code.
LIKELIHOODS: dict[str, type] = {}


def register_likelihood(name: str):
    """Class decorator: ``loss.likelihood = name`` builds this class with ``from_settings``."""
    def decorator(cls):
        if name in LIKELIHOODS and LIKELIHOODS[name] is not cls:
            raise ValueError(f"likelihood {name!r} is already registered by {LIKELIHOODS[name].__module__}")
        cls.name = name
        LIKELIHOODS[name] = cls
        return cls
    return decorator


class _LowerBound(torch.autograd.Function):
    """``x.clamp(min=bound)`` whose gradient still reaches ``x`` below the bound when it would
    raise ``x`` (a descent step moves x by minus the gradient): a learned log scale that fell
    under the bound can come back, and is never pushed further down."""

    @staticmethod
    def forward(ctx, x, bound: float):
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp(min=bound)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.where((x < ctx.bound) & (grad > 0), torch.zeros_like(grad), grad), None


def lower_bound(x: torch.Tensor, bound: float) -> torch.Tensor:
    return _LowerBound.apply(x, bound)


class Likelihood(nn.Module):
    """log p(x | decoder output), per image; ``image`` turns the output into an image."""

    name = ""
    output = "value"  # what the decoder outputs: 'value', 'logits' or 'mixture'
    is_mass = False  # a probability mass over 8-bit levels rather than a density
    proper = True  # a normalised likelihood; False: a criterion of the weighted objective (mse, l1, bce)

    @classmethod
    def from_settings(cls, channels: int, loss) -> "Likelihood":
        """Built from the [loss] settings (``loss.scale``, ``loss.scale_value`` ...)."""
        return cls()

    def param_channels(self, channels: int) -> int:
        return channels

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image(self, params: torch.Tensor) -> torch.Tensor:
        """Differentiable image values (not clamped): what perceptual and adversarial terms see."""
        return params

    def metrics(self) -> dict:
        return {}

    def log_mass(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log P(x's 8-bit levels | decoder output) per image: ``log_prob`` of a mass likelihood."""
        return self.log_prob(params, x)

    def bits_per_dim(self, nll_nats, dims: int):
        """Bits per dimension of an NLL under ``log_mass`` (nats per image)."""
        return nll_nats / (dims * math.log(2))


class _ScaledLikelihood(Likelihood):
    """A location-scale likelihood whose mean is the decoder output."""

    def __init__(self, channels: int, scale: str = "learned", scale_value: float = 0.1):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        if not scale_value > 0:
            raise ValueError(f"scale_value must be positive, got {scale_value}")
        self.scale = scale
        start = max(math.log(scale_value), LOG_SCALE_MIN)
        if scale == "learned":
            self.log_scale = nn.Parameter(torch.full((1,), start))
        elif scale == "channel":
            self.log_scale = nn.Parameter(torch.full((channels,), start))
        elif scale == "optimal":
            self.register_buffer("running_log_scale", torch.full((1,), start))
        else:
            self.register_buffer("fixed_log_scale", torch.full((1,), start))

    @classmethod
    def from_settings(cls, channels, loss):
        return cls(channels, loss.scale, loss.scale_value)

    def batch_log_scale(self, error: torch.Tensor) -> torch.Tensor:
        """The maximum-likelihood log scale of this batch's errors (x - mean)."""
        raise NotImplementedError

    global_log_scale = None  # set by ``using_global_scale`` for the micro-batches of a split step

    @contextlib.contextmanager
    def using_global_scale(self, log_scale: torch.Tensor | None):
        """The optimal scale of the whole global batch for every micro-batch of one step
        (train/global_batch.py); its running average moves once, as an unsplit step moves it."""
        if log_scale is None or self.scale != "optimal":
            yield
            return
        with torch.no_grad():
            self.running_log_scale.lerp_(log_scale.to(self.running_log_scale), RUNNING_MOMENTUM)
        self.global_log_scale = log_scale.to(self.running_log_scale)
        try:
            yield
        finally:
            self.global_log_scale = None

    def current_log_scale(self, error: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Log scale broadcastable to ``error`` (B, C, *spatial); ``update``: in training, an
        optimal scale moves its running average (once per step: the loss's call)."""
        if self.scale == "optimal":
            if self.training and self.global_log_scale is not None:  # a micro-batch of a split step
                value = self.global_log_scale
            elif self.training:
                batch = self.batch_log_scale(error.detach()).clamp(min=LOG_SCALE_MIN).view(1)
                if update:
                    with torch.no_grad():
                        self.running_log_scale.lerp_(batch, RUNNING_MOMENTUM)
                value = batch
            else:
                value = self.running_log_scale
        elif self.scale == "fixed":
            value = self.fixed_log_scale
        else:
            value = lower_bound(self.log_scale, LOG_SCALE_MIN)
        if value.numel() > 1:  # one per channel
            return value.view(1, -1, *([1] * (error.dim() - 2)))
        return value.view(*([1] * error.dim()))

    def metrics(self) -> dict:
        if self.scale == "optimal":
            return {"scale": math.exp(float(self.running_log_scale))}
        if self.scale == "fixed":
            return {}
        values = self.log_scale.detach().clamp(min=LOG_SCALE_MIN).exp()
        return {"scale": float(values.mean())}


    def log_mass(self, params, x):
        error = x.float() - params.float()
        log_scale = self.current_log_scale(error, update=False).detach()
        return discretized_log_mass(self.name, params, x, log_scale)


def _log_cdf(name: str, t: torch.Tensor) -> torch.Tensor:
    """log CDF of the standard Gaussian or Laplace at ``t`` (float64)."""
    if name == "gaussian":
        return torch.special.log_ndtr(t)
    return torch.where(t < 0, t + math.log(0.5), torch.log1p(-0.5 * torch.exp(-t.clamp(min=0))))


def discretized_log_mass(name: str, mean: torch.Tensor, x: torch.Tensor, log_scale) -> torch.Tensor:
    """Per image, the log probability (float64) that a ``name`` ('gaussian' or 'laplace')
    distribution of ``mean`` and ``exp(log_scale)`` gives each value's 8-bit bin: [x - 1/255,
    x + 1/255], the lowest level from minus infinity, the highest to plus infinity."""
    mean, x = mean.double(), x.double()
    scale = torch.as_tensor(log_scale, dtype=torch.float64, device=x.device).exp()
    low = torch.where(x < -1 + HALF_BIN, -math.inf, (x - HALF_BIN - mean) / scale)
    high = torch.where(x > 1 - HALF_BIN, math.inf, (x + HALF_BIN - mean) / scale)
    # both distributions are symmetric: a bin right of the centre is measured as its mirror image,
    # so the CDF differences are always taken in the lower tail, where they keep their precision
    right = low > 0
    low, high = torch.where(right, -high, low), torch.where(right, -low, high)
    log_high, log_low = _log_cdf(name, high), _log_cdf(name, low)
    log_bin = log_high + torch.log(-torch.expm1((log_low - log_high).clamp(max=0)))
    return log_bin.flatten(1).sum(1)


@register_likelihood("gaussian")
class Gaussian(_ScaledLikelihood):

    def batch_log_scale(self, error):
        return 0.5 * error.float().pow(2).mean().clamp(min=1e-12).log()

    def log_prob(self, params, x):
        error = x.float() - params.float()
        log_scale = self.current_log_scale(error)
        ll = -0.5 * (error * torch.exp(-log_scale)).pow(2) - log_scale - 0.5 * math.log(2 * math.pi)
        return ll.flatten(1).sum(1)


@register_likelihood("laplace")
class Laplace(_ScaledLikelihood):

    def batch_log_scale(self, error):
        return error.float().abs().mean().clamp(min=1e-12).log()

    def log_prob(self, params, x):
        error = x.float() - params.float()
        log_scale = self.current_log_scale(error)
        ll = -error.abs() * torch.exp(-log_scale) - log_scale - math.log(2)
        return ll.flatten(1).sum(1)


@register_likelihood("bernoulli")
class Bernoulli(Likelihood):
    output = "logits"
    is_mass = True

    def log_prob(self, params, x):
        target = (x.float() + 1) / 2
        return -F.binary_cross_entropy_with_logits(params.float(), target, reduction="none").flatten(1).sum(1)

    def image(self, params):
        return torch.sigmoid(params) * 2 - 1


@register_likelihood("logistic_mixture")
class LogisticMixture(Likelihood):
    """Discretized mixture of logistics over 256 levels (see the module docstring).

    Decoder output channels, in order: K mixture logits, C*K means, C*K log scales and
    C(C-1)/2*K coefficients (pairs (1,0), (2,0), (2,1), ...), each block laid out (C, K).
    """

    output = "mixture"
    is_mass = True

    def __init__(self, channels: int, components: int = 10):
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be at least 1, got {components}")
        self.channels, self.components = channels, components
        self.pairs = channels * (channels - 1) // 2

    @classmethod
    def from_settings(cls, channels, loss):
        return cls(channels, loss.mixture_components)

    def param_channels(self, channels: int) -> int:
        return self.components * (1 + 2 * channels + channels * (channels - 1) // 2)

    def _split(self, params):
        """(logits (B,K,*S), means (B,C,K,*S), log scales (B,C,K,*S), coeffs (B,P,K,*S))."""
        c, k = self.channels, self.components
        params = params.float()
        spatial = params.shape[2:]
        logits = params[:, :k]
        means = params[:, k:k + c * k].unflatten(1, (c, k))
        log_scales = params[:, k + c * k:k + 2 * c * k].unflatten(1, (c, k)).clamp(min=-7.0)
        coeffs = torch.tanh(params[:, k + 2 * c * k:]).reshape(params.shape[0], self.pairs, k, *spatial)
        return logits, means, log_scales, coeffs

    def _channel_means(self, means, coeffs, x):
        """Means of every channel given earlier channels' values ``x`` (B, C, *S)."""
        shifted = []
        for c in range(self.channels):
            mean = means[:, c]
            for j in range(c):
                mean = mean + coeffs[:, c * (c - 1) // 2 + j] * x[:, j].unsqueeze(1)
            shifted.append(mean)
        return torch.stack(shifted, dim=1)

    def log_prob(self, params, x):
        logits, means, log_scales, coeffs = self._split(params)
        x = x.float()
        means = self._channel_means(means, coeffs, x)
        value = x.unsqueeze(2)  # (B, C, 1, *S)
        centered = value - means
        inv_scale = torch.exp(-log_scales)
        plus, minus = inv_scale * (centered + HALF_BIN), inv_scale * (centered - HALF_BIN)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the mass below the top level
        log_survival_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)): the mass above the bottom
        bin_mass = torch.sigmoid(plus) - torch.sigmoid(minus)
        middle = inv_scale * centered
        # Where a bin's mass underflows, the density at its centre times its width.
        log_density_mass = middle - log_scales - 2 * F.softplus(middle) - math.log(GREY_LEVELS_PER_UNIT)
        log_bin = torch.where(bin_mass > 1e-5, torch.log(bin_mass.clamp(min=1e-12)), log_density_mass)
        log_level = torch.where(value < -0.999, log_cdf_plus, torch.where(value > 0.999, log_survival_minus, log_bin))
        log_components = log_level.sum(1) + F.log_softmax(logits, dim=1)  # (B, K, *S)
        return torch.logsumexp(log_components, dim=1).flatten(1).sum(1)

    def image(self, params):
        """The mixture's mean. Within component k, channel c is its location plus the k-th
        coefficients times channels 0..c-1 drawn from the same component, so its mean uses that
        component's own means of the earlier channels; the components' means are then weighted."""
        logits, means, _, coeffs = self._split(params)
        weights = F.softmax(logits, dim=1)  # (B, K, *S)
        within = []  # per channel: each component's mean, (B, K, *S)
        for c in range(self.channels):
            mean = means[:, c]
            for j in range(c):
                mean = mean + coeffs[:, c * (c - 1) // 2 + j] * within[j]
            within.append(mean)
        return torch.stack([(weights * mean).sum(1) for mean in within], dim=1)


def make_likelihood(name: str, channels: int, scale: str = "learned", scale_value: float = 0.1,
                    components: int = 10) -> Likelihood:
    """The registered likelihood ``name`` for images of ``channels`` channels."""
    from types import SimpleNamespace

    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; expected one of {', '.join(LIKELIHOODS)}")
    settings = SimpleNamespace(scale=scale, scale_value=scale_value, mixture_components=components)
    return LIKELIHOODS[name].from_settings(channels, settings)


# ------------------------------------------------------------------ the weighted objective's criteria
class Criterion(Likelihood):
    """A reconstruction loss of the weighted objective in the likelihood interface: it says what the
    decoder outputs and how that becomes an image, and ``loss`` is its per-element mean. Not a
    normalised likelihood (``proper = False``): -eval scores such a model with a discretized
    Gaussian of --nll-sigma (or a Bernoulli for logits), and the elbo objective refuses it."""

    proper = False

    def loss(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, params, x):
        raise TypeError(f"{self.name} is a criterion of the weighted objective, not a likelihood")


@register_likelihood("mse")
class MeanSquaredError(Criterion):
    def loss(self, params, x):
        return F.mse_loss(params.float(), x.float())


@register_likelihood("l1")
class MeanAbsoluteError(Criterion):
    def loss(self, params, x):
        return F.l1_loss(params.float(), x.float())


@register_likelihood("bce")
class BinaryCrossEntropy(Criterion):
    """Binary cross-entropy of pixel values (x + 1) / 2 in [0, 1] against logits."""

    output = "logits"

    def loss(self, params, x):
        return F.binary_cross_entropy_with_logits(params.float(), (x.float() + 1) / 2)

    def image(self, params):
        return torch.sigmoid(params.float()) * 2 - 1
