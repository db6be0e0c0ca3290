"""The SSIM term: 1 - SSIM (or MS-SSIM) between the reconstruction and the image."""

from __future__ import annotations

from ..errors import ConfigError
from ..metrics import pick_ssim_kind, similarity_loss_value
from .term import Arg, Term, register_term


@register_term("SSIM", Arg("kind", str, "auto", "auto (MS-SSIM when the images are large enough), ssim or "
                                                "ms-ssim", choices=("auto", "ssim", "ms-ssim")),
               doc="1 - SSIM of the reconstruction (images on [0, 1], data range 1)")
class SSIMTerm(Term):
    log_name = "ssim"

    def __init__(self, kind: str = "auto"):
        super().__init__()
        self.kind = kind

    def check(self, data_shape, objective):
        spatial = tuple(data_shape[1:])
        if len(spatial) not in (2, 3):
            raise ConfigError(f"the SSIM term needs 2D or 3D data; this data has shape {tuple(data_shape)}")
        if min(spatial) < 3:
            raise ConfigError(f"the SSIM term needs images at least 3 px on every side, got {spatial}")
        pick_ssim_kind(self.kind, spatial)

    def forward(self, batch):
        return 1 - similarity_loss_value(batch.image, batch.x, self.kind)
