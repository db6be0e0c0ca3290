"""train/trainer.py, the training loop in-process: resuming is exact (flat and hierarchical
models), Ctrl-C saves, the config in force is used."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flexvae.checkpoint import list_checkpoints, load_checkpoint
from flexvae.config import load_config
from flexvae.errors import TrainingError
from flexvae.train import trainer as trainer_module
from flexvae.train.sampler import StreamSampler
from flexvae.train.step import lr_factor, random_flip
from flexvae.train.trainer import Trainer
from helpers.hierarchy import h_args
from helpers.inprocess import run_in_process
from helpers.runs import TINY, tiny
from helpers.runs import make_images as random_images

pytestmark = pytest.mark.usefixtures("in_repo")  # configs name their structures from the repository root



def make_images(root: Path, good: int, broken: int) -> Path:
    """``good`` small PNG/JPEG images in nested folders, ``broken`` unreadable ones
    (text named .png, and a truncated PNG)."""
    rng = np.random.default_rng(2)
    for i in range(good):
        path = root / f"set{i % 3}" / ("deep" if i % 2 else "") / f"img{i}.{'jpg' if i % 4 == 3 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = 16 + i % 3 * 4, 24
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), 25.0 * i)], -1)
        Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)).save(path)
    data = next(root.rglob("*.png")).read_bytes()
    for i in range(broken):
        bad = root / f"bad{i}" / "broken.png"
        bad.parent.mkdir(parents=True, exist_ok=True)
        if i % 2:
            bad.write_bytes(data[: len(data) // 2])
        else:
            bad.write_text("not a PNG")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("train") / "images", good=10, broken=2)


def config(images: Path, out: Path, *overrides):
    return load_config(TINY, [f"train.out_dir={out}", f"data.path={images}", "data.num_workers=0",
                              "train.device=cpu", *overrides])


def run(images, out, *overrides) -> Trainer:
    trainer = Trainer(config(images, out, *overrides), TINY, quiet=True)
    trainer.train()
    return trainer


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1]))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    keys = [k for k in wa if k.startswith(("model.", "ema."))]
    assert keys and keys == [k for k in wb if k.startswith(("model.", "ema."))]
    for key in keys:
        assert torch.allclose(wa[key], wb[key], rtol=0, atol=1e-6), key


# ------------------------------------------------------------------ resume
def test_stopped_and_resumed_run_matches_an_uninterrupted_one(images, tmp_path):
    """A: 6 steps straight. B: max_steps 3, then the same command with max_steps 6.
    (A constant schedule: under cosine, max_steps itself shapes the learning rate.)"""
    common = ("train.save_every=3", "train.schedule=constant", "train.ema=true", "train.grad_accum=2")
    run(images, tmp_path / "A", "train.max_steps=6", *common)
    first = run(images, tmp_path / "B", "train.max_steps=3", *common)
    assert first.step == 3
    second = run(images, tmp_path / "B", "train.max_steps=6", *common)
    assert second.step == 6
    assert load_checkpoint(list_checkpoints(tmp_path / "B")[-1]).step == 6
    assert_same_weights(tmp_path / "A", tmp_path / "B")
    # metrics continue where the first part stopped
    steps = [int(line.split(",")[0]) for line in (tmp_path / "B" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]
    # once max_steps is reached there is nothing left to do
    assert Trainer(config(images, tmp_path / "B", "train.max_steps=6", *common), TINY, quiet=True).train() is None


def test_keyboard_interrupt_saves_and_resumes_exactly(images, tmp_path, monkeypatch):
    """Ctrl-C during step 4 of 6 (cosine schedule, flips on), after its batch was read and its
    forward pass drew posterior noise, saves a checkpoint at step 3; running again ends with
    the weights of an uninterrupted run."""
    common = ("train.max_steps=6", "train.save_every=100")
    run(images, tmp_path / "straight", *common)

    real_step = trainer_module.train_step

    def interrupted(runtime, batches, optimizer, cfg, step, *args, **kwargs):
        if step == 3:
            runtime.model(batches[0].images)  # draws from the global RNG
            raise KeyboardInterrupt
        return real_step(runtime, batches, optimizer, cfg, step, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", interrupted)
    with pytest.raises(TrainingError, match="interrupted at step 3"):
        run(images, tmp_path / "stopped", *common)
    assert [p.name for p in list_checkpoints(tmp_path / "stopped")] == ["step_00000003.safetensors"]
    monkeypatch.setattr(trainer_module, "train_step", real_step)

    resumed = run(images, tmp_path / "stopped", *common)
    assert resumed.step == 6
    assert_same_weights(tmp_path / "straight", tmp_path / "stopped")


def test_batches_of_only_broken_files_do_not_shift_a_resume(tmp_path):
    """Mostly unreadable images and batches of 2: some batches hold no readable image and are
    skipped, so the data stream runs ahead of step * batch_size; a resume must follow it."""
    images = make_images(tmp_path / "images", good=2, broken=6)
    common = ("train.batch_size=2", "train.schedule=constant", "train.save_every=2")
    straight = run(images, tmp_path / "A", "train.max_steps=4", *common)
    assert straight.stream_position > 4 * 2  # the situation under test did occur
    run(images, tmp_path / "B", "train.max_steps=2", *common)
    resumed = run(images, tmp_path / "B", "train.max_steps=4", *common)
    assert resumed.stream_position == straight.stream_position
    assert_same_weights(tmp_path / "A", tmp_path / "B")


def test_resume_uses_the_configured_optimizer_settings(images, tmp_path):
    run(images, tmp_path / "run", "train.max_steps=2")
    cfg = config(images, tmp_path / "run", "train.max_steps=4", "train.lr=0.0005", "train.weight_decay=0.05",
                 "train.betas=[0.8, 0.99]")
    trainer = Trainer(cfg, TINY, quiet=True)
    assert trainer.resume() and trainer.step == 2
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["lr"] == pytest.approx(5e-4 * lr_factor(2, cfg.train))
    assert no_decay["lr"] == decay["lr"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert tuple(decay["betas"]) == (0.8, 0.99)
    trainer.scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * lr_factor(3, cfg.train))


def test_a_different_structure_is_not_resumed(images, tmp_path):
    run(images, tmp_path / "run", "train.max_steps=1")
    other = config(images, tmp_path / "run", "train.max_steps=2",
                   'model.encoder=["C2d_3_8_3_2_1", "GN_4_8", "SiLU", "C2d_8_4_3_1_1"]')
    with pytest.raises(TrainingError, match="different encoder.*--fresh"):
        Trainer(other, TINY, quiet=True).train()


# ------------------------------------------------------------------ pieces
def test_stream_sampler_starts_anywhere():
    whole = list(islice(iter(StreamSampler(5, seed=4)), 17))
    assert list(islice(iter(StreamSampler(5, seed=4, start=7)), 10)) == whole[7:17]
    assert sorted(whole[:5]) == sorted(whole[5:10]) == list(range(5))  # each epoch is a permutation
    assert whole[:5] != whole[5:10]


def test_random_flip_depends_only_on_seed_and_step():
    images = torch.arange(8 * 3 * 2 * 4, dtype=torch.float32).view(8, 3, 2, 4)
    a, b = random_flip(images, seed=1, step=5), random_flip(images, seed=1, step=5)
    assert torch.equal(a, b)
    flipped = [not torch.equal(a[i], images[i]) for i in range(8)]
    assert 0 < sum(flipped) < 8
    assert all(torch.equal(a[i], images[i].flip(-1)) for i in range(8) if flipped[i])
    assert not torch.equal(random_flip(images, seed=1, step=6), a) or not torch.equal(
        random_flip(images, seed=2, step=5), a)


def test_the_multi_tensor_ema_is_bitwise_the_per_tensor_lerp():
    """train/ema.py: torch's multi-tensor EMA update gives the weights a lerp_ per tensor gave."""
    from flexvae.build import build_vae
    from flexvae.train.ema import EMA

    torch.manual_seed(0)
    model = build_vae(["C2d_3_8_3_1_1", "BN_?", "C2d_8_4_3_2_1"], ["UpS_2", "C2d_2_3_3_1_1"], (3, 8, 8))
    ema = EMA(model, 0.9)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3, 8, 8))  # BatchNorm's running statistics and its integer step count move
        ema.update(model)
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                reference[key].lerp_(value, 1 - 0.9)
            else:
                reference[key].copy_(value)
    for key, value in reference.items():
        assert torch.equal(ema.state[key], value), key
    assert int(ema.state["encoder.1.num_batches_tracked"]) == 5


