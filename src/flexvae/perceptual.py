"""LPIPS perceptual distance (the optional ``lpips`` package: ``pip install 'flexvae[lpips]'``).

The lpips package ships its calibrated linear heads; the backbone (VGG16 or AlexNet features)
needs torchvision's ImageNet weights, found offline first: ``loss.perceptual_weights`` names a
file (a torchvision state dict, .pth or .safetensors, whole model or ``features`` only), else
torchvision's cache (``$TORCH_HOME/hub/checkpoints``) is used, else they are downloaded once.
``"random"`` keeps an untrained backbone: a distance with LPIPS's properties but no perceptual
meaning, for tests. Images are in [-1, 1] (what lpips expects); grey images are repeated to RGB.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ConfigError

# loss.perceptual_net -> (torchvision builder, weights enum)
BACKBONES = {"vgg": ("vgg16", "VGG16_Weights"), "alex": ("alexnet", "AlexNet_Weights")}


class PerceptualDistance(nn.Module):
    """LPIPS(a, b) per image, shape (B,); frozen and always in eval mode (no dropout)."""

    def __init__(self, lpips_model: nn.Module):
        super().__init__()
        self.lpips = lpips_model
        for parameter in self.lpips.parameters():
            parameter.requires_grad_(False)
        self.lpips.eval()

    def train(self, mode: bool = True):
        return self  # a fixed metric: never in training mode

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, *a.shape[2:]), b.expand(-1, 3, *b.shape[2:])
        return self.lpips(a, b).flatten()


def load_perceptual(net: str = "vgg", weights: str = "", device=None) -> PerceptualDistance:
    """The LPIPS distance with ``net``'s backbone; ConfigError with one actionable line when
    the package or the backbone weights are missing."""
    if net not in BACKBONES:
        raise ConfigError(f"loss.perceptual_net: unknown backbone {net!r}; expected one of {', '.join(BACKBONES)}")
    try:
        import lpips
    except ImportError:
        raise ConfigError("loss.perceptual_weight > 0 needs the lpips package: pip install 'flexvae[lpips]'") from None
    with warnings.catch_warnings():  # lpips builds torchvision models with the deprecated pretrained=
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if weights != "random":
        _load_backbone(model.net, net, backbone_state(net, weights))
    return PerceptualDistance(model).to(device or "cpu")


def backbone_state(net: str, weights: str = "") -> dict:
    """The backbone's torchvision state dict, from ``weights`` (a file) or torchvision's cache/download."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"loss.perceptual_weights: file not found: {path}")
        return _read_state(path)
    import torchvision

    builder, enum_name = BACKBONES[net]
    url = getattr(torchvision.models, enum_name).IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if cached.is_file():
        return _read_state(cached)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu", weights_only=True)
    except Exception as exc:  # URLError, HTTPError, OSError, hash mismatch: all mean "not available here"
        raise ConfigError(
            f"LPIPS needs the {builder} ImageNet weights and they could not be downloaded "
            f"({type(exc).__name__}); put {cached.name} (from {url}) in {cached.parent}, "
            "or set loss.perceptual_weights to its path") from None


def _read_state(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"loss.perceptual_weights: cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"loss.perceptual_weights: {path} does not hold a state dict")
    return state


def _load_backbone(lpips_net: nn.Module, net: str, state: dict) -> None:
    """Copy torchvision ``features.N.*`` weights into lpips's slices (which keep the index N)."""
    features = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
    by_index = {}
    for slice_module in lpips_net.children():
        for name, module in slice_module.named_children():
            by_index[name] = module
    for name, module in by_index.items():
        wanted = module.state_dict()
        if not wanted:
            continue
        found = {k: features.get(f"{name}.{k}") for k in wanted}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            raise ConfigError(f"loss.perceptual_weights: not {BACKBONES[net][0]} weights: "
                              f"features.{name}.{missing[0]} is missing")
        if any(tuple(v.shape) != tuple(wanted[k].shape) for k, v in found.items()):
            raise ConfigError(f"loss.perceptual_weights: not {BACKBONES[net][0]} weights: "
                              f"features.{name} has other shapes")
        module.load_state_dict(found)
