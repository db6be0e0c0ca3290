"""Training stages: from a step on, what trains, at what learning rate and image size, with
which loss terms.

    [[stage]]                       # SD's ft-MSE: the decoder alone, the encoder frozen
    train = ["decoder"]
    [[stage]]                       # DC-AE's third phase: a GAN on the decoder's last layers
    start = 2000
    train = ["decoder:20-24", "discriminator"]
    lr = 5e-5
    terms = ["Recon", "LPIPS", "Adv"]

A stage lasts until the next one's start; before the first stage's start everything trains.
Frozen parameters get no gradient: the optimizer leaves them (and their Adam moments) exactly as
they are, the EMA leaves its copy of them, and a resumed run finds its stage from the step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ConfigError, StructureError
from ..utils import did_you_mean
from .schedule import lr_factor

_SPAN = re.compile(r"^(encoder|decoder):(\d+)(?:-(\d+))?$")


@dataclass
class Stage:
    number: int  # 1-based, as in the config; 0 = the implicit stage before the first one
    start: int
    name: str = ""
    train: tuple = ("all",)
    lr: float = 0.0
    image_size: int = 0
    terms: set | None = None  # the names of the terms on; None = all
    frozen: list = field(default_factory=list)  # (parameter name, parameter) of what does not train
    trains_discriminator: bool = True

    def frozen_names(self) -> set[str]:
        return {name for name, _ in self.frozen}

    def drop_frozen_gradients(self) -> None:
        """Frozen parameters keep no gradient: AdamW then skips them (no update, no decay)."""
        for _, parameter in self.frozen:
            parameter.grad = None

    def title(self) -> str:
        label = f"stage {self.number}" + (f" ({self.name})" if self.name else "")
        parts = [f"trains {', '.join(self.train)}"]
        if self.lr:
            parts.append(f"lr {self.lr:g}")
        if self.image_size:
            parts.append(f"images {self.image_size} px")
        if self.terms is not None:
            parts.append(f"terms {', '.join(sorted(self.terms))}")
        return f"{label} from step {self.start}: " + "; ".join(parts)


def _parts(model, plans, item: str, where: str):
    """Parameter names of one ``train`` entry."""
    names = dict(model.named_parameters())
    if item == "all":
        return set(names)
    if item in ("encoder", "latent", "decoder", "prior"):
        prefixes = (f"{item}.",) + (("likelihood.",) if item == "decoder" else ())
        return {n for n in names if n.startswith(prefixes)}
    if item == "discriminator":
        return set()
    match = _SPAN.match(item)
    if not match:
        hint = did_you_mean(item, ["all", "encoder", "latent", "decoder", "prior", "discriminator"])
        raise ConfigError(f"{where}: train entry {item!r} is not a part.{hint} Write all, encoder, latent, decoder, "
                          "prior (a learned prior's parameters), discriminator, or structure positions such as decoder:20-24")
    stack, first, last = match.group(1), int(match.group(2)), int(match.group(3) or match.group(2))
    specs = plans[stack].specs
    positions = sorted({s.position for s in specs if s.position is not None})
    if first > last or first not in positions or last not in positions:
        raise ConfigError(f"{where}: {item!r}: the {stack} has positions {positions[0]} to {positions[-1]}")
    modules = [index for index, spec in enumerate(specs) if first <= (spec.position or 0) <= last]
    return {n for n in names if n.startswith(stack + ".") and int(n.split(".")[1]) in modules}


class Stages:
    """The run's stages (config ``[[stage]]``), checked against the model and the objective."""

    def __init__(self, cfg, model, plan, objective, source: str = "config", config_path=None):
        self.stages: list[Stage] = []
        self._cfg, self._config_path, self._classes, self._plans = cfg, config_path, plan.classes, {}
        tables = list(cfg.stage)
        previous = -1
        plans = {"encoder": plan.encoder, "decoder": plan.decoder}
        for number, table in enumerate(tables, start=1):
            where = f"{source}: [[stage]] {number}"
            if table.start <= previous:
                raise ConfigError(f"{where}: start = {table.start} must come after the previous stage's start "
                                  f"({previous}); stages are listed in the order they run")
            previous = table.start
            unknown = [t for t in table.terms if t not in objective.names]
            if unknown:
                raise ConfigError(f"{where}: terms names {unknown[0]!r}, which is not a term of this run."
                                  f"{did_you_mean(unknown[0], objective.names)} The run's terms: "
                                  f"{', '.join(objective.names)}")
            if "discriminator" in table.train and objective.adversary is None:
                raise ConfigError(f"{where}: train names the discriminator, but the run has none "
                                  "(adversarial.discriminator and an Adv term)")
            if not table.train:
                raise ConfigError(f"{where}: train is empty; name what trains (e.g. [\"decoder\"])")
            training = set()
            for item in table.train:
                training |= _parts(model, plans, item, where)
            frozen = [(n, p) for n, p in model.named_parameters() if n not in training and not n.startswith("balance.")]
            self.stages.append(Stage(number, table.start, table.name, tuple(table.train), table.lr,
                                     table.image_size, set(table.terms) if table.terms else None, frozen,
                                     "all" in table.train or "discriminator" in table.train))
        if self.stages and self.stages[0].start > 0:
            self.stages.insert(0, Stage(0, 0, "before the first stage"))
        for stage in self.stages:  # a size the structures cannot take fails now, not mid-run
            try:
                self.plan_for(stage, plan)
            except (ConfigError, StructureError) as exc:
                raise ConfigError(f"{source}: [[stage]] {stage.number}: image_size = {stage.image_size}: {exc}") from None

    @staticmethod
    def sized(cfg, image_size: int):
        """The config with data.image_size = ``image_size``."""
        import dataclasses

        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=image_size))

    def image_size_at(self, step: int, default: int) -> int:
        stage = self.at(step)
        return stage.image_size if stage is not None and stage.image_size else default

    def __bool__(self) -> bool:
        return bool(self.stages)

    def at(self, step: int) -> Stage | None:
        """The stage a step belongs to (None for a run without stages)."""
        found = None
        for stage in self.stages:
            if stage.start <= step:
                found = stage
        return found

    def describe(self) -> list[str]:
        return [stage.title() for stage in self.stages]

    def enter(self, stage: Stage | None, model, optimizer, scheduler, tcfg, step: int, dist) -> None:
        """Apply a stage from ``step`` on: frozen parameters stop asking for gradients (in one
        process; under DDP every parameter keeps its gradient, which the step then drops), and
        the learning rate's peak is the stage's."""
        if stage is None:
            return
        frozen = stage.frozen_names()
        if not dist.enabled:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name not in frozen)
        set_peak_lr(optimizer, scheduler, stage.lr or tcfg.lr, step, tcfg)

    def plan_for(self, stage: Stage | None, plan):
        """The model's plan at the stage's image size (the plan itself at data.image_size)."""
        if stage is None or not stage.image_size or stage.image_size == plan.data_shape[-1]:
            return plan
        if stage.image_size not in self._plans:
            from ..assemble import plan_from_config

            self._plans[stage.image_size] = plan_from_config(self.sized(self._cfg, stage.image_size),
                                                             self._config_path, self._classes)
        return self._plans[stage.image_size]


def set_peak_lr(optimizer, scheduler, peak: float, step: int, tcfg) -> None:
    """The learning rate of ``step`` under train's warm-up and schedule, from the peak ``peak``;
    the scheduler continues from it."""
    lr = peak * lr_factor(step, tcfg)
    for group in optimizer.param_groups:
        group.update(lr=lr, initial_lr=peak)
    scheduler.base_lrs = [peak] * len(optimizer.param_groups)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
