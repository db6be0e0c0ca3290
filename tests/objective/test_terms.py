"""Loss terms (objective/): the registry and token grammar, schedules, the [loss] keys as terms,
a term added from a plugin file, and the two-view and equivariance terms against references."""

import dataclasses
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from flexvae.assemble import model_from_config
from flexvae.config import load_config
from flexvae.config.schema import Config, LossConfig
from flexvae.errors import ConfigError, StructureError
from flexvae.objective import (
    Objective,
    Schedule,
    TermInputs,
    check_loss_config,
    image_of,
)
from flexvae.objective.contrast import second_view
from flexvae.objective.legacy import legacy_term_tokens
from flexvae.train.trainer import Trainer
from helpers.inprocess import run_in_process
from helpers.runs import TINY, make_images, tiny

SHAPE = (3, 16, 16)


def _cfg(**loss):
    return Config(loss=LossConfig(**loss))


def _objective(terms, **loss):
    return Objective.from_config(_cfg(terms=list(terms), **loss), SHAPE, setup=False)


class _Posterior:
    def __init__(self, mean):
        self.mean = mean

    def diagnostics(self):
        return {}

    def kl(self):
        return torch.zeros(self.mean.shape[0])


@dataclasses.dataclass
class _Out:
    recon: torch.Tensor
    posterior: object
    z: torch.Tensor | None = None
    aux: dict = dataclasses.field(default_factory=dict)
    groups: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------ terms declared = keys
def _train(tmp_path, name, *settings, steps=3):
    images = make_images(tmp_path / "images", 8)
    cfg = load_config(TINY, [f"train.out_dir={tmp_path / name}", f"data.path={images}", "train.device=cpu",
                             f"train.max_steps={steps}", *settings])
    trainer = Trainer(cfg, TINY, quiet=True)
    trainer.train()
    return trainer


# ------------------------------------------------------------------ a new term: one file, one decorator
TOY_TERM = textwrap.dedent('''
    import torch
    from flexvae.objective import Arg, Term, register_term

    @register_term("EdgeL1", Arg("power", float, 1.0, "exponent of the absolute difference"),
                   doc="mean |dx(recon) - dx(x)|^power: horizontal image gradients should match")
    class EdgeL1(Term):
        log_name = "edge"

        def __init__(self, power=1.0):
            super().__init__()
            self.power = power

        def forward(self, batch):
            dx = lambda t: t[..., 1:] - t[..., :-1]
            return (dx(batch.image) - dx(batch.x)).abs().pow(self.power).mean()
''')


# ------------------------------------------------------------------ the new terms against references
def _model(**loss):
    cfg = load_config(TINY, [f"loss.{k}={v}" for k, v in loss.items()])
    return model_from_config(cfg)[0].eval(), cfg


class _IdentityModel(torch.nn.Module):
    def decode(self, z, labels=None):
        return z

    def loss_image(self, recon):
        return recon


def _nt_xent_reference(a, b, temperature):
    """Symmetric InfoNCE by loops in float64."""
    a, b = F.normalize(a.detach().double(), dim=1), F.normalize(b.detach().double(), dim=1)
    n, total = len(a), 0.0
    for first, second in ((a, b), (b, a)):
        for i in range(n):
            logits = [float(first[i] @ second[j]) / temperature for j in range(n)]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits))) / n
    return total / 2


TOY_LIKELIHOOD = textwrap.dedent('''
    import math
    import torch
    from flexvae.objective import Likelihood, register_likelihood

    @register_likelihood("cauchy")
    class Cauchy(Likelihood):
        """A Cauchy decoder of fixed scale loss.scale_value: heavy tails for outlier pixels."""

        def __init__(self, scale=0.1):
            super().__init__()
            self.scale = scale

        @classmethod
        def from_settings(cls, channels, loss):
            return cls(loss.scale_value)

        def log_prob(self, params, x):
            t = (x.float() - params.float()) / self.scale
            return (-torch.log1p(t * t) - math.log(math.pi * self.scale)).flatten(1).sum(1)
''')


