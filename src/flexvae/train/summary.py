"""What a run prints at its start: the model, the data, the extra terms (``announce``) and,
with ``--verbose``, the layer table (torchinfo's, an optional dependency, else the structures')."""

from __future__ import annotations

import torch


class _Reconstruction(torch.nn.Module):
    """The model seen as image -> reconstruction, the form torchinfo can trace."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.decoder = vae.encoder, vae.decoder
        # Not a registered submodule: torchinfo cannot hook a module returning a posterior.
        self._latent = [vae.latent]

    def forward(self, x):
        return self.decoder(self._latent[0](self.encoder(x)).mode())


def model_summary(model, data_shape, device, plan=None) -> str:
    """torchinfo's module table when the optional torchinfo is installed, else the structures'
    own per-layer table (``plan``) with a line on how to get torchinfo's."""
    try:
        from torchinfo import summary
    except ImportError:
        fallback = f"{plan.table()}\n" if plan is not None else ""
        return fallback + "(torchinfo adds its per-module table here: pip install torchinfo)"
    # In eval mode, so the summary's forward pass updates no statistics (BatchNorm, VQ codebooks).
    was_training = model.training
    model.eval()
    try:
        return str(summary(_Reconstruction(model), input_size=(1, *data_shape), device=device, depth=3,
                           verbose=0, col_names=("output_size", "num_params"), mode="eval"))
    except Exception as exc:  # a summary is a courtesy; never fail a run over it
        return f"(torchinfo summary unavailable: {exc})"
    finally:
        model.train(was_training)


def _shape(shape) -> str:
    return " x ".join(str(n) for n in shape)


def announce(trainer, dataset) -> list[str]:
    """What is about to happen, in a few lines (the layer table with ``verbose``)."""
    cfg, plan, dist = trainer.cfg, trainer.plan, trainer.dist
    tcfg = cfg.train
    lines = [model_summary(trainer.model, plan.data_shape, trainer.device, plan)] if trainer.verbose else []
    lines.append(f"model: {plan.encoder.params + plan.decoder.params:,} parameters (encoder {plan.encoder.params:,}, "
                 f"decoder {plan.decoder.params:,}); {trainer.model.latent.kind} latent {_shape(plan.latent_shape)} "
                 f"for data {_shape(plan.data_shape)}; device {trainer.device}, precision {tcfg.precision}")
    excluded = len(dataset.excluded)
    per_step = tcfg.batch_size * tcfg.grad_accum * dist.world_size
    split = f"{tcfg.batch_size} x {tcfg.grad_accum} accumulated" + (
        f" x {dist.world_size} processes" if dist.enabled else "")
    lines.append(f"data: {len(dataset):,} images in {cfg.data.path}"
                 + (f" ({excluded} special files left out)" if excluded else "")
                 + f"; {per_step} a step ({split}); steps {trainer.step + 1} to {tcfg.max_steps}")
    if getattr(dataset, "labels", None) is not None:
        use = ("context tokens" if trainer.model.encoder.takes_labels or trainer.model.decoder.takes_labels else "")
        if trainer.model.latent.class_count is not None:
            use += (" and " if use else "") + "the class latent"
        if trainer.objective.term("Align") is not None:
            use += (" and " if use else "") + "the Align term"
        lines.append(f"labels ({cfg.data.labels}): {dataset.labels.describe()}; used by "
                     + (use or "nothing: the model has no context token, no class latent and no Align term"))
    objective = trainer.objective
    line = f"objective ({cfg.loss.objective}): {objective.describe()}"
    if objective.adversary is not None:
        acfg = cfg.adversarial
        line += (f"; {acfg.loss} discriminator of {objective.adversary.params:,} parameters"
                 + (" with the adaptive weight" if acfg.adaptive else ""))
    prior = trainer.model.prior
    if prior is not None:
        line += (f"; prior {cfg.model.prior} ({sum(p.numel() for p in prior.parameters()):,} parameters), its KL the "
                 "one-sample Monte Carlo estimate")
    lines.append(line)
    lines += trainer.stages.describe()
    lines += [f"note: {note}" for note in data_notes(dataset, cfg.data, per_step)]
    lines += [f"note: {note}" for note in trainer.runtime.notes]
    return lines


GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F", "P"}
LOOKED_AT = 256  # image headers read for the notes (a header is a few hundred bytes)


def data_notes(dataset, data, per_step: int) -> list[str]:
    """What the data pipeline converts silently, one line each: images repeated within a step,
    grey images trained as colour (or colour as grey), images resized to data.image_size."""
    from collections import Counter

    from PIL import Image

    notes = []
    if 0 < len(dataset) < per_step:
        notes.append(f"{len(dataset)} images for {per_step} a step: every step repeats images (lower "
                     "train.batch_size to step through the data without repeats)")
    paths = list(getattr(dataset, "paths", []) or [])[:LOOKED_AT]
    modes, sizes = Counter(), Counter()
    for path in paths:
        try:
            with Image.open(path) as image:  # the header only: no pixel is decoded
                grey = image.mode in GREY_MODES and not (image.mode == "P" and image.palette
                                                         and image.palette.mode != "L")
                modes["grey" if grey else "colour"] += 1
                sizes[image.size] += 1
        except Exception:  # unreadable files are reported by the loader itself
            continue
    looked = sum(modes.values())
    of = f"of the first {looked} looked at" if looked < len(dataset) else f"of {looked}"
    if data.channels == 3 and modes["grey"]:
        notes.append(f"{modes['grey']} {of} images are greyscale and are trained as RGB (data.channels = 3); "
                     "set data.channels = 1 to train on grey")
    if data.channels == 1 and modes["colour"]:
        notes.append(f"{modes['colour']} {of} images are in colour and are trained as greyscale "
                     "(data.channels = 1); set data.channels = 3 to keep the colour")
    if sizes:
        (width, height), count = sizes.most_common(1)[0]
        if (width, height) != (data.image_size, data.image_size):
            verb = "downscaled" if min(width, height) > data.image_size else "resized"
            shape = "padded to square and " if data.pad_to_square and width != height else ""
            notes.append(f"images are {shape}{verb} to {data.image_size} x {data.image_size} (data.image_size); "
                         f"{count} {of} are {width} x {height}")
    return notes
