"""Interpolation between two images in latent space, written as PNG strips.

Both images are encoded to their posterior means (raw latents), the path between them is
decoded, and each strip reads: input A | t = 0 ... t = 1 | input B. The t = 0 and t = 1
columns are exactly the plain reconstructions of A and B. The scaling factor does not
matter here: scaling commutes with both kinds of interpolation.

- linear: z(t) = (1 - t) z_A + t z_B;
- spherical (slerp), on each flattened latent:
  z(t) = sin((1 - t) w) / sin w * z_A + sin(t w) / sin w * z_B, w = angle(z_A, z_B);
  it falls back to linear when the two are (anti)parallel to float precision.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import find_images, save_grid
from ..errors import DataError
from ..files import write_text

MODES = ("linear", "slerp")


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return torch.lerp(a, b, float(t))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation per sample of (B, ...) latents; exact at t = 0 and t = 1."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-30)
    omega = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    linear = sin.abs() < eps
    safe = torch.where(linear, torch.ones_like(sin), sin)
    wa = torch.where(linear, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(linear, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    out = wa[:, None] * fa + wb[:, None] * fb
    return out.to(a.dtype).view_as(a)


def path_latents(za: torch.Tensor, zb: torch.Tensor, steps: int, mode: str = "linear") -> list[torch.Tensor]:
    """``steps`` latents from za (t = 0) to zb (t = 1), both included."""
    if mode not in MODES:
        raise ValueError(f"unknown interpolation {mode!r}; use one of {', '.join(MODES)}")
    if steps < 2:
        raise ValueError("an interpolation needs at least 2 steps")
    fn = lerp if mode == "linear" else slerp
    ts = [i / (steps - 1) for i in range(steps)]
    return [za.clone() if t == 0 else zb.clone() if t == 1 else fn(za, zb, t) for t in ts]


@torch.no_grad()
def interpolate(vae, a: torch.Tensor, b: torch.Tensor, steps: int = 8, mode: str = "linear") -> torch.Tensor:
    """Decoded path for batches a, b (B, C, H, W): shape (B, steps, C, H, W) in [-1, 1]."""
    za, zb = vae.encode(a).mode(), vae.encode(b).mode()
    images = [vae.to_image(vae.decode(z)) for z in path_latents(za, zb, steps, mode)]
    return torch.stack(images, dim=1)


def _pair_inputs(ctx, first, second) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Two image files, or two folders whose images pair up in sorted order."""
    from ..data import load_image

    first, second = Path(first), Path(second)
    load = lambda p: load_image(p, ctx.data_shape[0], ctx.data_shape[1], ctx.resize_filter, ctx.pad_to_square)  # noqa: E731
    if first.is_file() and second.is_file():
        return load(first)[None], load(second)[None], [f"{first.name} -> {second.name}"]
    if first.is_dir() and second.is_dir():
        left, right = find_images(first), find_images(second)
        pairs = list(zip(left, right))
        if len(left) != len(right):
            print(f"warning: {len(left)} images in {first} and {len(right)} in {second}; "
                  f"using the first {len(pairs)} pairs in sorted order")
        return (torch.stack([load(p) for p, _ in pairs]), torch.stack([load(q) for _, q in pairs]),
                [f"{p.relative_to(first)} -> {q.relative_to(second)}" for p, q in pairs])
    raise DataError(f"interpolation needs two image files or two folders; got {first} and {second}")


def interpolate_inputs(ctx, first, second, output_dir, steps: int = 8, modes=MODES, device="cpu",
                       max_pairs: int = 16) -> dict:
    """Write ``interpolate_<mode>.png`` (one row per pair) for each mode; returns the files."""
    a, b, names = _pair_inputs(ctx, first, second)
    a, b, names = a[:max_pairs].to(device), b[:max_pairs].to(device), names[:max_pairs]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for mode in modes:
        path_images = interpolate(ctx.vae, a, b, steps, mode)
        rows = [torch.cat([a[i:i + 1], path_images[i], b[i:i + 1]]) for i in range(a.shape[0])]
        target = out / f"interpolate_{mode}.png"
        save_grid(rows, target)
        written[mode] = str(target)
    write_text(out / "interpolate_pairs.txt",
        "rows (input A | t = 0 ... 1 | input B):\n" + "\n".join(f"{i}: {n}" for i, n in enumerate(names)) + "\n")
    return {"pairs": len(names), "steps": steps, "files": written}
