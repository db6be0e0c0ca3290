"""The objective: every loss term of a run, their weights over time, and the discriminator.

Given the model's output and the batch, ``Objective`` returns the VAE-side loss and every logged
term (``ObjectiveOutput``); ``discriminator_step`` trains the discriminator on the same images.
Training, validation and ``-mem`` ask this one object.

The loss of a micro-batch, with w_t(step) each term's scheduled weight (schedule.py):

    elbo objective:      (sum over per-image terms of w_t * t) / D  +  sum over the others of w_t * t
    weighted objective:  sum over the terms of w_t * t

D is the number of values per image: the NLL and KL are in nats per image, so ``NLL`` + ``KL``
with weight 1 is the negative ELBO per dimension and a KL weight beta a beta-VAE. Then every
auxiliary loss of the latent and of quantizer tokens is added, and last the terms that compare
gradients against the rest (``Adv``). A learned balance (weighted objective) trains one
log-weight s per term: w * exp(-s) * term + s.

The terms come from ``loss.terms`` (tokens, see term.py) or, when that is empty, from the
[loss] and [adversarial] keys (legacy.py), which mean exactly what they always meant.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..dsl.grammar import parse_token
from ..errors import ConfigError, StructureError
from .schedule import SCHEDULE_KEYS, Schedule
from .term import TERMS, Term, TermInputs


# The [loss] key that declares each term when loss.terms is empty (legacy.py).
LEGACY_KEYS = {"SSIM": "ssim", "LPIPS": "perceptual_weight", "Sparse": "sparse", "Recon": "recon", "KL": "kl_weight"}


@dataclass
class ObjectiveOutput:
    total: torch.Tensor
    terms: dict  # name -> unweighted scalar tensor (logged)
    kl_weight: float


def _bind(spec, data_shape):
    """(term class, its keyword arguments) of a term token; the schedule keywords set aside."""
    kind = TERMS.get(spec)
    if spec.repeat != 1 or spec.checkpoint is not None:
        raise spec.error("a loss term takes no N* repeat or '@' mark")
    own = dataclasses.replace(spec, kwargs={k: v for k, v in spec.kwargs.items() if k not in SCHEDULE_KEYS})
    return kind, kind.bind(own, data_shape)


class Objective(nn.Module):
    """The loss of a run: ``terms`` (Term modules) with their ``schedules``, in order."""

    def __init__(self, terms: list[Term], schedules: list[Schedule], texts: list[str], objective: str = "weighted",
                 names: list[str] | None = None):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.schedules = list(schedules)
        self.texts = list(texts)  # each term as a token, for the summary and errors
        self.names = list(names or [type(t).token for t in terms])
        self.objective = objective
        if len(set(self.names)) != len(self.names):
            twice = next(n for n in self.names if self.names.count(n) > 1)
            raise ConfigError(f"loss.terms: the {twice} term is declared twice; one term of each kind")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg, data_shape, config_path=None, device=None, dist=None, setup: bool = True,
                    source: str = "loss.terms") -> "Objective":
        """The run's objective: checked against the data, and (``setup``) its networks loaded."""
        from .legacy import legacy_term_tokens

        tokens = list(cfg.loss.terms) or legacy_term_tokens(cfg)
        terms, schedules, names = [], [], []
        for position, text in enumerate(tokens, start=1):
            spec = parse_token(text, source=source, position=position, what="term")
            kind, kwargs = _bind(spec, tuple(data_shape))
            defaults = {}
            if spec.name == "Adv":  # its weight and start default to the [adversarial] keys
                defaults = {"weight": cfg.adversarial.weight, "start": cfg.adversarial.start}
            schedule = Schedule.from_spec(spec, defaults)
            try:
                term = kind.factory(**kwargs, **_context_arguments(kind.factory, cfg))
            except ValueError as exc:  # an argument out of its range
                raise spec.error(str(exc)) from None
            try:
                term.check(tuple(data_shape), cfg.loss.objective)
            except ConfigError as exc:
                if not cfg.loss.terms:  # the term comes from a [loss] key: name the key
                    raise ConfigError(f"loss.{LEGACY_KEYS.get(spec.name, 'objective')}: {exc}") from None
                raise StructureError(str(exc), source=source, position=position, token=text) from None
            terms.append(term)
            schedules.append(schedule)
            names.append(spec.name)
        objective = cls(terms, schedules, tokens, cfg.loss.objective, names)
        if names == ["Adv"] and cfg.adversarial.adaptive:
            raise ConfigError(f"{source}: the Adv term's adaptive weight compares its gradient with the other terms', "
                              "and there are none; add a reconstruction term (e.g. \"Recon\") or set "
                              "adversarial.adaptive = false")
        if setup:
            for term in objective.terms:
                term.setup(device, cfg=cfg, config_path=config_path, data_shape=tuple(data_shape), dist=dist)
        return objective

    def check_latent(self, latent_shape) -> None:
        """Each term against the model's latent (per-sample shape); one line naming the term."""
        for text, term in zip(self.texts, self.terms):
            try:
                term.check_latent(tuple(latent_shape))
            except ConfigError as exc:
                raise ConfigError(f"loss.terms: {text}: {exc}") from None

    # ------------------------------------------------------------------ the loss
    def term(self, name: str) -> Term | None:
        return next((t for n, t in zip(self.names, self.terms) if n == name), None)

    def weight_of(self, name: str, step: int) -> float:
        found = [s for n, s in zip(self.names, self.schedules) if n == name]
        return found[0].weight_at(step) if found else 0.0

    def forward(self, batch: TermInputs, on: set[str] | None = None) -> ObjectiveOutput:
        """The loss of one micro-batch and its logged terms. ``on``: the names of the terms a
        training stage keeps on (None: all); a term that is off is not computed and logs NaN."""
        balance = getattr(batch.model, "balance", None)
        step = batch.step
        logged: dict[str, torch.Tensor] = {}
        per_image, total = None, 0.0
        late = []
        for name, term, schedule in zip(self.names, self.terms, self.schedules):
            if not schedule.active(step) or (on is not None and name not in on):
                logged.update(dict.fromkeys(term.logged(), torch.tensor(math.nan)))
                continue
            if term.needs_rest:
                late.append((term, schedule))
                continue
            value, contribution = self._evaluate(term, schedule, batch, balance)
            if term.per_image and self.objective == "elbo":
                per_image = contribution if per_image is None else per_image + contribution
            else:
                if per_image is not None:  # close the group of per-image terms before it
                    total, per_image = _plus(total, per_image / batch.x[0].numel()), None
                total = total + contribution
            logged[term.log_name] = value
            logged.update(batch.extra)
            batch.extra.clear()
        if per_image is not None:
            total = _plus(total, per_image / batch.x[0].numel())
        for name, value in batch.out.aux.items():
            logged[name] = value.float()
            total = total + logged[name]
        out = batch.out
        logged.update(out.posterior.diagnostics())  # logged, not optimised (per-part KL, temperature ...)
        if out.groups:  # a hierarchy: each group's KL in nats per image, and the top latent's
            logged["kl_top"] = out.posterior.kl().float().mean().detach()
            logged.update({f"kl_{name}": group.kl().float().mean().detach() for name, group in out.groups.items()})
        for term, schedule in late:
            batch.rest = total
            value, contribution = self._evaluate(term, schedule, batch, balance)
            total = total + contribution
            logged[term.log_name] = value.detach()
            logged.update(batch.extra)
            batch.extra.clear()
        return ObjectiveOutput(total, logged, self.weight_of("KL", step))

    @staticmethod
    def _evaluate(term, schedule, batch, balance):
        value = term(batch)
        weight = schedule.weight_at(batch.step)
        if balance is not None and term.log_name in balance.log_weights:
            return value, balance.weigh(term.log_name, weight, value)
        return value, term.contribution(weight, value, batch)

    # ------------------------------------------------------------------ the discriminator
    @property
    def adversary(self):
        term = self.term("Adv")
        return None if term is None else term.adversary

    def adversarial_active(self, step: int, on: set[str] | None = None) -> bool:
        found = [s for n, s in zip(self.names, self.schedules) if n == "Adv"]
        return bool(found) and found[0].active(step) and (on is None or "Adv" in on)

    def discriminator_step(self, autocast, step: int) -> dict:
        """The discriminator's own update on this step's real and reconstructed micro-batches."""
        return self.term("Adv").discriminator_step(autocast, step)

    def discriminator_names(self) -> tuple[str, ...]:
        if "Adv" not in self.names:
            return ()
        adversary = self.adversary
        return () if adversary is None else adversary.term_names

    # ------------------------------------------------------------------ validation
    def reconstruction(self, model, recon: torch.Tensor, x: torch.Tensor) -> tuple[str, torch.Tensor]:
        """('val_nll', NLL in nats per image) under the model's likelihood, or ('val_recon', the
        reconstruction term's per-element mean) for the weighted objective, summed over the batch."""
        if model.likelihood is not None and model.likelihood.proper:
            return "val_nll", -model.likelihood.log_prob(recon, x).sum()
        term = self.term("Recon")
        from .reconstruction import reconstruction_loss

        return "val_recon", reconstruction_loss(recon, x, term.kind if term is not None else "mse") * x.shape[0]

    def describe(self) -> str:
        """The terms as tokens, for the run summary."""
        return ", ".join(self.texts)


def _plus(total, value):
    """total + value, where a total of no term yet (the float 0.0) is the value itself."""
    return value if isinstance(total, float) and total == 0.0 else total + value


def _context_arguments(factory, cfg) -> dict:
    """The config values a term's constructor asks for by name: ``settings`` ([loss]) and ``objective``."""
    import inspect

    wanted = inspect.signature(factory).parameters
    values = {}
    if "settings" in wanted:
        values["settings"] = cfg.loss
    if "objective" in wanted:
        values["objective"] = cfg.loss.objective
    return values
