"""Tiled encoding and decoding of images larger than the model comfortably takes at once.

An image is cut into ``tile``-sided tiles (``tile`` x ``tile`` pixels; cubes for volumes) that
overlap by ``overlap`` pixels (the last tile along an axis is moved back to end at the border).

Exact tiling (the default where the model allows it): the overlap is chosen from the
model's receptive field (receptive.py) and each position is taken from the one tile that
owns it, so the output equals the untiled one, GroupNorm included (exact_tiles.py). A model
with layers that see every position (attention, position embeddings, a linear layer over the
whole map) cannot be tiled exactly; for it, and where ``--overlap`` is less than the model
needs, tiles are cross-faded: blending weights ramp linearly across each overlap (from
1/(n+1) to n/(n+1)), so every output position is the weighted mean of the tiles covering it.
Tile size and overlap must be multiples of the model's downsampling factor, so pixel tiles
and latent tiles line up.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from typing import NamedTuple

import torch

from ..errors import DataError
from .exact_tiles import TILES_PER_CALL, tile_starts


def downsampling_factor(vae, data_shape) -> int:
    """Pixels per latent position along each side (8 for the SD autoencoder)."""
    sides, latent_sides = tuple(int(s) for s in data_shape[1:]), tuple(int(s) for s in vae.latent_shape[1:])
    if not latent_sides:
        raise DataError(f"--tile: the model's latent is one vector of {vae.latent_shape[0]} values for the whole "
                        f"{' x '.join(map(str, sides))} px image, not a map of positions: it cannot be tiled; "
                        "leave --tile out (images are resized to the training size)")
    if len(sides) != len(latent_sides) or any(s % l for s, l in zip(sides, latent_sides)) or len(
            {s // l for s, l in zip(sides, latent_sides)}) != 1:
        raise DataError(f"--tile: the model maps {sides} px to latent positions {latent_sides}, not one whole "
                        "factor on every side")
    return sides[-1] // latent_sides[-1]


def check_tiling(tile: int, overlap: int, factor: int) -> None:
    if tile < 1 or tile % factor:
        raise DataError(f"--tile must be a positive multiple of the model's downsampling factor {factor}, got {tile}")
    if overlap < 0 or overlap >= tile or overlap % factor:
        raise DataError(f"--overlap must be a multiple of {factor} from 0 to less than --tile ({tile}), got {overlap}")


def default_overlap(tile: int, factor: int) -> int:
    """A quarter of the tile, rounded down to the factor (the blended tiling's default)."""
    return tile // 4 // factor * factor


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
    """``fn`` applied tile by tile over ``x`` (B, C, *spatial) and blended; ``fn`` maps a tile of
    side t to one of side t * num / den (the encoder: den = factor; the decoder: num = factor)."""
    sizes = tuple(int(s) for s in x.shape[2:])
    if all(s <= tile for s in sizes):
        return fn(x)
    places = list(itertools.product(*(tile_starts(n, tile, overlap) for n in sizes)))
    batch = x.shape[0]
    outputs = []
    for start in range(0, len(places), TILES_PER_CALL):  # tiles of every image go through fn together
        chunk = places[start:start + TILES_PER_CALL]
        pieces = torch.cat([x[(..., *(slice(s, s + tile) for s in place))] for place in chunk])
        outputs += list(fn(pieces).split(batch))
    out = weight_sum = None
    for place, y in zip(places, outputs):
        if out is None:
            out = torch.zeros((*y.shape[:2], *(n * num // den for n in sizes)), dtype=torch.float64, device=y.device)
            weight_sum = torch.zeros(out.shape[2:], dtype=torch.float64, device=y.device)
        weights = torch.ones((), dtype=torch.float64)
        for axis, (s, n, size) in enumerate(zip(place, sizes, y.shape[2:])):
            ramp = _ramp(size, overlap * num // den, s > 0, s + tile < n)
            weights = weights[..., None] * ramp.view(*([1] * axis), -1) if axis else ramp
        weights = weights.to(y.device)
        region = tuple(slice(s * num // den, s * num // den + size) for s, size in zip(place, y.shape[2:]))
        out[(slice(None), slice(None), *region)] += y.double() * weights
        weight_sum[region] += weights
    return (out / weight_sum).to(x.dtype if x.is_floating_point() else torch.float32)


# --- exact tiling: what the model's receptive field allows ---------------------------------

_FOOTPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _encode_fn(vae):
    return lambda t: vae.encode(t).mode()


def _decode_fn(vae):
    return lambda t: vae.to_image(vae.decode(t))


@torch.no_grad()
def model_footprint(vae, part: str, side: int, channels: int, dims: int):
    """The receptive footprint of the encoder ("encode": pixels -> posterior means) or the
    decoder ("decode": latents -> images) on inputs of ``side`` units, cached per model."""
    from .receptive import footprint, layer_names

    key = (part, side, channels, dims)
    cache = _FOOTPRINTS.setdefault(vae, {})
    if key not in cache:
        param = next(vae.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        example = torch.zeros((1, channels, *(side,) * dims), device=device, dtype=dtype)
        if part == "encode":
            names = layer_names(vae.encoder, "encoder")
            cache[key] = footprint(_encode_fn(vae), [vae.encoder, vae.latent], example, names)
        else:
            cache[key] = footprint(_decode_fn(vae), [vae.decoder], example, layer_names(vae.decoder, "decoder"))
    return cache[key]


class Tiling(NamedTuple):
    """How images are tiled: sizes in pixels; ``exact``: per part, whether the output is exact."""

    tile: int
    overlap: int
    factor: int
    exact: dict
    note: str | None = None


def _exact_in(footprint, tile: int, overlap: int, grid: int = 1) -> bool:
    """Whether tiles of ``tile`` overlapping by ``overlap`` give the exact output, on images whose
    sides are multiples of ``grid`` (all in the part's input units)."""
    return (footprint.exact and overlap >= footprint.needed_overlap()
            and all(tile % a == 0 and (tile - overlap) % a == 0 and grid % a == 0 for a in footprint.align))


def resolve_tiling(vae, data_shape, tile: int, overlap: int | None, parts=("encode", "decode"),
                   explicit: bool = True) -> Tiling:
    """Choose the overlap (exact where the model allows) and say in one note what is approximate.
    ``explicit``: the user asked for these tiles (a tile too small for exact tiling is an error
    then; otherwise tiling goes on approximate)."""
    factor = downsampling_factor(vae, data_shape)
    dims, channels = len(data_shape) - 1, int(data_shape[0])
    check_tiling(tile, overlap if overlap is not None else 0, factor)
    prints = {}
    if "encode" in parts:
        prints["encode"] = (model_footprint(vae, "encode", tile, channels, dims), 1)
    if "decode" in parts:
        prints["decode"] = (model_footprint(vae, "decode", tile // factor, int(vae.latent_shape[0]), dims), factor)
    global_layers = [name for fp, _ in prints.values() for name in fp.global_layers]
    needed = max((fp.needed_overlap() * unit for fp, unit in prints.values()), default=0)
    needed = -(-needed // factor) * factor
    note = None
    if global_layers:  # the local parts are still exact where the overlap allows
        if overlap is None:
            overlap = needed if needed < tile else default_overlap(tile, factor)
        note = (f"note: tiling is approximate for this model (layers that see every position: "
                f"{', '.join(dict.fromkeys(global_layers))}); its tiles are cross-faded")
    elif overlap is None:
        if needed >= tile:
            message = (f"--tile {tile}: exact tiling of this model needs tiles overlapping by {needed} px (its "
                       f"receptive field), so a tile of at least {needed + factor} px")
            if explicit:
                raise DataError(f"{message}; give a larger --tile, or --overlap (less than {tile}) for "
                                "approximate, cross-faded tiles")
            overlap = default_overlap(tile, factor)
            note = f"note: {message}; these tiles overlap by {overlap} px and are cross-faded (approximate)"
        else:
            overlap = needed
    elif overlap < needed:
        note = (f"note: --overlap {overlap} is less than the {needed} px this model's receptive field needs for "
                "exact tiling; tiles are cross-faded, and the output is approximate near tile borders")
    check_tiling(tile, overlap, factor)
    exact = {part: _exact_in(fp, tile // unit, overlap // unit, factor // unit) for part, (fp, unit) in prints.items()}
    if note is None and not all(exact.values()):
        grids = {part: max(fp.align) * unit for part, (fp, unit) in prints.items() if not exact[part]}
        note = (f"note: tiling is approximate for this model: exact tiles must start on multiples of "
                f"{max(grids.values())} px (its layers' grid), more than its downsampling {factor} to which images "
                "are cropped; tiles are cross-faded")
    return Tiling(tile, overlap, factor, exact, note)


def _apply(vae, part: str, x: torch.Tensor, tile: int, overlap: int, factor: int, exact: bool | None):
    fn = _encode_fn(vae) if part == "encode" else _decode_fn(vae)
    unit = 1 if part == "encode" else factor
    if exact is not False:
        fp = model_footprint(vae, part, tile // unit, int(x.shape[1]), x.dim() - 2)
        if exact or _exact_in(fp, tile // unit, overlap // unit, factor // unit):
            from .exact_tiles import exact_tiled_apply

            return exact_tiled_apply(fn, x, tile // unit, overlap // unit, fp)
    if part == "encode":
        return tiled_apply(fn, x, tile, overlap, 1, factor)
    return tiled_apply(fn, x, tile // factor, overlap // factor, factor, 1)


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
def encode_tiled(vae, x: torch.Tensor, tile: int, overlap: int, factor: int, exact: bool | None = None) -> torch.Tensor:
    """Raw latents (posterior means) of ``x``, encoded tile by tile; ``exact``: None = exact
    where the model and the overlap allow it, False = cross-faded tiles."""
    _refuse_discrete(vae)
    return _apply(vae, "encode", x, tile, overlap, factor, exact)


@torch.no_grad()
def decode_tiled(vae, z: torch.Tensor, tile: int, overlap: int, factor: int, exact: bool | None = None) -> torch.Tensor:
    """Images in [-1, 1] from raw latents ``z``, decoded in latent tiles of ``tile / factor``."""
    return _apply(vae, "decode", z, tile, overlap, factor, exact)


@torch.no_grad()
def reconstruct_tiled(vae, x: torch.Tensor, tile: int, overlap: int, factor: int, exact: bool | None = None):
    return decode_tiled(vae, encode_tiled(vae, x, tile, overlap, factor, exact), tile, overlap, factor, exact)


def prepare_tiling(ctx, tile: int, overlap: int | None, parts=("encode", "decode"), log=None) -> Tiling:
    """The tiling of ``ctx``'s model for ``parts`` ("encode", "decode"), checked against it: the
    tile size must be one its structures take (traced on the meta device); the overlap is what
    exact tiling needs unless given. A note on approximate tiling goes to ``log`` (stderr)."""
    from ..build import plan_vae
    from ..errors import StructureError

    factor = downsampling_factor(ctx.vae, ctx.data_shape)
    check_tiling(tile, overlap if overlap is not None else 0, factor)
    if "encode" in parts:
        _refuse_discrete(ctx.vae)
    else:
        refuse_whole_image_models(ctx.vae)
    likelihood = ctx.vae.likelihood
    shape = (ctx.data_shape[0], *(tile,) * (len(ctx.data_shape) - 1))
    try:
        plan_vae(ctx.plan.encoder.specs, ctx.plan.decoder.specs, shape, ctx.vae.latent,
                 output_channels=(likelihood.param_channels(ctx.data_shape[0])
                                  if likelihood is not None and likelihood.proper else None),
                 output_reason="the model's likelihood")
    except StructureError as exc:
        raise DataError(f"--tile {tile}: this model cannot take {tile} x {tile} px tiles: {exc}") from None
    tiling = resolve_tiling(ctx.vae, ctx.data_shape, tile, overlap, parts)
    if tiling.note:
        (log or (lambda text: print(text, file=sys.stderr)))(tiling.note)
    return tiling


class MeasureOnce:
    """Wraps a tiled function of approximate tiling: on its first call it also runs the model
    on the whole input and says by how much the tiled output differs (once)."""

    def __init__(self, tiled, whole, what: str, log=None):
        from tqdm import tqdm

        self.tiled, self.whole, self.what, self.done = tiled, whole, what, False
        self.log = log or (lambda text: tqdm.write(text, file=sys.stderr))  # its own line under a progress bar

    def __call__(self, x, *args, **kwargs):
        out = self.tiled(x, *args, **kwargs)
        if not self.done:
            self.done = True
            try:
                with torch.no_grad():
                    reference = self.whole(x)
                diff = (out[0] if isinstance(out, tuple) else out).double() - reference.double()
                self.log(f"note: on the first image the tiled {self.what} differ from the untiled ones by "
                         f"{diff.abs().mean():.4g} on average and {diff.abs().max():.4g} at most")
            except Exception as exc:  # out of memory, most likely: the measure is only a courtesy
                if not is_out_of_memory(exc):
                    raise
                self.log(f"note: the untiled {self.what} of the first image do not fit in memory; tiling's "
                         "error was not measured")
        return out


def tiled_batches(ctx, dataset, factor: int):
    """Batches of one image each at its own size, centre-cropped to a multiple of ``factor``."""
    from .paths import native_batches

    def multiple(h, w):
        if min(h, w) < factor:
            return f"{h} x {w} px is smaller than the model's downsampling {factor}"
        return h - h % factor, w - w % factor

    return native_batches(ctx, dataset, multiple)


def tiled_reconstructor(vae, tile: int, overlap: int, factor: int, exact: dict | bool | None = None, log=None):
    """images -> reconstructions, tile by tile (what ``VAE.reconstruct`` does whole); ``exact``:
    per part ("encode", "decode") or for both; approximate tiling measures itself on the first image."""
    parts = exact if isinstance(exact, dict) else {"encode": exact, "decode": exact}

    def tiled(images):
        latents = encode_tiled(vae, images, tile, overlap, factor, parts.get("encode"))
        return decode_tiled(vae, latents, tile, overlap, factor, parts.get("decode"))

    if False in parts.values():
        return MeasureOnce(tiled, vae.reconstruct, "reconstructions (in [-1, 1])", log)
    return tiled


def tiled_encoder(vae, tile: int, overlap: int, factor: int, exact: bool | None = None, log=None):
    """The tiled counterpart of ``VAE.encode_with_codes``: (scaled latents, no codes)."""
    tiled = lambda images: encode_tiled(vae, images, tile, overlap, factor, exact)  # noqa: E731
    if exact is False:
        tiled = MeasureOnce(tiled, lambda images: vae.encode(images).mode(), "latents", log)

    def encode(images, sample=False, generator=None):
        return tiled(images) * vae.scaling_factor, None
    return encode


def tiled_decoder(vae, tile: int, overlap: int, factor: int, exact: bool | None = None, log=None):
    """Raw latents -> images in [-1, 1], tile by tile."""
    tiled = lambda z: decode_tiled(vae, z, tile, overlap, factor, exact)  # noqa: E731
    if exact is False:
        return MeasureOnce(tiled, lambda z: vae.to_image(vae.decode(z)), "images (in [-1, 1])", log)
    return tiled


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure (CUDA, MPS or the CPU allocator)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", MemoryError)):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


class FallBackToTiles:
    """Run ``whole`` on a batch; when the device runs out of memory, run the same images one at
    a time in tiles of the model's training size instead, saying so once."""

    def __init__(self, ctx, whole, what: str, log=None, make_tiled=None, parts=("encode", "decode")):
        self.ctx, self.whole, self.what, self.parts = ctx, whole, what, parts
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
        tile = int(self.ctx.data_shape[-1])
        tiling = resolve_tiling(self.ctx.vae, self.ctx.data_shape, tile, None, self.parts, explicit=False)
        self.tiled = self.make_tiled(tiling.tile, tiling.overlap, tiling.factor)
        how = "exact: equal to the untiled output" if all(tiling.exact.values()) else "approximate"
        self.log(f"note: {self.what} of size {tuple(images.shape[-2:])} did not fit in the device's memory; going on "
                 f"one at a time in tiles of {tile} px overlapping by {tiling.overlap} ({how}; as --tile {tile})")
