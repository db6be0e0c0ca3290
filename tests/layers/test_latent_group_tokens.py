"""layers/latent_groups.py: Keep and Z tokens of hierarchical VAEs, per-group KL, sampling by
group."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flexvae.build import plan_vae
from flexvae.errors import StructureError
from flexvae.forward_state import ForwardState
from helpers.hierarchy import DECODER, ENCODER, h_args, hvae
from helpers.inprocess import run_in_process
from helpers.runs import make_images


def test_plan_lists_kept_activations_and_groups():
    plan = plan_vae(ENCODER, DECODER, (1, 8, 8))
    assert plan.encoder.kept == {"x8": (8, 8, 8), "x4": (8, 4, 4)}
    assert plan.decoder.groups == [("x4", (3, 4, 4)), ("x8", (2, 8, 8))]
    assert plan.build().groups == ["x4", "x8"]


def test_total_kl_is_the_sum_of_group_kls_against_torch_distributions():
    vae = hvae()
    x = torch.randn(3, 1, 8, 8)
    out = vae(x, generator=torch.Generator().manual_seed(0))
    assert list(out.groups) == ["x4", "x8"]
    expected = kl_divergence(Normal(out.posterior.mean, out.posterior.std), Normal(0.0, 1.0)).flatten(1).sum(1)
    for group in out.groups.values():
        q = Normal(group.mean, torch.exp(0.5 * group.logvar))
        p = Normal(group.prior_mean, torch.exp(0.5 * group.prior_logvar))
        expected = expected + kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(out.kl(), expected, rtol=1e-5, atol=1e-5)
    assert all(g.kl_groups().shape == (3, g.mean.shape[1]) for g in out.groups.values())


def test_groups_start_with_zero_kl_and_a_scaled_merge():
    torch.manual_seed(0)
    vae = plan_vae(ENCODER, DECODER, (1, 8, 8)).build()
    out = vae(torch.randn(2, 1, 8, 8))
    assert all(float(g.kl().detach().abs().max()) == 0 for g in out.groups.values())
    plan = plan_vae(ENCODER, DECODER, (1, 8, 8))
    torch.manual_seed(3)
    built = plan.decoder.build()
    torch.manual_seed(3)
    unscaled = [layer.factory(**kwargs) for layer, kwargs in plan.decoder.layers]
    # two groups: each merge projection starts at 1/sqrt(2) of its default initialisation
    torch.testing.assert_close(built[1].project.weight, unscaled[1].project.weight / math.sqrt(2))
    assert built[4].project is None  # merge=cat has no projection


def test_partial_posterior_ends_are_the_prior_and_the_reconstruction():
    vae = hvae().eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(vae.partial_posterior(x, 3), vae.reconstruct(x))
    torch.testing.assert_close(vae.partial_posterior(x, 0, generator=torch.Generator().manual_seed(5)),
                               vae.sample_prior(4, generator=torch.Generator().manual_seed(5)))
    middle = vae.partial_posterior(x, 1, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(middle, vae.reconstruct(x))
    with pytest.raises(ValueError, match=r"k must lie in \[0, 3\]"):
        vae.partial_posterior(x, 4)


def test_temperatures_per_group():
    vae = hvae().eval()
    cold = vae.sample_prior(3, generator=torch.Generator().manual_seed(0), temperature=0.0)
    also_cold = vae.sample_prior(3, generator=torch.Generator().manual_seed(9), temperature={"top": 0, "x4": 0, "x8": 0})
    torch.testing.assert_close(cold, also_cold)  # every group at its prior mean: no noise left
    warm = vae.sample_prior(3, generator=torch.Generator().manual_seed(0), temperature={"x8": 0.0})
    assert not torch.allclose(cold, warm)


def test_given_group_values_are_used_as_they_are():
    vae = hvae().eval()
    x = torch.randn(2, 1, 8, 8)
    recon, posterior, state = vae.reconstruct_raw(x)
    given = ForwardState(given=dict(state.values))
    torch.testing.assert_close(vae.decode(posterior.mode(), state=given), recon)


@pytest.mark.parametrize("encoder, decoder, message", [
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x2"], r"no encoder activation is kept as 'x2'; the encoder keeps: x8, x4"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x8"], r"the encoder's 'x8' has shape \(8, 8, 8\), but the decoder's state here "
                                                r"has shape \(8, 4, 4\)"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x4", "Z_3_enc=x4"], r"a latent group named 'x4' comes twice"),
    (["C2d_1_8_3_1_1", "Keep_name=a", "Keep_name=a", "C2d_8_4_3_1_1"], ["C2d_2_1_3_1_1"], r"the name 'a' is kept twice"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3"], r"missing argument 'enc'"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x4_kernel=2"], r"kernel must be odd"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x4_merge=mul"], r"argument 'merge' must be one of add, cat"),
    (ENCODER, ["C2d_2_8_3_1_1", "Z_3_enc=x4_merge=cat", "C2d_8_1_3_1_1"], r"channel mismatch: in_channels=8, but the "
                                                                          r"previous layer's output has 11 channels"),
])
def test_grammar_errors_name_the_position_and_token(encoder, decoder, message):
    with pytest.raises(StructureError, match=message) as info:
        plan_vae(encoder, decoder, (1, 8, 8))
    assert "position" in str(info.value) and "token" in str(info.value)


def test_gradient_checkpointing_of_groups_changes_nothing(tmp_path):
    """'@' segments holding latent groups are recomputed in the backward pass with the same noise:
    the weights are bitwise those of a run without checkpointing."""
    from safetensors.torch import load_file

    images = make_images(tmp_path / "img", 8)
    decoder = ('["C2d_2_8_3_1_1", "@Z_2_enc=x8", "UpS_2", "C2d_?_8_3_1_1", "@begin", "Z_2_enc=x16_hidden=8", '
               '"GN_4_8", "@end", "SiLU", "C2d_8_3_3_1_1"]')
    for mode in ("off", "marked"):
        result = run_in_process(["-t", *h_args(images, tmp_path / mode, "--set", f"model.decoder={decoder}",
                                               "--set", f"train.grad_checkpointing={mode}")])
        assert result.returncode == 0, result.stderr
    a, b = (load_file(str(tmp_path / m / "checkpoints" / "step_00000004.safetensors")) for m in ("off", "marked"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


def test_a_decoder_can_start_from_a_learned_constant():
    torch.manual_seed(0)
    vae = plan_vae(ENCODER, ["Const_8_4_4", "Z_3_enc=x4", "UpS_2", "C2d_8_8_3_1_1", "Z_2_enc=x8", "C2d_8_1_3_1_1"],
                   (1, 8, 8)).build()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        vae.decoder[0].value.copy_(torch.randn(8, 4, 4))
    start = vae.decoder[0](torch.randn(3, 5, 2, 2))  # whatever it is given: the constant, once per image
    assert start.shape == (3, 8, 4, 4) and all(torch.equal(one, vae.decoder[0].value) for one in start)
    out = vae(x)
    assert list(out.groups) == ["x4", "x8"]
    # The group nets' last layers start at zero (prior = posterior = N(0, I), whatever h is); once
    # they have moved, the groups' KL depends on the constant and its gradient reaches it.
    with torch.no_grad():
        for group in [m for m in vae.decoder.modules() if hasattr(m, "prior") and hasattr(m, "posterior")]:
            for net in (group.prior, group.posterior):
                net[-1].weight.normal_(0, 0.1)
    vae(x).kl().sum().backward()
    assert vae.decoder[0].value.grad.abs().sum() > 0


def test_residual_branches_of_a_hierarchy_start_scaled():
    encoder = ["C2d_1_8_3_1_1", "VAERB_8_8", "Keep_name=x8", "C2d_8_4_3_1_1"]
    flat_decoder = ["C2d_2_8_3_1_1", "2*VAERB_8_8", "C2d_8_1_3_1_1"]
    deep_decoder = ["C2d_2_8_3_1_1", "2*VAERB_8_8", "Z_2_enc=x8", "C2d_8_1_3_1_1"]
    plans = {name: plan_vae(encoder, dec, (1, 8, 8)) for name, dec in (("flat", flat_decoder), ("deep", deep_decoder))}
    built = {}
    for name, plan in plans.items():
        torch.manual_seed(0)
        built[name] = plan.build()
    # the same draws (the group's layers come after the blocks); three blocks: 1/sqrt(3) in the hierarchy
    for flat_stack, deep_stack in ((built["flat"].encoder, built["deep"].encoder), (built["flat"].decoder, built["deep"].decoder)):
        flat_blocks = [m for m in flat_stack if hasattr(m, "conv2")]
        deep_blocks = [m for m in deep_stack if hasattr(m, "conv2")]
        for a, b in zip(flat_blocks, deep_blocks):
            torch.testing.assert_close(b.conv2.weight, a.conv2.weight / math.sqrt(3))
            torch.testing.assert_close(b.conv1.weight, a.conv1.weight)
