"""What cannot fit is refused before anything is allocated.

The shape trace (build.py) knows every layer's parameter count and output shape without
allocating. From it, a lower bound of what a step needs: the weights (for training also
their gradients and AdamW's two moments), and the batch's input plus its largest activation.
When even that bound exceeds what the device can still allocate, ``train``, ``-i``, ``-e``
and ``-d`` stop with one line; ``check`` prints a warning beside its table. A bound that fits
is no promise: ``-mem`` measures the real peak.
"""

from __future__ import annotations

import math

from .errors import FlexVAEError

GiB = 2**30


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def lower_bound(plan, batch: int, training: bool, element_bytes: int = 4) -> tuple[int, str]:
    """(bytes, what they are) at least needed to run ``plan`` on a batch of ``batch``."""
    params = plan.encoder.params + plan.decoder.params
    weights = params * 4 * (4 if training else 1)  # fp32 weights; training: + gradients + AdamW's two moments
    shapes = [plan.data_shape] + [row.out_shape for stack in (plan.encoder, plan.decoder) for row in stack.rows]
    largest = max(_numel(shape) for shape in shapes)
    per_sample = (_numel(plan.data_shape) + largest) * element_bytes
    what = (f"{params:,} parameters take {weights / GiB:,.1f} GiB"
            + (" with their gradients and optimizer state" if training else "")
            + f", and a batch of {batch:,} at least {batch * per_sample / GiB:,.1f} GiB more")
    return weights + batch * per_sample, what


def device_room(device) -> int | None:
    """Bytes the device can still allocate, or None when that cannot be told (MPS, ...)."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        from .sysmem import available_memory

        try:
            return available_memory()
        except FlexVAEError:
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def refuse_unless_fits(plan, batch: int, device, training: bool, hint: str, element_bytes: int = 4) -> None:
    """One FlexVAEError line when ``plan`` at ``batch`` cannot fit on ``device``, said before
    anything is allocated; ``hint`` says what to change. A model without a plan is not checked."""
    room = None if plan is None else device_room(device)
    if room is None:
        return
    need, what = lower_bound(plan, batch, training, element_bytes)
    if lower_bound(plan, 0, training)[0] > room:
        hint = "the weights alone do not fit: declare a smaller model"
    if need > room:
        raise FlexVAEError(f"this cannot fit in memory: {what}, {need / GiB:,.1f} GiB in all, but {device} has "
                           f"{room / GiB:,.1f} GiB free; {hint}")


def fit_warning(plan, batch: int, device="cpu") -> str | None:
    """For ``check``: a warning line when training at ``batch`` cannot fit on ``device``."""
    room = device_room(device)
    if room is None:
        return None
    need, what = lower_bound(plan, batch, training=True)
    if need <= room:
        return None
    return (f"warning: training cannot fit in memory: {what}, {need / GiB:,.1f} GiB in all, but {device} has "
            f"{room / GiB:,.1f} GiB free; train and the other modes will refuse it")