def test_hierarchical_run_logs_groups_resumes_exactly_and_round_trips(tmp_path):
    from safetensors.torch import load_file

    import flexvae

    images = random_images(tmp_path / "img", 8)
    extra = ["--set", "train.schedule=constant", "--set", "loss.objective=elbo", "--set", "train.skip_spikes=true"]
    assert run_in_process(["-t", *h_args(images, tmp_path / "whole", *extra)]).returncode == 0
    assert run_in_process(["-t", *h_args(images, tmp_path / "split", *extra, "--set", "train.max_steps=2")]).returncode == 0
    result = run_in_process(["-t", *h_args(images, tmp_path / "split", *extra)])
    assert result.returncode == 0, result.stderr
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step_00000004.safetensors"))
    split = load_file(str(tmp_path / "split" / "checkpoints" / "step_00000004.safetensors"))
    weights = [k for k in whole if k.startswith("model.")]
    assert any("posterior" in k for k in weights) and all(torch.equal(whole[k], split[k]) for k in weights)
    header = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kl_top", "kl_x8", "kl_x16", "skipped", "skip_threshold"} <= set(header)
    vae = flexvae.load_model(tmp_path / "whole")
    assert vae.groups == ["x8", "x16"]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert vae.partial_posterior(x, 2).shape == (2, 3, 16, 16)