# ------------------------------------------------------------------ grammar and errors
def test_legacy_keys_are_written_as_term_tokens():
    cfg = _cfg(objective="weighted", recon="l1", recon_weight=2.0, kl_weight=1e-4, kl_schedule="linear",
               kl_warmup_steps=100, ssim=True, ssim_weight=0.5, sparse=True, sparse_weight=0.003, perceptual_weight=0.25)
    assert legacy_term_tokens(cfg) == ["Recon_kind=l1_weight=2.0", "KL_weight=0.0001_warmup=100",
                                       "SSIM_kind=auto_weight=0.5", "Sparse_weight=0.003", "LPIPS_weight=0.25"]
    elbo = dataclasses.replace(cfg, loss=LossConfig(objective="elbo", kl_schedule="cyclical", kl_cycle_steps=50))
    assert legacy_term_tokens(elbo) == ["NLL", "KL_weight=0.0001_cycle=50_ratio=0.5"]


@pytest.mark.parametrize("terms, message", [
    (["NLL", "KLD"], r"position 2, token 'KLD': unknown loss term 'KLD'\. Did you mean 'KL'"),
    (["SSIM_kind=fast"], r"argument 'kind' must be one of auto, ssim, ms-ssim, found 'fast'"),
    (["KL_weight=-1"], r"weight must be at least 0, found -1"),
    (["KL_warmup=2.5"], r"warmup must be a whole number of steps"),
    (["KL_warmup=10_cycle=5"], r"warmup= or cycle=, not both"),
    (["KL_start=10_stop=5"], r"stop=5 must come after start=10"),
    (["Equiv_scale=2"], r"position 1, token 'Equiv_scale=2': scale must be in \(0, 1\]"),
    (["KL_colour=3"], r"KL has no argument 'colour'"),
    (["2*KL"], r"no N\* repeat"),
    (["NLL", "KL", "NLL"], r"the NLL term is declared twice"),
])
def test_bad_term_tokens_get_one_line_naming_position_and_token(terms, message):
    with pytest.raises((StructureError, ConfigError), match=message) as info:
        _objective(terms, objective="elbo")
    assert "\n" not in str(info.value)


def test_terms_that_do_not_fit_the_data_or_objective_are_refused():
    with pytest.raises(StructureError, match="position 1.*NLL term needs the model's likelihood"):
        _objective(["NLL"], objective="weighted")
    with pytest.raises(StructureError, match="SSIM term needs 2D or 3D data"):
        Objective.from_config(_cfg(terms=["Recon", "SSIM"]), (3, 64), setup=False)
    with pytest.raises(StructureError, match="LPIPS with net 'alex' needs images of at least 31 px"):
        _objective(["Recon", "LPIPS_net=alex"])
    # a [loss] key that declares a term, set beside loss.terms, is a contradiction
    with pytest.raises(ConfigError, match=r"loss\.ssim is set, and so is loss\.terms"):
        check_loss_config(_cfg(terms=["Recon"], ssim=True), SHAPE)
    with pytest.raises(ConfigError, match="adversarial.discriminator is set but loss.terms has no Adv"):
        check_loss_config(dataclasses.replace(_cfg(terms=["Recon"]), adversarial=dataclasses.replace(
            Config().adversarial, discriminator="structures/small_discriminator.json")), SHAPE)


