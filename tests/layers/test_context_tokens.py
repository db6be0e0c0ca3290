"""layers/context.py: context tokens (class embeddings, FiLM) in 1D, 2D and 3D structures."""

from __future__ import annotations

import pytest
import torch

from flexvae.build import plan_vae
from flexvae.errors import StructureError
from helpers.labelled import CLASSES


# ------------------------------------------------------------------ context tokens
@pytest.mark.parametrize("shape, encoder, decoder", [
    ((1, 8), ["C1d_1_4_3_1_1", "CtxCat_2", "C1d_6_4_3_1_1"], ["CtxFiLM_2", "C1d_2_1_3_1_1"]),
    ((1, 8, 8), ["C2d_1_4_3_1_1", "CtxFiLM_?", "C2d_4_4_3_1_1"], ["CtxCat_3", "C2d_5_1_3_1_1"]),
    ((1, 4, 4, 4), ["C3d_1_4_3_1_1", "CtxCat_1", "C3d_5_4_3_1_1"], ["CtxFiLM_?", "C3d_2_1_3_1_1"]),
])
def test_context_tokens_in_1d_2d_3d_change_the_output_and_train_their_embedding(shape, encoder, decoder):
    torch.manual_seed(0)
    vae = plan_vae(encoder, decoder, shape, classes=3).build()
    vae.class_names = CLASSES
    with torch.no_grad():  # FiLM starts as the identity: give its table values so labels differ
        for module in [*vae.encoder, *vae.decoder]:
            if hasattr(module, "table"):
                module.table.normal_()
    x = torch.randn(2, *shape)
    z = vae.encode(x).mode()
    first, second = vae.decode(z, torch.tensor([0, 0])), vae.decode(z, torch.tensor([1, 2]))
    assert first.shape == x.shape and not torch.allclose(first, second)
    out = vae(x, labels=torch.tensor([1, -1]))
    out.recon.square().sum().backward()
    tables = [m.table for m in [*vae.encoder, *vae.decoder] if hasattr(m, "table")]
    assert len(tables) == 2 and all(t.grad is not None and t.grad[:2].abs().sum() > 0 for t in tables)
    assert all(t.grad[0].abs().sum() == 0 for t in tables)  # class 0 was not in the batch


def test_film_starts_as_the_identity_and_soft_labels_mix_embeddings():
    from flexvae.layers.context import ContextConcat, ContextFiLM, class_weights

    film = ContextFiLM(4, classes=3)
    x = torch.randn(2, 4, 5)
    assert torch.equal(film(x, torch.tensor([0, 2])), x)
    cat = ContextConcat(2, classes=3)
    mixed = cat(x, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))[:, 4:, 0]
    assert torch.allclose(mixed[0], (cat.table[0] + cat.table[1]) / 2) and torch.allclose(mixed[1], cat.table[2])
    assert torch.equal(cat(x, None)[:, 4:], torch.zeros(2, 2, 5))  # "no label" row starts at zero
    assert class_weights(torch.tensor([1, -1]), 3).tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        class_weights(torch.tensor([3]), 3)


def test_a_context_token_without_labels_is_reported_at_its_position():
    with pytest.raises(StructureError) as info:
        plan_vae(["C2d_1_4_3_1_1", "CtxCat_2", "C2d_6_2_3_1_1"], ["C2d_1_1_3_1_1"], (1, 8, 8))
    text = str(info.value)
    assert "position 2" in text and "CtxCat_2" in text and "data.labels to 'folders'" in text


def test_a_context_token_is_shape_checked_like_any_token():
    with pytest.raises(StructureError, match=r"channel mismatch: channels=5, but the previous layer's output has 4"):
        plan_vae(["C2d_1_4_3_1_1", "CtxFiLM_5", "C2d_4_2_3_1_1"], ["C2d_1_1_3_1_1"], (1, 8, 8), classes=2)
    with pytest.raises(StructureError, match="C2d_5_2_3_1_1"):  # CtxCat adds its 2 features: 6 channels follow
        plan_vae(["C2d_1_4_3_1_1", "CtxCat_2", "C2d_5_2_3_1_1"], ["C2d_1_1_3_1_1"], (1, 8, 8), classes=2)


def test_context_tokens_work_in_hierarchical_structures():
    """Labels reach context tokens on both sides of a hierarchy's latent groups (one pass's state)."""
    torch.manual_seed(0)
    encoder = ["C2d_1_8_3_1_1", "CtxFiLM_?", "Keep_name=x8", "Down_?_8", "C2d_8_4_3_1_1"]
    decoder = ["C2d_2_8_3_1_1", "UpS_2", "CtxCat_2", "Z_3_enc=x8", "C2d_10_1_3_1_1"]
    vae = plan_vae(encoder, decoder, (1, 8, 8), classes=3).build().eval()
    vae.class_names = CLASSES
    with torch.no_grad():
        for module in [*vae.encoder, *vae.decoder]:
            if hasattr(module, "table"):
                module.table.normal_()
    x = torch.randn(2, 1, 8, 8)
    a, b = vae.reconstruct(x, torch.tensor([0, 0])), vae.reconstruct(x, torch.tensor([1, 2]))
    assert not torch.allclose(a, b) and vae.groups == ["x8"] and vae.takes_labels
    assert vae.sample_prior(3, labels=torch.tensor([0, 1, 2])).shape == (3, 1, 8, 8)
    out = vae(x, labels=torch.tensor([1, 2]))
    assert list(out.groups) == ["x8"] and out.kl().shape == (2,)