def test_verbose_without_torchinfo_prints_the_structures_table(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchinfo(name, *args, **kwargs):
        if name == "torchinfo":
            raise ImportError("No module named 'torchinfo'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchinfo)
    images = random_images(tmp_path / "images", 4)
    proc = run_in_process(["-t", *tiny(images, tmp_path / "run", "--set", "train.max_steps=1", "--verbose")])
    assert proc.returncode == 0, proc.stderr
    assert "total parameters: 2,620" in proc.stdout and "pip install torchinfo" in proc.stdout


def test_a_run_from_before_kl_had_one_spelling_resumes_and_keeps_its_columns(tmp_path):
    """An older version's run (metrics columns kld, kld_weight, balance_kld; the balance's
    weight balance.log_weights.kld in its checkpoint; loss.kld_* keys in its config) resumes:
    its metrics.csv keeps its header and the new rows fill the old columns, and the columns read
    back under the names of today."""
    import csv

    from safetensors import safe_open
    from safetensors.torch import save

    from flexvae.files import write_bytes, write_text
    from flexvae.metrics import read_metrics
    from flexvae.outputs import writing_into

    images = random_images(tmp_path / "images", 4)
    run = tmp_path / "run"
    sets = [f"data.path={images}", f"train.out_dir={run}", "train.device=cpu", "loss.objective=weighted",
            "loss.balance=learned", "train.ema=true", "train.log_every=1", "train.fit_prior=0"]
    Trainer(load_config(TINY, sets + ["train.max_steps=2"]), TINY, quiet=True).train()
    # make it the older version's run, as that version would have written it (and recorded it)
    [path] = list_checkpoints(run)
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    tensors = {name.replace("balance.log_weights.kl", "balance.log_weights.kld"): value
               for name, value in load_file(path).items()}
    assert sum(name.endswith("log_weights.kld") for name in tensors) == 2  # the weights and their EMA
    metrics, config = run / "metrics.csv", run / "config.toml"
    with writing_into(run, flag="train.out_dir"):
        write_bytes(path, save(tensors, metadata=metadata))
        write_text(metrics, metrics.read_text().replace(",kl,kl_weight,", ",kld,kld_weight,")
                   .replace("balance_kl,", "balance_kld,"))
        write_text(config, config.read_text().replace("kl_", "kld_"))

    Trainer(load_config(TINY, sets + ["train.max_steps=4", "loss.kld_weight=0.0001"]), TINY, quiet=True).train()
    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]
    assert all(row["kld"] and row["kld_weight"] and row["balance_kld"] for row in rows)
    assert "kl" not in rows[0]
    history = read_metrics(metrics)
    assert len(history["kl"]) == 4 and not any(np.isnan(history["kl"])) and "kld" not in history
    assert load_checkpoint(list_checkpoints(run)[-1]).model_state["balance.log_weights.kl"].shape == ()