def test_cli_lists_terms_and_reports_a_bad_term_in_one_line(tmp_path):
    listed = run_in_process(["--terms"])
    assert listed.returncode == 0
    for name in ("NLL(", "Recon(kind=mse)", "KL(", "SSIM(", "LPIPS(", "Adv(", "Equiv(", "Contrast(", "Align("):
        assert name in listed.stdout
    assert "warmup=N" in listed.stdout
    images = make_images(tmp_path / "images", 4)
    bad = run_in_process(["-t", *tiny(images, tmp_path / "run", "--set", 'loss.terms=["Recon", "KLL"]')])
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loss.terms, position 2, token 'KLL': unknown loss term")
    assert "Did you mean 'KL'" in lines[0]


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize("step", [0, 1, 5, 9, 10, 11, 24, 25, 26, 40, 99])
def test_schedules_against_their_formulas(step):
    def spec(text):
        from flexvae.dsl.grammar import parse_token
        return Schedule.from_spec(parse_token(text))

    assert spec("KL_weight=0.5").weight_at(step) == 0.5
    warm = spec("KL_weight=2_start=10_warmup=8").weight_at(step)
    assert warm == pytest.approx(0.0 if step < 10 else 2 * min(1.0, (step - 10) / 8))
    cyc = spec("KL_weight=3_cycle=10_ratio=0.25").weight_at(step)
    assert cyc == pytest.approx(3 * min(1.0, (step % 10) / 10 / 0.25))
    window = spec("KL_start=10_stop=25")
    assert window.active(step) == (10 <= step < 25) and window.weight_at(step) == (1.0 if 10 <= step < 25 else 0.0)


def test_a_term_outside_its_steps_is_not_computed_and_logs_nan():
    objective = _objective(["Recon", "Sparse_weight=0.5_start=3"])
    x = torch.rand(2, *SHAPE) * 2 - 1
    posterior = _Posterior(torch.randn(2, 4, 8, 8))
    out = _Out(x * 0.5, posterior)
    before = objective(TermInputs(x, out, out.recon, None, step=2))
    assert math.isnan(float(before.terms["sparse"]))
    torch.testing.assert_close(before.total, F.mse_loss(out.recon, x))
    after = objective(TermInputs(x, out, out.recon, None, step=3))
    torch.testing.assert_close(after.total, F.mse_loss(out.recon, x) + 0.5 * posterior.mean.abs().mean())


