"""The [loss] and [adversarial] keys as term tokens: what a config without ``loss.terms`` trains.

    weighted: Recon_kind=<recon>_weight=<recon_weight>, KL_weight=<kl_weight>[schedule],
              SSIM_kind=<ssim_kind>_weight=<ssim_weight> (ssim), Sparse_weight=<sparse_weight> (sparse),
              LPIPS_weight=<perceptual_weight> (perceptual_weight > 0), Adv (a discriminator)
    elbo:     NLL, KL_weight=<kl_weight>[schedule], then the same SSIM, Sparse, LPIPS and Adv

Numbers are written with ``repr``, which reads back to the same float: the weights, and so
the trained weights, are bitwise those of the keys.
"""

from __future__ import annotations


from ..errors import ConfigError

# [loss] keys that declare a term; with loss.terms they must stay at their defaults.
TERM_KEYS = ("recon", "recon_weight", "kl_weight", "kl_schedule", "kl_warmup_steps", "kl_cycle_steps",
             "kl_cycle_ratio", "ssim", "ssim_weight", "ssim_kind", "sparse", "sparse_weight", "perceptual_weight")


def _kl_schedule(loss) -> str:
    if loss.kl_schedule == "linear" and loss.kl_warmup_steps > 0:
        return f"_warmup={loss.kl_warmup_steps}"
    if loss.kl_schedule == "cyclical":
        return f"_cycle={loss.kl_cycle_steps}_ratio={loss.kl_cycle_ratio!r}"
    return ""


def legacy_term_tokens(cfg) -> list[str]:
    loss = cfg.loss
    if loss.objective == "elbo":
        tokens = ["NLL"]
    else:
        tokens = [f"Recon_kind={loss.recon}_weight={loss.recon_weight!r}"]
    tokens.append(f"KL_weight={loss.kl_weight!r}{_kl_schedule(loss)}")
    if loss.ssim:
        tokens.append(f"SSIM_kind={loss.ssim_kind}_weight={loss.ssim_weight!r}")
    if loss.sparse:
        tokens.append(f"Sparse_weight={loss.sparse_weight!r}")
    if loss.perceptual_weight > 0:
        tokens.append(f"LPIPS_weight={loss.perceptual_weight!r}")
    if cfg.adversarial.discriminator:
        tokens.append("Adv")
    return tokens


def check_term_keys(cfg) -> None:
    """With ``loss.terms``, a term key of [loss] set as well is a contradiction: say which."""
    if not cfg.loss.terms:
        return
    defaults = type(cfg.loss)()
    for key in TERM_KEYS:
        if getattr(cfg.loss, key) != getattr(defaults, key):
            raise ConfigError(
                f"loss.{key} is set, and so is loss.terms, which replaces it; write it in the terms "
                f"instead (e.g. \"KL_weight=1e-4_warmup=1000\", \"SSIM_weight=0.5\") or remove loss.terms")
    from ..dsl.grammar import parse_token

    names = [parse_token(t, "loss.terms", i, what="term").name for i, t in enumerate(cfg.loss.terms, start=1)]
    if cfg.adversarial.discriminator and "Adv" not in names:
        raise ConfigError(f"adversarial.discriminator is set but loss.terms has no Adv term; add "
                          "\"Adv\" (its weight and start default to adversarial.weight and adversarial.start)")


def reconstruction_kind(cfg) -> str:
    """The weighted objective's reconstruction loss (mse, l1 or bce): a Recon term's kind in
    loss.terms, else loss.recon. bce makes the decoder output logits."""
    from ..dsl.grammar import parse_token

    for position, text in enumerate(cfg.loss.terms, start=1):
        spec = parse_token(text, source="loss.terms", position=position, what="term")
        if spec.name == "Recon":
            return spec.kwargs.get("kind", spec.args[0] if spec.args else "mse")
    return cfg.loss.recon


def kl_weight_at(step: int, loss) -> float:
    """The KL weight the [loss] keys give after ``step`` optimizer steps (their KL term's schedule)."""
    from ..dsl.grammar import parse_token
    from .schedule import Schedule

    return Schedule.from_spec(parse_token(f"KL_weight={loss.kl_weight!r}{_kl_schedule(loss)}")).weight_at(step)
