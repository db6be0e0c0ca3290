"""Training stages ([[stage]]): frozen weights stay bitwise, the learning rate and image size
change, resume lands in the right stage, and the config's mistakes get one line."""

import pytest
import torch
from safetensors.torch import load_file

from flexvae.config import load_config
from flexvae.errors import ConfigError
from flexvae.train.trainer import Trainer
from helpers.inprocess import run_in_process
from helpers.runs import REPO, make_images

BASE = (REPO / "configs" / "tiny_test.toml").read_text()


def _config(tmp_path, stages: str, name: str = "run", extra: str = "") -> tuple:
    images = make_images(tmp_path / "images", 8)
    text = BASE.replace('out_dir = "runs/tiny"', f'out_dir = "{tmp_path / name}"')
    text = text.replace("[data]", f'[data]\npath = "{images}"')
    text = text.replace('encoder = "structures/', f'encoder = "{REPO}/structures/')
    text = text.replace('decoder = "structures/', f'decoder = "{REPO}/structures/')
    path = tmp_path / f"{name}.toml"
    path.write_text(text + extra + "\n" + stages)
    return path


def _train(path, *overrides):
    cfg = load_config(path, ["train.device=cpu", *overrides])
    trainer = Trainer(cfg, path, quiet=True)
    trainer.train()
    return trainer


def _weights(path):
    return {k[len("model."):]: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


DECODER_FROM_2 = """
[[stage]]
name = "everything"
[[stage]]
name = "decoder only"
start = 2
train = ["decoder"]
lr = 0.0005
"""


def test_frozen_weights_stay_bitwise_and_the_rest_trains(tmp_path):
    path = _config(tmp_path, DECODER_FROM_2)
    trainer = _train(path, "train.max_steps=4", "train.ema=true")
    at2 = _weights(tmp_path / "run" / "checkpoints" / "step_00000002.safetensors")
    at4 = _weights(tmp_path / "run" / "checkpoints" / "step_00000004.safetensors")
    encoder = [k for k in at2 if k.startswith("encoder.")]
    decoder = [k for k in at2 if k.startswith("decoder.") and at2[k].dtype.is_floating_point]
    assert encoder and all(torch.equal(at2[k], at4[k]) for k in encoder)
    assert any(not torch.equal(at2[k], at4[k]) for k in decoder)
    # the EMA leaves its copy of frozen weights as it was, and follows the decoder
    ema2 = {k: v for k, v in load_file(str(tmp_path / "run" / "checkpoints" / "step_00000002.safetensors")).items()
            if k.startswith("ema.encoder.")}
    ema4 = {k: v for k, v in load_file(str(tmp_path / "run" / "checkpoints" / "step_00000004.safetensors")).items()
            if k.startswith("ema.encoder.")}
    assert ema2 and all(torch.equal(ema2[k], ema4[k]) for k in ema2)
    # the stage's learning rate and its number are in metrics.csv
    header, *rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    table = [dict(zip(header.split(","), row.split(","))) for row in rows]
    assert [row["stage"] for row in table] == ["1", "1", "2", "2"]
    assert float(table[-1]["lr"]) <= 0.0005 and float(table[1]["lr"]) > 0.0005
    assert trainer.stage.number == 2


def test_resume_lands_in_the_stage_and_trains_the_same_weights(tmp_path):
    path = _config(tmp_path, DECODER_FROM_2)
    constant = "train.schedule=constant"  # the learning rate does not depend on max_steps
    _train(path, "train.max_steps=4", constant)
    whole = _weights(tmp_path / "run" / "checkpoints" / "step_00000004.safetensors")
    # stopped in the first stage, resumed into the second
    _train(path, "train.max_steps=1", f"train.out_dir={tmp_path / 'resumed'}", "train.save_every=1", constant)
    resumed = _train(path, "train.max_steps=4", f"train.out_dir={tmp_path / 'resumed'}", "train.save_every=1",
                     constant)
    assert resumed.stage.number == 2
    again = _weights(tmp_path / "resumed" / "checkpoints" / "step_00000004.safetensors")
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_a_stage_at_another_image_size_trains_on_images_of_that_size(tmp_path):
    path = _config(tmp_path, '[[stage]]\n[[stage]]\nstart = 1\nimage_size = 32\n[[stage]]\nstart = 2\n')
    cfg = load_config(path, ["train.device=cpu", "train.max_steps=3"])
    trainer = Trainer(cfg, path, quiet=True)
    seen = []
    real = trainer.step_once
    trainer.step_once = lambda micro, labels=None: (seen.append(micro[0].shape[-1]), real(micro, labels))[1]
    trainer.train()
    assert seen == [16, 32, 16]


def test_a_part_given_by_structure_positions_trains_alone(tmp_path):
    # the tiny decoder's last convolution is position 7
    path = _config(tmp_path, '[[stage]]\ntrain = ["decoder:7"]\n')
    cfg = load_config(path, ["train.device=cpu", "train.max_steps=2"])
    trainer = Trainer(cfg, path, quiet=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("decoder.6.") for k in changed)


@pytest.mark.parametrize("stages, message", [
    ('[[stage]]\nstart = 5\n[[stage]]\nstart = 2\n', r"\[\[stage\]\] 2: start = 2 must come after"),
    ('[[stage]]\ntrain = ["decodr"]\n', r"\[\[stage\]\] 1: train entry 'decodr' is not a part\. Did you mean 'decoder'"),
    ('[[stage]]\ntrain = ["decoder:3-99"]\n', r"'decoder:3-99': the decoder has positions 1 to 7"),
    ('[[stage]]\ntrain = ["discriminator"]\n', r"the run has none"),
    ('[[stage]]\nterms = ["LPIPS"]\n', r"terms names 'LPIPS', which is not a term of this run"),
    ('[[stage]]\nimage_size = 17\n', r"\[\[stage\]\] 1: image_size = 17"),
    ('[[stage]]\nlearning_rate = 0.1\n', r"\[\[stage\]\] 1: unknown key 'stage.learning_rate'"),
    ('[stage]\nstart = 1\n', r"stages are written \[\[stage\]\]"),
])
def test_stage_mistakes_get_one_line(tmp_path, stages, message):
    path = _config(tmp_path, stages)
    with pytest.raises(ConfigError, match=message) as info:
        Trainer(load_config(path, ["train.device=cpu"]), path, quiet=True)
    assert "\n" not in str(info.value)
    result = run_in_process(["-t", "-c", str(path), "--set", "train.device=cpu"])
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1


def test_stages_cannot_be_set_from_the_command_line(tmp_path):
    result = run_in_process(["--check", "--set", "stage.start=3"])
    assert result.returncode != 0
    assert "stages are [[stage]] tables of a config file" in result.stderr


def test_stages_survive_the_run_config_round_trip(tmp_path):
    path = _config(tmp_path, DECODER_FROM_2)
    _train(path, "train.max_steps=1")
    saved = load_config(tmp_path / "run" / "config.toml")
    assert [s.name for s in saved.stage] == ["everything", "decoder only"]
    assert saved.stage[1].train == ["decoder"] and saved.stage[1].lr == 0.0005
