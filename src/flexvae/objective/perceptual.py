"""The LPIPS term: the perceptual distance of the reconstruction to the image (mean per image).

The network comes from ``flexvae.perceptual`` (the ``lpips`` package's calibrated heads over a
VGG16 or AlexNet backbone); ``loss.perceptual_weights`` says where the backbone's weights are.
"""

from __future__ import annotations

from ..errors import ConfigError
from .term import FROM_CONFIG, Arg, Term, register_term

# The smallest image each LPIPS backbone's pooling stages leave at least one position of.
PERCEPTUAL_MIN_SIZE = {"vgg": 16, "alex": 31}


@register_term("LPIPS", Arg("net", str, FROM_CONFIG, "vgg (VGG16) or alex (AlexNet); default loss.perceptual_net",
                            choices=("vgg", "alex")),
               doc="LPIPS perceptual distance of the reconstruction (needs the lpips extra)")
class LPIPS(Term):
    log_name = "perceptual"

    def __init__(self, net=FROM_CONFIG, settings=None):
        super().__init__()
        self.net = net if net is not FROM_CONFIG else getattr(settings, "perceptual_net", "vgg")
        self.weights = settings.perceptual_weights if settings is not None else ""
        self.distance = None

    def setup(self, device, **context):
        from ..perceptual import load_perceptual

        # kept outside the module tree: a fixed metric, not part of any state to save
        self.__dict__["distance"] = load_perceptual(self.net, self.weights, device)

    def check(self, data_shape, objective):
        spatial = tuple(data_shape[1:])
        if len(spatial) != 2 or data_shape[0] not in (1, 3):
            raise ConfigError(f"the LPIPS term needs 2D grey or RGB images; this data has shape {tuple(data_shape)}")
        smallest = PERCEPTUAL_MIN_SIZE[self.net]
        if min(spatial) < smallest:
            raise ConfigError(f"LPIPS with net {self.net!r} needs images of at least {smallest} px, got {spatial}"
                              + ("; 'vgg' takes 16 px" if self.net == "alex" else ""))

    def forward(self, batch):
        return self.distance(batch.image.float(), batch.x.float()).mean()
