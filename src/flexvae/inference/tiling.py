"""Tiled encoding and decoding of images larger than the model comfortably takes at once.

An image is cut into ``tile`` x ``tile`` pixel tiles that overlap by ``overlap`` pixels
(the last tile of a row or column is moved back to end at the border). Each tile is encoded
on its own and the latents are blended into one latent map; decoding cuts that map into the
matching latent tiles and blends the decoded pixels. Blending weights ramp linearly across
each overlap (from 1/(n+1) to n/(n+1)) and are 1 elsewhere, so neighbouring tiles cross-fade
instead of meeting at a seam; every output position is the weighted mean of the tiles that
cover it. Tile size and overlap must be multiples of the model's downsampling factor, so
pixel tiles and latent tiles line up.
"""

from __future__ import annotations

import sys

import torch

from ..errors import DataError

TILES_PER_CALL = 16


def downsampling_factor(vae, data_shape) -> int:
    """Pixels per latent position along each side (8 for the SD autoencoder)."""
    side, latent_side = int(data_shape[-1]), int(vae.latent_shape[-1])
    if side % latent_side:
        raise DataError(f"--tile: the model maps {side} px to {latent_side} latent positions, not a whole factor")
    return side // latent_side


def check_tiling(tile: int, overlap: int, factor: int) -> None:
    if tile < 1 or tile % factor:
        raise DataError(f"--tile must be a positive multiple of the model's downsampling factor {factor}, got {tile}")
    if overlap < 0 or overlap >= tile or overlap % factor:
        raise DataError(f"--overlap must be a multiple of {factor} from 0 to less than --tile ({tile}), got {overlap}")


def default_overlap(tile: int, factor: int) -> int:
    """A quarter of the tile, rounded down to the factor."""
    return tile // 4 // factor * factor


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side start; the last one ends at the border."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _ramp(size: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    weights = torch.ones(size, dtype=torch.float64)
    if overlap:
        rise = torch.arange(1, overlap + 1, dtype=torch.float64) / (overlap + 1)
        if lead:
            weights[:overlap] = torch.minimum(weights[:overlap], rise)
        if trail:
            weights[-overlap:] = torch.minimum(weights[-overlap:], rise.flip(0))
    return weights


def tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, num: int = 1, den: int = 1) -> torch.Tensor:
    """``fn`` applied tile by tile over ``x`` (B, C, H, W) and blended; ``fn`` maps a tile of
    side t to one of side t * num / den (the encoder: den = factor; the decoder: num = factor)."""
    height, width = x.shape[-2:]
    if height < tile and width < tile:
        return fn(x)
    tops, lefts = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    places = [(top, left) for top in tops for left in lefts]
    batch = x.shape[0]
    outputs = []
    for start in range(0, len(places), TILES_PER_CALL):  # tiles of every image go through fn together
        chunk = places[start:start + TILES_PER_CALL]
        pieces = torch.cat([x[..., top:top + tile, left:left + tile] for top, left in chunk])
        outputs += list(fn(pieces).split(batch))
    out = weight_sum = None
    for (top, left), y in zip(places, outputs):
        if out is None:
            out = torch.zeros((*y.shape[:2], height * num // den, width * num // den), dtype=torch.float64,
                              device=y.device)
            weight_sum = torch.zeros(out.shape[-2:], dtype=torch.float64, device=y.device)
        rows, cols = y.shape[-2:]
        ramp_rows = _ramp(rows, overlap * num // den, top > 0, top + tile < height)
        ramp_cols = _ramp(cols, overlap * num // den, left > 0, left + tile < width)
        weights = (ramp_rows[:, None] * ramp_cols[None, :]).to(y.device)
        r0, c0 = top * num // den, left * num // den
        out[..., r0:r0 + rows, c0:c0 + cols] += y.double() * weights
        weight_sum[r0:r0 + rows, c0:c0 + cols] += weights
    return (out / weight_sum).to(x.dtype if x.is_floating_point() else torch.float32)


def _refuse_discrete(vae) -> None:
    if vae.is_discrete:
        raise DataError("--tile: blending tiles' latents needs a continuous latent; this model's is "
                        f"{vae.latent.kind} (integer codes)")
    refuse_whole_image_models(vae)


def refuse_whole_image_models(vae) -> None:
    """Hierarchical and conditional models are not tiled."""
    if vae.groups:
        raise DataError("--tile: this model is hierarchical (latent groups in its decoder); it reads and writes "
                        "whole images at its training size only")
    if vae.takes_labels:
        raise DataError("--tile: this model is conditional (it takes class labels); it reads and writes whole "
                        "images at its training size only")


@torch.no_grad()
def encode_tiled(vae, x: torch.Tensor, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """Raw latents (posterior means) of ``x``, encoded tile by tile."""
    _refuse_discrete(vae)
    return tiled_apply(lambda t: vae.encode(t).mode(), x, tile, overlap, 1, factor)


@torch.no_grad()
def decode_tiled(vae, z: torch.Tensor, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """Images in [-1, 1] from raw latents ``z``, decoded in latent tiles of ``tile / factor``."""
    return tiled_apply(lambda t: vae.to_image(vae.decode(t)), z, tile // factor, overlap // factor, factor, 1)


@torch.no_grad()
def reconstruct_tiled(vae, x: torch.Tensor, tile: int, overlap: int, factor: int) -> torch.Tensor:
    return decode_tiled(vae, encode_tiled(vae, x, tile, overlap, factor), tile, overlap, factor)


def prepare_tiling(ctx, tile: int, overlap: int | None) -> tuple[int, int, int]:
    """(tile, overlap, factor) checked against the model: the tile size must be one its
    structures take (traced on the meta device)."""
    from ..build import plan_vae
    from ..errors import StructureError

    factor = downsampling_factor(ctx.vae, ctx.data_shape)
    overlap = default_overlap(tile, factor) if overlap is None else overlap
    check_tiling(tile, overlap, factor)
    _refuse_discrete(ctx.vae)
    likelihood = ctx.vae.likelihood
    try:
        plan_vae(ctx.plan.encoder.specs, ctx.plan.decoder.specs, (ctx.data_shape[0], tile, tile), ctx.vae.latent,
                 output_channels=(likelihood.param_channels(ctx.data_shape[0])
                                  if likelihood is not None and likelihood.proper else None),
                 output_reason="the model's likelihood")
    except StructureError as exc:
        raise DataError(f"--tile {tile}: this model cannot take {tile} x {tile} px tiles: {exc}") from None
    return tile, overlap, factor


def tiled_batches(ctx, dataset, factor: int):
    """Batches of one image each at its own size, centre-cropped to a multiple of ``factor``."""
    from .paths import native_batches

    def multiple(h, w):
        if min(h, w) < factor:
            return f"{h} x {w} px is smaller than the model's downsampling {factor}"
        return h - h % factor, w - w % factor

    return native_batches(ctx, dataset, multiple)


def tiled_reconstructor(vae, tile: int, overlap: int, factor: int):
    """images -> reconstructions, tile by tile (what ``VAE.reconstruct`` does whole)."""
    return lambda images: reconstruct_tiled(vae, images, tile, overlap, factor)


def tiled_encoder(vae, tile: int, overlap: int, factor: int):
    """The tiled counterpart of ``VAE.encode_with_codes``: (scaled latents, no codes)."""
    def encode(images, sample=False, generator=None):
        return encode_tiled(vae, images, tile, overlap, factor) * vae.scaling_factor, None
    return encode


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure (CUDA, MPS or the CPU allocator)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", MemoryError)):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


class FallBackToTiles:
    """Run ``whole`` on a batch; when the device runs out of memory, run the same images one at
    a time in tiles of the model's training size instead, saying so once."""

    def __init__(self, ctx, whole, what: str, log=None, make_tiled=None):
        self.ctx, self.whole, self.what = ctx, whole, what
        self.log = log or (lambda text: print(text, file=sys.stderr))
        # (tile, overlap, factor) -> the tiled counterpart of ``whole`` for one image
        self.make_tiled = make_tiled or (lambda tile, overlap, factor: tiled_reconstructor(ctx.vae, tile, overlap,
                                                                                             factor))
        self.tiled = None

    def __call__(self, images: torch.Tensor, labels=None) -> torch.Tensor:
        """``labels``: the images' class labels for a conditional model (never tiled)."""
        if labels is not None:
            return self.whole(images, labels)
        if self.tiled is None:
            try:
                return self.whole(images)
            except Exception as exc:
                vae = self.ctx.vae
                if not is_out_of_memory(exc) or vae.is_discrete or vae.takes_labels or vae.groups:
                    raise
                self._switch(images)
        return torch.cat([self.tiled(image[None]) for image in images])

    def _switch(self, images) -> None:
        if images.device.type == "cuda":
            torch.cuda.empty_cache()
        factor = downsampling_factor(self.ctx.vae, self.ctx.data_shape)
        tile = int(self.ctx.data_shape[-1])
        overlap = default_overlap(tile, factor)
        self.tiled = self.make_tiled(tile, overlap, factor)
        self.log(f"note: {self.what} of size {tuple(images.shape[-2:])} did not fit in the device's memory; going on "
                 f"one at a time in tiles of {tile} px overlapping by {overlap} (as --tile {tile} --overlap {overlap})")
