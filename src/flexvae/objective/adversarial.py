"""The adversarial term and its discriminator (the latent-diffusion recipe).

Each optimizer step, from the term's start (``adversarial.start``) on:

1. the generator (the VAE) adds ``weight * lambda * g_adv`` to its loss, g_adv = -mean D(x_hat)
   (hinge) or softplus(-D(x_hat)) (non-saturating); with ``adaptive``, lambda = |grad of the
   rest of the loss| / |grad of g_adv| at the decoder's last layer, clamped to
   [0, max_adaptive_weight] and not differentiated (Esser et al., taming transformers);
2. the discriminator, with its own Adam optimizer at ``adversarial.lr`` under the warm-up
   and schedule of ``[train]``, takes one step on the same real and (detached) reconstructed images:
   0.5 (relu(1 - D(x)) + relu(1 + D(x_hat))) for hinge, softplus terms for non-saturating,
   plus an optional R1 penalty r1_weight / 2 * |grad_x D(x)|^2 on the real images.

Every step updates both networks (no alternation by parity). The discriminator is a token
structure traced against the data shape like the encoder; its state (weights and optimizer)
goes into the checkpoint's training state so a resumed run is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..train.distributed import DistInfo
from ..train.schedule import lr_factor
from .term import Term, register_term

ADAPTIVE_EPS = 1e-4


@register_term("Adv", doc="the generator's adversarial term against the [adversarial] discriminator, times "
                          "the adaptive weight (weight and start default to adversarial.weight and .start)")
class Adv(Term):
    """g_adv of the reconstruction, times the adaptive weight; the discriminator (``adversary``,
    built in ``setup``) takes its own step after the VAE's (Objective.discriminator_step)."""

    log_name = "g_adv"
    needs_rest = True

    def __init__(self, settings=None):
        super().__init__()
        self.adversary = None
        self.pairs = []  # this step's (real, detached fake) micro-batches, for the discriminator's step

    def logged(self):
        return ("g_adv", "adaptive_weight")

    def check(self, data_shape, objective):
        pass  # the discriminator is traced against the data in setup (StructureError on mismatch)

    def setup(self, device, cfg=None, config_path=None, data_shape=None, dist=None, **context):
        if not cfg.adversarial.discriminator:
            raise ConfigError("the Adv term needs a discriminator: set adversarial.discriminator "
                              "(e.g. \"structures/small_discriminator.json\")")
        self.__dict__["adversary"] = Adversary(cfg, config_path, data_shape, device, dist or DistInfo())

    def forward(self, batch):
        fake = batch.model.loss_image(batch.out.recon)
        with batch.autocast():
            g_adv = self.adversary.generator_term(fake)
        weight = self.adversary.adaptive_weight(batch.rest, g_adv, last_layer_weight(batch.model.decoder))
        batch.extra["adaptive_weight"] = weight
        self.pairs.append((batch.x, fake.detach()))
        return g_adv

    def contribution(self, weight, value, batch):
        return weight * batch.extra["adaptive_weight"] * value

    def discriminator_step(self, autocast, step: int) -> dict:
        pairs, self.pairs = self.pairs, []
        return self.adversary.discriminator_step(pairs, autocast, step)


def plan_discriminator(value, data_shape, config_path=None):
    """The discriminator structure traced against the data shape (StructureError on mismatch)."""
    from ..assemble import structure_specs
    from ..build import trace

    specs = structure_specs(value, "discriminator", config_path, section="adversarial")
    return trace(specs, data_shape, input_name="the images")


class Adversary:
    def __init__(self, cfg, config_path, data_shape, device, dist: DistInfo):
        self.cfg = cfg.adversarial
        self.grad_clip = cfg.train.grad_clip
        self.plan = plan_discriminator(self.cfg.discriminator, data_shape, config_path)
        self.model = self.plan.build(device)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, betas=tuple(self.cfg.betas))
        # adversarial.lr under train's warm-up and schedule, set from the step itself (nothing to resume)
        self.lr_at = lambda step: self.cfg.lr * lr_factor(step, cfg.train)
        self.step_model = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if torch.device(device).type == "cuda" else None
            self.step_model = DistributedDataParallel(self.model, device_ids=ids)

    @property
    def params(self) -> int:
        return self.plan.params

    def active(self, step: int) -> bool:
        return step >= self.cfg.start

    # --------------------------------------------------------------- generator side
    def generator_term(self, fake: torch.Tensor) -> torch.Tensor:
        """g_adv for reconstructed images (differentiable towards the VAE). The plain module
        is used: gradients it leaves on the discriminator are cleared before its own step."""
        logits = self.model(fake).float()
        if self.cfg.loss == "hinge":
            return -logits.mean()
        return F.softplus(-logits).mean()

    def adaptive_weight(self, rest: torch.Tensor, g_adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        if not self.cfg.adaptive:
            return torch.ones((), device=g_adv.device)
        rest_grad = torch.autograd.grad(rest, last_layer, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(g_adv, last_layer, retain_graph=True)[0]
        weight = rest_grad.float().norm() / (adv_grad.float().norm() + ADAPTIVE_EPS)
        return weight.clamp(0, self.cfg.max_adaptive_weight).detach()

    # ----------------------------------------------------------- discriminator side
    @property
    def term_names(self) -> tuple[str, ...]:
        """What a step logs: the generator's and the discriminator's terms."""
        return ("g_adv", "adaptive_weight", "d_loss", "logits_real", "logits_fake") + (
            ("r1",) if self.cfg.r1_weight > 0 else ())

    def discriminator_step(self, pairs, autocast, step: int) -> dict:
        """One update on (real, fake) micro-batches (fakes detached); returns the logged terms."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        if self.cfg.r1_weight > 0:
            sums["r1"] = 0.0
        for real, fake in pairs:
            real = real.detach().requires_grad_(self.cfg.r1_weight > 0)
            with autocast():
                logits_real = self.step_model(real).float()
                logits_fake = self.step_model(fake.detach()).float()
            if self.cfg.loss == "hinge":
                loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
            else:
                loss = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
            total = loss
            if self.cfg.r1_weight > 0:
                grad = torch.autograd.grad(logits_real.sum(), real, create_graph=True)[0]
                penalty = grad.float().pow(2).flatten(1).sum(1).mean()
                total = total + 0.5 * self.cfg.r1_weight * penalty
                sums["r1"] += penalty.item() / len(pairs)
            (total / len(pairs)).backward()
            sums["d_loss"] += loss.item() / len(pairs)
            sums["logits_real"] += logits_real.mean().item() / len(pairs)
            sums["logits_fake"] += logits_fake.mean().item() / len(pairs)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.step_model is not self.model:
            # BatchNorm statistics moved in each process's own forward passes: rank 0's are the
            # replicas' (as DDP's broadcast at the next forward would make them anyway).
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, 0)
        return sums

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, source) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"{source}: its discriminator does not match adversarial.discriminator "
                              f"({type(exc).__name__}); use --fresh to start over") from None


def last_layer_weight(decoder) -> torch.Tensor:
    """The decoder's last weight matrix or kernel: where the adaptive weight compares gradients."""
    weights = [p for p in decoder.parameters() if p.dim() >= 2 and p.requires_grad]
    if not weights:
        raise ConfigError("adversarial.adaptive needs a decoder with a weight layer (a convolution or linear layer)")
    return weights[-1]