def test_terms_declared_as_tokens_train_the_same_weights_as_the_keys(tmp_path):
    keys = _train(tmp_path, "keys", "loss.ssim=true", "loss.ssim_weight=0.5", "loss.kl_weight=0.01",
                  "loss.kl_schedule=linear", "loss.kl_warmup_steps=2", "loss.sparse=true")
    tokens = _train(tmp_path, "tokens", 'loss.terms=["Recon_kind=mse", "KL_weight=0.01_warmup=2", '
                                        '"SSIM_weight=0.5", "Sparse_weight=0.001"]')
    for (name, a), (_, b) in zip(keys.model.state_dict().items(), tokens.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_term_from_a_plugin_file_is_one_class_and_one_decorator(tmp_path):
    plugin = tmp_path / "edge_term.py"
    plugin.write_text(TOY_TERM)
    trainer = _train(tmp_path, "toy", f"model.plugins={plugin}",
                     'loss.terms=["Recon", "KL_weight=0.0001", "EdgeL1_power=2_weight=0.3"]', steps=2)
    header, *rows = (tmp_path / "toy" / "metrics.csv").read_text().splitlines()
    assert "edge" in header.split(",")
    # the objective's total for a batch equals the terms written out by hand
    x = torch.rand(2, *SHAPE) * 2 - 1
    model = trainer.model.eval()
    out = model(x, sample=False)
    result = trainer.objective(TermInputs(x, out, image_of(out.recon, model), model, step=5))
    dx = lambda t: t[..., 1:] - t[..., :-1]  # noqa: E731
    expected = (F.mse_loss(out.recon, x) + 1e-4 * out.posterior.kl_elements().mean()
                + 0.3 * (dx(out.recon) - dx(x)).pow(2).mean())
    torch.testing.assert_close(result.total, expected)


def test_equivariance_term_against_a_reference():
    model, cfg = _model()
    objective = Objective.from_config(dataclasses.replace(cfg, loss=dataclasses.replace(
        cfg.loss, terms=["Recon", "Equiv_scale=0.5_rotate=true"])), SHAPE, setup=False)
    term = objective.term("Equiv")
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = model(x, sample=False)
    batch = TermInputs(x, out, out.recon, model, step=7, seed=3, micro=1)
    turns, scale = term.transform(3, 7, 1)
    assert 0.5 <= scale <= 1 and turns in range(4)
    # the reference, written out: scale the latent grid, rotate, decode; the image the same way
    side = max(1, round(8 * scale))
    z = F.interpolate(out.z.double(), size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    z = torch.rot90(z, turns, dims=(-2, -1)).float()
    decoded = model.decode(z)
    target = F.interpolate(torch.rot90(x, turns, dims=(-2, -1)).double(), size=decoded.shape[2:], mode="bilinear",
                           align_corners=False, antialias=True)
    expected = (decoded.double() - target).pow(2).mean()
    assert float(term(batch).detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    # a perfectly equivariant "model" (identity maps) scores 0 whatever the transform
    identity = _IdentityModel()
    x8 = torch.rand(2, 4, 8, 8) * 2 - 1
    out = _Out(x8, None, z=x8)
    for step in range(6):
        assert float(term(TermInputs(x8, out, x8, identity, step=step))) < 1e-10


def test_second_view_is_seeded_and_split_like_the_flips():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    whole = second_view(x, 0, 5, 0)
    assert torch.equal(whole, second_view(x, 0, 5, 0)) and not torch.equal(whole, second_view(x, 0, 6, 0))
    halves = [second_view(x[r::2], 0, 5, 0, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(halves[0], whole[0::2]) and torch.equal(halves[1], whole[1::2])


def test_contrast_term_against_a_reference():
    model, cfg = _model()
    objective = Objective.from_config(dataclasses.replace(cfg, loss=dataclasses.replace(
        cfg.loss, terms=["Recon", "Contrast_temperature=0.5"])), SHAPE, setup=False)
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = model(x, sample=False)
    value = objective.term("Contrast")(TermInputs(x, out, out.recon, model, step=2, seed=0, micro=0))
    other = model.encode(second_view(x, 0, 2, 0, crop=0.7))
    expected = _nt_xent_reference(out.posterior.mean.flatten(1), other.mean.flatten(1), 0.5)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)


def test_align_term_against_a_reference():
    model, cfg = _model()
    objective = Objective.from_config(dataclasses.replace(cfg, loss=dataclasses.replace(
        cfg.loss, terms=["Recon", "Align_temperature=0.3"])), SHAPE, setup=False)
    codes = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, -1, 1, 2])
    value = objective.term("Align")(TermInputs(codes, _Out(codes, _Posterior(codes)), codes, model, labels=labels))
    kept = [i for i in range(6) if labels[i] >= 0]
    z = F.normalize(codes.flatten(1).double(), dim=1)
    losses = []
    for i in kept:
        positives = [p for p in kept if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        log_norm = math.log(sum(math.exp(float(z[i] @ z[k]) / 0.3) for k in kept if k != i))
        losses.append(-sum(float(z[i] @ z[p]) / 0.3 - log_norm for p in positives) / len(positives))
    assert float(value) == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    unlabelled = objective.term("Align")(TermInputs(codes, _Out(codes, _Posterior(codes)), codes, model,
                                                    labels=torch.full((6,), -1)))
    assert float(unlabelled) == 0.0


def test_align_needs_labels(tmp_path):
    with pytest.raises(ConfigError, match="Align term needs class labels"):
        _train(tmp_path, "align", 'loss.terms=["Recon", "Align"]')


@pytest.mark.slow
def test_shipped_presets_train_the_weights_they_trained_before_the_objective_module(tmp_path):
    """The default, digits, VQ and GAN presets, 3 steps each: every tensor's sum as the code before
    objective/ existed gave it (tests/helpers/preset_sums.json; equal to the bit on the machine that
    wrote it, within float tolerance on another CPU)."""
    import json
    import subprocess
    import sys

    from helpers.preset_sums import PRESETS, REPO, preset_sums

    reference = json.loads((REPO / "tests" / "helpers" / "preset_sums.json").read_text())
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits.py"), str(tmp_path / "digits"),
                    "--holdout", "0.25"], check=True, capture_output=True)
    for name in PRESETS:
        now = preset_sums(name, tmp_path / name, tmp_path / "digits" / "train")
        assert set(now) == set(reference[name]), name
        for key, value in reference[name].items():
            assert now[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)


def test_a_likelihood_from_a_plugin_file_is_one_class_and_one_decorator(tmp_path):
    plugin = tmp_path / "cauchy.py"
    plugin.write_text(TOY_LIKELIHOOD)
    trainer = _train(tmp_path, "cauchy", f"model.plugins={plugin}", "loss.objective=elbo", "loss.likelihood=cauchy",
                     "loss.scale_value=0.2", steps=2)
    x = torch.rand(2, *SHAPE) * 2 - 1
    model = trainer.model.eval()
    out = model(x, sample=False)
    nll = trainer.objective(TermInputs(x, out, image_of(out.recon, model), model, step=3)).terms["nll"]
    t = (x.double() - out.recon.double()) / 0.2
    expected = -(-torch.log1p(t * t) - math.log(math.pi * 0.2)).flatten(1).sum(1).mean()
    assert float(nll.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    with pytest.raises(ConfigError, match=r"loss.likelihood = 'gausian' is not a likelihood\. Did you mean 'gaussian'"):
        _train(tmp_path, "typo", "loss.objective=elbo", "loss.likelihood=gausian")


@pytest.mark.parametrize("recon, output", [("mse", "value"), ("l1", "value"), ("bce", "logits")])
def test_a_weighted_model_has_its_criterion_as_likelihood(recon, output):
    model, _ = _model(objective="weighted", recon=recon)
    assert model.likelihood.name == recon and not model.likelihood.proper and model.output == output
    assert not [k for k in model.state_dict() if k.startswith("likelihood.")]  # nothing new in checkpoints
    x = torch.rand(2, *SHAPE) * 2 - 1
    params = torch.randn(2, *SHAPE)
    expected = {"mse": F.mse_loss(params, x), "l1": F.l1_loss(params, x),
                "bce": F.binary_cross_entropy_with_logits(params, (x + 1) / 2)}[recon]
    torch.testing.assert_close(model.likelihood.loss(params, x), expected)
    image = torch.sigmoid(params) * 2 - 1 if recon == "bce" else params
    torch.testing.assert_close(model.loss_image(params), image)


def test_the_elbo_objective_refuses_a_criterion_as_its_likelihood():
    with pytest.raises(ConfigError, match="'mse' is a criterion of the weighted objective, not a likelihood"):
        _model(objective="elbo", likelihood="mse")


def test_equivariance_needs_a_latent_grid(tmp_path):
    images = make_images(tmp_path / "images", 4)
    cfg = load_config(TINY, [f"train.out_dir={tmp_path / 'run'}", f"data.path={images}", "train.device=cpu",
                             'model.encoder=["Flat", "Lin_768_8"]', 'model.decoder=["Lin_4_768", "Reshape_3_16_16"]',
                             'loss.terms=["Recon", "KL", "Equiv"]'])
    with pytest.raises(ConfigError, match=r"loss.terms: Equiv: the Equiv term scales and rotates a latent grid .*"
                                          r"this model's latent is 4$"):
        Trainer(cfg, TINY, quiet=True)


def test_an_adaptive_adversarial_term_alone_is_refused():
    cfg = dataclasses.replace(_cfg(terms=["Adv"]), adversarial=dataclasses.replace(
        Config().adversarial, discriminator="structures/small_discriminator.json"))
    with pytest.raises(ConfigError, match="adaptive weight compares its gradient with the other terms'"):
        Objective.from_config(cfg, SHAPE, setup=False)
