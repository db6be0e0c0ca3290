"""The VAE: encoder stack -> latent -> decoder stack, with typed outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .forward_state import ForwardState, group_kls
from .latents.base import DiscreteLatent, Latent, Posterior
from .layers.latent_groups import LatentGroup

# What the decoder outputs: image values, Bernoulli logits, or logistic-mixture parameters.
OUTPUTS = ("value", "logits", "mixture")


class Stack(nn.Sequential):
    """A built token list. ``forward`` returns the output; ``forward_aux`` also returns the
    auxiliary losses of layers registered with ``aux=True`` (quantizers), by name. Both take
    ``context``: the pass's forward_state.ForwardState (labels, kept activations, latent groups)
    for the layers that read it; labels alone (or None) are wrapped in one.

    Gradient checkpointing (recompute activations in the backward pass instead of storing
    them) applies to segments: ``"marked"`` uses the structure's '@' tokens and
    "@begin"/"@end" spans, ``"blocks"`` also every residual and attention block. Layers with
    auxiliary outputs are never recomputed (a quantizer's codebook update must run once).
    """

    def __init__(self, modules, aux_flags=None, checkpoint_groups=None, context_kinds=None):
        super().__init__(*modules)
        count = len(self)
        self.aux_flags = tuple(aux_flags or (False,) * count)
        self.has_aux = any(self.aux_flags)
        # Layers that also take the pass's ForwardState: context tokens (kind "labels", they read
        # the labels), Keep ("keep") and latent groups ("group"); see forward_state.py.
        kinds = tuple(context_kinds or (None,) * count)
        self.context_flags = tuple(kind is not None for kind in kinds)
        self.has_context = any(self.context_flags)
        self.takes_labels = "labels" in kinds
        self.checkpoint_groups = tuple(checkpoint_groups or (None,) * count)
        self.grad_checkpointing = "off"

    def segments(self, mode: str) -> list[tuple[int, int, bool]]:
        """(start, end, recompute) runs of consecutive layers for a checkpointing mode."""
        groups = []
        for index, (module, group, is_aux) in enumerate(zip(self, self.checkpoint_groups, self.aux_flags)):
            if is_aux or mode == "off":
                group = None
            elif group is None and mode == "blocks" and getattr(module, "checkpoint_unit", False):
                group = f"block{index}"
            groups.append(group)
        out, start = [], 0
        for index in range(1, len(groups) + 1):
            if index == len(groups) or groups[index] != groups[start] or groups[start] is None:
                out.append((start, index, groups[start] is not None))
                start = index
        return out

    def forward_aux(self, x, context=None):
        """(output, auxiliary losses of the ``aux`` layers by name) for input ``x``."""
        if not isinstance(context, ForwardState):  # labels alone (or none): the pass's state is one object
            context = ForwardState(labels=context)
        aux = {}
        recompute_allowed = self.grad_checkpointing != "off" and self.training and torch.is_grad_enabled()
        mode = self.grad_checkpointing if recompute_allowed else "off"
        if mode == "off":  # one run of every layer (no segments to work out)
            return self._run(x, 0, len(self), context, aux), aux
        from torch.utils.checkpoint import checkpoint

        for start, end, recompute in self.segments(mode):
            if recompute:
                x = checkpoint(self._run, x, start, end, context, use_reentrant=False)
            else:
                x = self._run(x, start, end, context, aux)
        return x, aux

    def _run(self, x, start: int, end: int, context=None, aux: dict | None = None):
        """Layers start..end-1; the auxiliary losses of aux layers go into ``aux`` (never recomputed)."""
        layers = list(self._modules.values())  # (indexing a Sequential walks it: O(n) a layer)
        for index in range(start, end):
            if self.aux_flags[index]:
                x, losses = layers[index](x)
                aux.update({f"{name}_{index}": value for name, value in losses.items()})
            elif self.context_flags[index]:
                x = layers[index](x, context)
            else:
                x = layers[index](x)
        return x

    def forward(self, x, context=None):
        if self.has_aux or self.has_context or self.grad_checkpointing != "off":
            return self.forward_aux(x, context)[0]
        return super().forward(x)


@dataclass
class VAEOutput:
    """What ``VAE.forward`` returns: the decoder output, the top latent's posterior and its
    draw ``z``, auxiliary losses of quantizers, and a hierarchy's group posteriors by name."""

    recon: torch.Tensor  # decoder output: values, or logits when the loss is bce
    posterior: Posterior
    z: torch.Tensor  # the raw latent the decoder saw
    aux: dict = field(default_factory=dict)  # auxiliary losses by name (quantizers)
    groups: dict = field(default_factory=dict)  # the decoder's latent groups' GroupPosteriors by name

    def kl(self) -> torch.Tensor:
        """The model's KL per sample: the top latent's plus every group's."""
        kl = self.posterior.kl().float()
        extra = group_kls(self.groups)
        return kl if extra is None else kl + extra.float()


class VAE(nn.Module):
    """``encode`` gives a posterior over raw latents, ``decode`` maps raw latents to outputs.

    Scaled latents (what ``-e`` writes and what a diffusion model would see) are
    ``scaling_factor * raw``; ``encode_latents``/``decode_latents`` convert. The prior of
    the KL term is N(0, I) on raw latents, or the learned prior ``prior`` (priors/: a mixture, a
    VampPrior, a flow; its KL the Monte Carlo estimate), and ``sample_prior`` decodes its draws
    (discrete latents: codes drawn uniformly, see ``latent.sample_prior``).

    A conditional model (context tokens in a stack, or a latent with a class part such as
    ``mixed``) takes class labels: indices (B,) with -1 for "no label", or class weights
    (B, K). ``class_names`` lists the K classes in index order (from the training data).
    """

    def __init__(self, encoder: Stack, decoder: Stack, latent: Latent, latent_shape,
                 scaling_factor: float = 1.0, output: str = "value", likelihood=None):
        super().__init__()
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {scaling_factor}")
        if likelihood is not None:
            output = likelihood.output
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.encoder = encoder
        self.latent = latent
        self.decoder = decoder
        self.latent_shape = tuple(latent_shape)
        self.scaling_factor = float(scaling_factor)
        self.output = output
        # The decoder likelihood of an ELBO model (likelihoods.py), with its learned scales.
        self.likelihood = likelihood
        self.balance = None  # learned loss weights (losses.LossBalance), set by assemble.build_model
        self.class_names: tuple[str, ...] | None = None  # the labels' classes, set by assemble.build_model
        self.prior = None  # a learned prior of the top latent (priors/), set by assemble.build_model; None: N(0, I)

    @property
    def classes(self) -> int | None:
        """How many classes a conditional model knows (None for an unconditional one)."""
        return None if self.class_names is None else len(self.class_names)

    @property
    def takes_labels(self) -> bool:
        """Whether labels change what the model does (context tokens or a class latent)."""
        return self.encoder.takes_labels or self.decoder.takes_labels or self.latent.class_count is not None

    @property
    def groups(self) -> list[str]:
        """The names of the decoder's latent groups (Z tokens), top-down; empty for a flat model."""
        return [m.name for m in self.decoder if isinstance(m, LatentGroup)]

    def _encode(self, x, step: int | None = None, labels=None, state: ForwardState | None = None):
        state = state if state is not None else ForwardState(labels=labels)
        h, aux = self.encoder.forward_aux(x, state)
        return (self.latent(h) if step is None else self.latent(h, step=step)), aux

    def encode(self, x: torch.Tensor, labels=None):
        """q(z|x) of the top latent; ``labels`` reach the encoder's context tokens (a class latent
        still infers its class)."""
        return self._encode(x, labels=labels)[0]

    def decode(self, z: torch.Tensor, labels=None, state: ForwardState | None = None) -> torch.Tensor:
        """Decoder output for raw latents ``z``; a hierarchical decoder's groups take their prior
        means (temperature 0), or what ``state`` says (its kept encoder activations, given values)."""
        state = state if state is not None else ForwardState(labels=labels, temperature=0.0)
        return self.decoder(z, state)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                step: int | None = None, noise: torch.Tensor | None = None, labels=None,
                group_noise: dict | None = None) -> VAEOutput:
        """``step`` (the optimizer step, passed by the trainer) reaches the latent, whose
        schedules may use it (the categorical latent's temperature). ``noise``: the latent's
        sampling noise (shape ``latent.noise_shape``), when the caller draws it (the trainer
        does, so results do not depend on how a batch is split across processes). ``labels``
        (indices, -1 = none) reach the context tokens, and the posterior observes them: a
        supervised class latent uses the known class of a labelled image. ``group_noise``: the
        decoder's latent groups' standard normal noise by name (drawn by the trainer too)."""
        state = ForwardState(labels=labels, sample=sample, noise=group_noise, generator=generator)
        posterior, aux = self._encode(x, step, labels, state)
        if labels is not None:
            posterior.observe(labels)
        z = posterior.sample(generator=generator, noise=noise) if sample else posterior.mode()
        if self.prior is not None:  # its KL: the Monte Carlo estimate at this z
            posterior = self.prior.posterior(posterior, z, self)
        recon, decoder_aux = self.decoder.forward_aux(z, state)
        # Quantizer tokens' losses are named <loss>_<layer index>; the prefix keeps the
        # encoder's and the decoder's apart.
        aux = {**{f"enc_{k}": v for k, v in aux.items()}, **posterior.aux_losses(),
               **{f"dec_{k}": v for k, v in decoder_aux.items()}}
        return VAEOutput(recon, posterior, z, aux, state.posteriors)

    def metrics(self) -> dict:
        """Non-loss diagnostics of the quantizers (codebook usage, perplexity) by name, as
        floats: the latent's under their own names, quantizer tokens' as enc_/dec_<name>_<index>."""
        found = dict(self.latent.metrics())
        for part in (self.likelihood, self.balance):
            if part is not None:
                found.update(part.metrics())
        for prefix, stack in (("enc", self.encoder), ("dec", self.decoder)):
            for index, module in enumerate(stack):
                if hasattr(module, "metrics"):
                    found.update({f"{prefix}_{k}_{index}": v for k, v in module.metrics().items()})
        return found

    def set_grad_checkpointing(self, mode: str) -> None:
        """'off', 'marked' ('@' tokens and spans) or 'blocks' (also every VAERB/VAEA)."""
        if mode not in ("off", "marked", "blocks"):
            raise ValueError(f"grad checkpointing must be off, marked or blocks, got {mode!r}")
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = mode

    def to_image(self, recon: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image values in [-1, 1]."""
        return self.loss_image(recon).clamp(-1, 1)

    def loss_image(self, recon: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image values, differentiable and not clamped (for image-space losses)."""
        if self.likelihood is not None:
            return self.likelihood.image(recon)
        if self.output == "logits":
            return torch.sigmoid(recon) * 2 - 1
        return recon

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """Images decoded from the posterior means of ``x``, in [-1, 1]."""
        return self.to_image(self.reconstruct_raw(x, labels)[0])

    def reconstruct_raw(self, x: torch.Tensor, labels=None):
        """(decoder output, top posterior, ForwardState) of the posterior means of every group."""
        state = ForwardState(labels=labels, sample=False)
        posterior = self._encode(x, labels=labels, state=state)[0]
        return self.decode(posterior.mode(), state=state), posterior, state

    @torch.no_grad()
    def partial_posterior(self, x: torch.Tensor, k: int, generator=None, temperature: float | dict = 1.0,
                          labels=None) -> torch.Tensor:
        """Images whose first ``k`` latent groups (the top latent is group 0, then the decoder's
        groups top-down) are the posterior means for ``x`` and whose other groups are drawn from
        the prior at ``temperature``: k = 0 is a prior sample, k = all groups the reconstruction."""
        if not 0 <= k <= 1 + len(self.groups):
            raise ValueError(f"k must lie in [0, {1 + len(self.groups)}] (the top latent and "
                             f"{len(self.groups)} decoder groups), got {k}")
        if k == 0:
            return self.sample_prior(x.shape[0], generator=generator, labels=labels, temperature=temperature)
        state = ForwardState(labels=labels, sample=False, posterior_groups=k - 1, temperature=temperature,
                             generator=generator)
        posterior = self._encode(x, labels=labels, state=state)[0]
        return self.to_image(self.decode(posterior.mode(), state=state))

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor, sample: bool = False, generator=None, labels=None) -> torch.Tensor:
        """Scaled latents of ``x`` (posterior means, or draws with ``sample``), for use outside
        training (no gradient, like ``decode_latents`` and ``sample_prior``; ``encode`` keeps one)."""
        return self.encode_with_codes(x, sample, generator, labels)[0]

    def encode_with_codes(self, x: torch.Tensor, sample: bool = False, generator=None, labels=None):
        """(scaled latents, integer codes) where the latent is discrete; codes are None otherwise."""
        return self.encode_for_files(x, sample, generator, labels)[:2]

    def encode_for_files(self, x: torch.Tensor, sample: bool = False, generator=None, labels=None):
        """(scaled latents, integer codes or None, class probabilities (B, K) of a class latent or
        None, a hierarchy's group values by name (raw; posterior means, or draws with ``sample``))."""
        state = ForwardState(labels=labels, sample=sample, generator=generator)
        posterior = self._encode(x, labels=labels, state=state)[0]
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        codes = self.latent.codes(posterior, z) if self.is_discrete else None
        probs = self.latent.class_probs(posterior) if self.latent.class_count is not None else None
        if self.groups:  # the groups are drawn in the decoder, from the state the top latent starts
            self.decode(z, state=state)
        return z * self.scaling_factor, codes, probs, dict(state.values)

    @torch.no_grad()
    def class_probs(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """q(class | x), (B, K), of a latent with a class part (the mixed latent); the columns
        follow ``class_names``. ValueError for a latent without one."""
        if self.latent.class_count is None:
            raise ValueError(f"a {self.latent.kind} latent has no class part; its model gives no class probabilities")
        posterior = self._encode(x, labels=labels, state=ForwardState(labels=labels))[0]
        return self.latent.class_probs(posterior)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes of a discrete latent -> decoder output."""
        if not self.is_discrete:
            raise ValueError(f"a {self.latent.kind} latent has no integer codes")
        return self.decode(self.latent.decode_codes(codes))

    @property
    def is_discrete(self) -> bool:
        """Whether the latent has integer codes (``encode_with_codes``, ``decode_codes``)."""
        return isinstance(self.latent, DiscreteLatent)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, labels=None) -> torch.Tensor:
        """The decoder's output for scaled latents, without gradient (``decode`` keeps one); the
        caller's tensor stays as it was."""
        return self.decode(latents / self.scaling_factor, labels)

    fitted_prior = None  # a fitted_prior.FittedPrior, attached by load_run when the run has one

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None, labels=None,
                     temperature: float | dict = 1.0, prior: str = "auto") -> torch.Tensor:
        """``n`` images from the prior; ``labels`` (n class indices or (n, K) class weights) make
        them samples of those classes. A conditional model without labels draws classes uniformly.
        ``temperature`` scales the prior's standard deviation of the decoder's latent groups (one
        value, or one per group name; "top" names a Gaussian top latent). ``prior``: "auto" (the
        fitted prior when one is attached, else the model's own: N(0, I) or its learned prior,
        ``model.prior``), "fitted" or "model"."""
        if prior not in ("auto", "fitted", "model"):
            raise ValueError(f"prior must be 'auto', 'fitted' or 'model', got {prior!r}")
        if prior == "fitted" and self.fitted_prior is None:
            raise ValueError("this model has no fitted prior (fit one: fit-prior, or fitted_prior.fit_prior)")
        device = next(self.parameters()).device
        if labels is not None:
            labels = self.check_labels(labels, n).to(device)
        elif self.takes_labels and self.classes:
            labels = torch.randint(0, self.classes, (n,), generator=generator, device=device)
        state = ForwardState(labels=labels, temperature=temperature, generator=generator)
        top = state.temperature_of("top")
        if self.fitted_prior is not None and prior != "model":
            indices = None if labels is None or labels.dim() == 1 else labels.argmax(1)
            z = self.fitted_prior.sample(n, generator=generator, device=device,
                                         labels=labels if indices is None else indices, temperature=top)
            return self.to_image(self.decode(z, state=state))
        if self.prior is not None:
            z = self.prior.sample(n, self, generator=generator, device=device, temperature=top)
            return self.to_image(self.decode(z, state=state))
        z = self.latent.sample_prior(n, self.latent_shape, generator=generator, device=device)
        if top != 1.0 and self.latent.noise_kind == "normal" and self.latent.class_count is None:
            z = z * top
        if labels is not None:
            z = self.latent.with_labels(z, labels)
        return self.to_image(self.decode(z, state=state))

    def check_labels(self, labels, n: int | None = None) -> torch.Tensor:
        """``labels`` as a tensor this model takes, or ValueError saying why not."""
        if not self.takes_labels or not self.classes:
            raise ValueError("this model takes no labels: it has no context tokens and no class latent")
        labels = torch.as_tensor(labels)
        if n is not None and labels.shape[0] != n:
            raise ValueError(f"{labels.shape[0]} labels for {n} samples")
        if not labels.is_floating_point() and labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < -1 or high >= self.classes:
                raise ValueError(f"labels must be class indices in [0, {self.classes - 1}] (or -1 for none), "
                                 f"found [{low}, {high}]")
        return labels
