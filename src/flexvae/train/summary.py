"""The model's layer table (torchinfo), printed at the start of a run."""

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


def model_summary(model, data_shape, device) -> str:
    # In eval mode, so the summary's forward pass updates no statistics (BatchNorm, VQ codebooks).
    was_training = model.training
    model.eval()
    try:
        from torchinfo import summary

        return str(summary(_Reconstruction(model), input_size=(1, *data_shape), device=device, depth=3,
                           verbose=0, col_names=("output_size", "num_params"), mode="eval"))
    except Exception as exc:  # a summary is a courtesy; never fail a run over it
        return f"(torchinfo summary unavailable: {exc})"
    finally:
        model.train(was_training)
