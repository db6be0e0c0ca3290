"""Inputs for the objective's tests: smooth images, loss configs, model outputs and batches."""

import dataclasses

import torch

from flexvae.config import LossConfig
from flexvae.latents import DiagonalGaussian
from flexvae.model import VAEOutput


def grid_images(shape=(3, 3, 5, 4), seed=0):
    """8-bit images on [-1, 1], with the extreme levels present."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, shape, generator=generator)
    levels.view(-1)[:2] = torch.tensor([0, 255])
    return levels.float() / 127.5 - 1


def loss_cfg(**changes):
    return dataclasses.replace(LossConfig(), **changes)


class TinyOutputModel(torch.nn.Module):
    """Stands in for a VAE where the objective only asks for its likelihood and balance."""

    def __init__(self, likelihood=None, balance=None):
        super().__init__()
        self.likelihood, self.balance = likelihood, balance


def output(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = grid_images((4, 3, 8, 8), seed)
    recon = x + 0.1 * torch.randn(x.shape, generator=generator)
    posterior = DiagonalGaussian(torch.randn(4, 2, 4, 4, generator=generator),
                                 torch.randn(4, 2, 4, 4, generator=generator) - 1)
    return x, VAEOutput(recon, posterior, posterior.mean)


def cfg(**changes) -> LossConfig:
    return dataclasses.replace(LossConfig(), **changes)


def batch(shape=(2, 3, 16, 16), latent=(2, 4, 4, 4), seed=0):
    """Images in [-1, 1], a nearby reconstruction and a posterior."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator) * 2 - 1
    recon = (x + 0.2 * torch.randn(shape, generator=generator)).clamp(-1, 1)
    mean = torch.randn(latent, generator=generator)
    logvar = torch.randn(latent, generator=generator)
    posterior = DiagonalGaussian(mean, logvar)
    return x, VAEOutput(recon, posterior, posterior.mean)
