"""Quantizer tokens: the latents' quantizers placed at any position of an encoder or decoder.

    "VQ_512_?"                  512-entry codebook, code dimension = the input's channels
    "VQ_512_64_beta=0.5"        commitment weight 0.5
    "VQ_512_?_decay=0_dead=0"   codebook learned by gradient, no dead-code restart
    "FSQ_8_5_5_5"               4 channels quantized to 8, 5, 5 and 5 levels
    "RVQ_4_512_?"               residual VQ: 4 codebooks of 512 in turn
    "LFQ_?"                     lookup-free: every channel to its sign (2^channels codes)
    "BSQ_?_entropy=0.05"        binary spherical: signs of the unit-sphere projection

Each quantizes every position's channel vector of a (C, *spatial) map (or a (C,) vector);
the output has the input's shape. Their losses (``vq_commit``, and ``vq_codebook`` without
EMA) are returned as auxiliary outputs: the VAE adds them to the total loss and logs them as
``enc_<loss>_<index>`` / ``dec_<loss>_<index>`` (index = 0-based layer position after
unrolling repeats). A VQ token's codebook usage and perplexity are logged the same way.
"""

from __future__ import annotations

from ..latents.binary import BinaryQuantizer
from ..latents.fsq import FiniteScalarQuantizer
from ..latents.rvq import ResidualQuantizer
from ..latents.vq import VectorQuantizer
from ..registry import Arg, register


@register(
    "VQ",
    Arg("codebook_size", doc="codebook entries"),
    Arg("dim", infer="channels", doc="code dimension: the input's channels"),
    Arg("beta", float, 0.25, doc="commitment loss weight"),
    Arg("decay", float, 0.99, doc="EMA decay of the codebook; 0 = learned by gradient (adds a codebook loss)"),
    Arg("dead", float, 0.1, doc="restart codes used less than this fraction of an even share; 0 = never"),
    Arg("kmeans", bool, False, doc="k-means initialisation on the first training batch"),
    doc="vector quantization of each position's channels (aux loss vq_commit); output shape = input shape",
    aux=True,
)
class VQLayer(VectorQuantizer):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, decay: float = 0.99,
                 dead: float = 0.1, kmeans: bool = False):
        super().__init__(codebook_size, dim, commitment=beta, decay=decay, dead_threshold=dead, kmeans_init=kmeans)

    def forward(self, x):
        z_q, _, losses = super().forward(x)
        return z_q, losses


@register(
    "FSQ",
    Arg("levels", variadic=True, doc="levels per channel (each >= 2); the input has one channel per level"),
    doc="finite scalar quantization of each channel to a few levels in [-1, 1]; no loss; output shape = input shape",
    aux=True,
)
class FSQLayer(FiniteScalarQuantizer):
    def forward(self, x):
        z_q, _, losses = super().forward(x)
        return z_q, losses


def _binary_token(name: str, spherical: bool):
    @register(
        name,
        Arg("bits", infer="channels", doc="bits = the input's channels"),
        Arg("commit", float, 0.25, doc="commitment loss weight"),
        Arg("entropy", float, 0.1, doc="entropy loss weight (0 = none)"),
        Arg("diversity", float, 1.0, doc="weight of the codebook entropy inside the entropy loss"),
        Arg("temperature", float, 0.01, doc="temperature of the soft code assignment"),
        doc=("binary spherical quantization (BSQ): signs of the unit-sphere projection, scaled by 1/sqrt(bits)"
             if spherical else "lookup-free quantization (LFQ): each channel to its sign, 2^bits codes")
        + f"; aux losses {name.lower()}_commit, {name.lower()}_entropy",
        aux=True,
    )
    class BinaryLayer(BinaryQuantizer):
        def __init__(self, bits: int, commit: float = 0.25, entropy: float = 0.1, diversity: float = 1.0,
                     temperature: float = 0.01):
            super().__init__(bits, spherical, commit, entropy, diversity, temperature)

        def forward(self, x):
            q, _, losses = super().forward(x)
            return q, losses

    BinaryLayer.__name__ = BinaryLayer.__qualname__ = f"{name}Layer"
    return BinaryLayer


LFQLayer = _binary_token("LFQ", spherical=False)
BSQLayer = _binary_token("BSQ", spherical=True)


@register(
    "RVQ",
    Arg("levels", doc="codebooks applied in turn to the residual"),
    Arg("codebook_size", doc="entries per codebook"),
    Arg("dim", infer="channels", doc="code dimension: the input's channels"),
    Arg("beta", float, 0.25, doc="commitment loss weight"),
    Arg("decay", float, 0.99, doc="EMA decay of the codebooks; 0 = learned by gradient"),
    Arg("dead", float, 0.1, doc="restart codes used less than this fraction of an even share; 0 = never"),
    doc="residual vector quantization (aux loss rvq_commit); output shape = input shape",
    aux=True,
)
class RVQLayer(ResidualQuantizer):
    def __init__(self, levels: int, codebook_size: int, dim: int, beta: float = 0.25, decay: float = 0.99,
                 dead: float = 0.1):
        super().__init__(levels, codebook_size, dim, beta, decay, dead)

    def forward(self, x):
        z_q, _, losses = super().forward(x)
        return z_q, losses
