"""Config loading, checking, overrides and TOML round trips."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flexvae.config import (  # noqa: E402
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_fields,
    dump_toml,
    load_config,
    save_config,
    toml_io,  # noqa: E402
)
from flexvae.config import load as config_module  # noqa: E402
from flexvae.config.schema import StageConfig  # noqa: E402
from flexvae.device import DeviceError, resolve_device  # noqa: E402
from flexvae.errors import ConfigError  # noqa: E402
from flexvae.latents import LATENTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


if importlib.util.find_spec("flexvae") is None:  # running from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))


CONFIGS = ROOT / "configs"


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# Where the shipped default config departs from the built-in defaults: the default model is a
# real VAE (the calibrated ELBO), while the built-in defaults keep the original's formula so
# that the original's configs (and stored checkpoints' configs) mean what they meant.
DEFAULT_CONFIG_CHANGES = {"loss.objective": '"elbo"', "loss.scale": '"optimal"', "loss.kl_weight": "1.0",
                          "train.fit_prior": "10"}


# ------------------------------------------------------------------ renamed keys
OLD_NAMES = {"alpha": ("recon_weight", 2.5), "beta": ("ssim_weight", 0.25), "gamma": ("sparse_weight", 0.125),
             "kld_weight": ("kl_weight", 0.5), "kld_reduction": ("kl_reduction", '"sum"'),
             "kld_schedule": ("kl_schedule", '"cyclical"'), "kld_warmup_steps": ("kl_warmup_steps", 7),
             "kld_cycle_steps": ("kl_cycle_steps", 300), "kld_cycle_ratio": ("kl_cycle_ratio", 0.25)}


# ------------------------------------------------------------------ defaults
def test_no_config_an_empty_file_and_the_written_defaults_are_the_same_config(tmp_path):
    """Every way of asking for the defaults gives the same Config, and the defaults written as
    TOML read back to it (so the schema's defaults pass their own validation)."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    written = tmp_path / "defaults.toml"
    save_config(Config(), written)
    assert load_config(None) == load_config(empty) == config_from_dict({}) == load_config(written)
    assert "[loss]" in written.read_text() and "[[stage]]" not in written.read_text()


def test_empty_file_is_defaults(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert load_config(path) == Config()


def test_shipped_default_config_equals_defaults_but_for_the_elbo_and_the_fitted_prior():
    overrides = [f"{k}={v.strip(chr(34))}" for k, v in DEFAULT_CONFIG_CHANGES.items()]
    assert load_config(CONFIGS / "config.toml") == load_config(None, overrides)
    assert load_config(CONFIGS / "config.toml") != Config()


def test_shipped_default_config_writes_every_key_with_a_comment():
    text = (CONFIGS / "config.toml").read_text(encoding="utf-8")
    lines = text.splitlines()
    for key, default, _doc in describe_fields():
        name = key.split(".")[1]
        line = f"{name} = {DEFAULT_CONFIG_CHANGES.get(key, default)}"
        if key.startswith(("latent.", "stage.")):  # only the chosen latent's keys may be set, and stages are
            # optional tables: shown commented out
            line = f"# {line}"
        assert line in lines, line
        assert lines[lines.index(line) - 1].startswith("#"), f"no comment above {line}"


def test_tiny_config_differs_only_where_intended():
    cfg = load_config(CONFIGS / "tiny_test.toml")
    expected = Config(
        data=dataclasses.replace(Config().data, image_size=16, num_workers=0),
        model=dataclasses.replace(Config().model, encoder="structures/tiny_encoder.json",
                                  decoder="structures/tiny_decoder.json"),
        train=dataclasses.replace(Config().train, max_steps=4, batch_size=4, save_every=2,
                                  sample_every=2, log_every=1, out_dir="runs/tiny"),
    )
    assert cfg == expected


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


def test_describe_fields_covers_every_key():
    rows = describe_fields()
    keys = [k for k, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert ("train.lr", "0.001") in [(k, d) for k, d, _ in rows]
    assert all(doc and "\n" not in doc for _, _, doc in rows)
    flat = {f"{s}.{k}" for s, table in config_to_dict(Config()).items() for k in table}
    flat |= {f"latent.{k}" for latent_type in LATENTS for k in latent_type.keys}  # every latent type's keys
    flat |= {f"stage.{f.name}" for f in dataclasses.fields(StageConfig)}  # the keys of a [[stage]] table
    assert set(keys) == flat


# ------------------------------------------------------------------ round trip
def test_round_trip_defaults(tmp_path):
    path = tmp_path / "cfg.toml"
    save_config(Config(), path)
    assert load_config(path) == Config()
    assert not [p for p in tmp_path.iterdir() if p.name != "cfg.toml"]  # no temp file left


def test_round_trip_awkward_values(tmp_path):
    cfg = apply_overrides(Config(), [
        "data.path=" + 'r"C:\\images\\new "set"\\"',
        'data.val_path="tab\\there\\nnewline ünïcødé ✓ \\u0001"',
        "model.encoder=['conv(3, 32)', \"quote\\\"d\", 'back\\slash']",
        "model.plugins=['my_plugin', 'extra/plugin.py']",
        "loss.kl_weight=1e-4",
        "loss.sparse_weight=0.1",
        "train.lr=3.0000000000000004e-05",
        "train.betas=[0.5, 0.1234567890123]",
        "train.seed=-7",
        "mem.margin=0.3333333333333333",
        "mem.probe_sizes=[1, 3, 9, 27]",
    ])
    assert cfg.data.path == 'r"C:\\images\\new "set"\\"'  # not TOML, so taken as a bare string
    assert cfg.data.val_path == "tab\there\nnewline ünïcødé ✓ \x01"
    assert cfg.model.encoder == ["conv(3, 32)", 'quote"d', "back\\slash"]
    path = tmp_path / "sub" / "cfg.toml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.loss.kl_weight == 1e-4 and again.loss.sparse_weight == 0.1
    assert load_config(path) == config_from_dict(config_to_dict(cfg))
    text = dump_toml(cfg)
    assert text.index("[data]") < text.index("[model]") < text.index("[loss]") < text.index("[train]") \
        < text.index("[encode]") < text.index("[mem]")
    assert config_module.tomllib.loads(text) == config_to_dict(cfg)


def test_dump_writes_special_floats():
    assert toml_io._toml_value(float("inf")) == "inf"
    assert toml_io._toml_value(float("-inf")) == "-inf"
    assert toml_io._toml_value(float("nan")) == "nan"


def test_non_finite_float_is_rejected():
    assert "must be finite" in error_of(config_from_dict, {"train": {"lr": float("inf")}})


def test_int_for_float_field_becomes_float():
    cfg = config_from_dict({"train": {"lr": 1, "betas": [0, 0]}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert all(isinstance(b, float) for b in cfg.train.betas)


# ------------------------------------------------------------------ errors
def test_unknown_key_suggests_close_name():
    msg = error_of(config_from_dict, {"train": {"learning_rate": 1e-3}}, "my.toml")
    assert msg == "my.toml: unknown key 'train.learning_rate'. Did you mean 'train.lr'?"
    msg = error_of(config_from_dict, {"train": {"batchsize": 4}})
    assert "unknown key 'train.batchsize'. Did you mean 'train.batch_size'?" in msg


def test_unknown_key_without_match_lists_valid_keys():
    msg = error_of(config_from_dict, {"encode": {"zzzz": 1}})
    assert "unknown key 'encode.zzzz'" in msg
    assert "format, shard_size, sample, batch_size" in msg


def test_misplaced_key_suggests_right_section():
    msg = error_of(config_from_dict, {"train": {"image_size": 64}})
    assert "unknown key 'train.image_size'. Did you mean 'data.image_size'?" in msg
    msg = error_of(config_from_dict, {"data": {"lr": 0.1}})
    assert "'train.lr'?" in msg


def test_unknown_section():
    msg = error_of(config_from_dict, {"trian": {"lr": 0.1}}, "my.toml")
    assert msg.startswith("my.toml: unknown section [trian]. Did you mean [train]?")
    assert "[data], [model], [latent], [loss], [adversarial], [train], [encode], [mem]" in msg


def test_top_level_key_is_an_error():
    msg = error_of(config_from_dict, {"lr": 0.1})
    assert "'lr' is not inside a section" in msg and "train.lr" in msg


def test_section_must_be_a_table():
    assert "must be a table" in error_of(config_from_dict, {"train": 3})


def test_wrong_type_message():
    msg = error_of(config_from_dict, {"train": {"lr": "abc"}}, "my.toml")
    assert msg == "my.toml: 'train.lr' must be a float, got str 'abc'"
    assert "must be an int, got float 1.5" in error_of(config_from_dict, {"train": {"max_steps": 1.5}})
    assert "must be an int, got bool True" in error_of(config_from_dict, {"train": {"seed": True}})
    assert "must be a bool" in error_of(config_from_dict, {"data": {"flip": 1}})
    assert "must be a bool" in error_of(config_from_dict, {"data": {"flip": "false"}})
    assert "must be a list of ints" in error_of(config_from_dict, {"mem": {"probe_sizes": [1, "2"]}})
    msg = error_of(config_from_dict, {"model": {"encoder": 3}})
    assert "must be a string or a list of strings, got int 3" in msg


def test_str_or_list_accepts_both():
    cfg = config_from_dict({"model": {"encoder": ["conv(3, 8)", "relu"], "decoder": "d.json"}})
    assert cfg.model.encoder == ["conv(3, 8)", "relu"] and cfg.model.decoder == "d.json"


def test_range_errors():
    msg = error_of(config_from_dict, {"train": {"lr": -1}}, "my.toml")
    assert msg == "my.toml: 'train.lr' must be > 0, got -1.0"
    assert "'data.num_workers' must be >= 0, got -1" in error_of(config_from_dict, {"data": {"num_workers": -1}})
    assert "'mem.margin' must be in (0, 1], got 1.5" in error_of(config_from_dict, {"mem": {"margin": 1.5}})
    assert "'train.ema_decay' must be in (0, 1), got 1.0" in error_of(config_from_dict, {"train": {"ema_decay": 1}})
    assert "'loss.kl_cycle_ratio'" in error_of(config_from_dict, {"loss": {"kl_cycle_ratio": 0.0}})
    assert "exactly 2 entries" in error_of(config_from_dict, {"train": {"betas": [0.9]}})
    assert "at least 2 entries" in error_of(config_from_dict, {"mem": {"probe_sizes": [4]}})
    msg = error_of(config_from_dict, {"mem": {"probe_sizes": [1, 0]}})
    assert "each entry of 'mem.probe_sizes' must be > 0, got 0" in msg
    config_from_dict({"train": {"grad_clip": 0, "val_every": 0, "min_lr_ratio": 1}})  # edges allowed


def test_literal_error_lists_choices():
    msg = error_of(config_from_dict, {"loss": {"recon": "mae"}})
    assert "'loss.recon' must be one of 'mse', 'l1', 'bce', got str 'mae'" in msg
    assert "Did you mean 'mse'?" in msg
    msg = error_of(config_from_dict, {"data": {"channels": 2}})
    assert "'data.channels' must be one of 1, 3, 4, got int 2" in msg
    assert "must be one of 1, 3, 4" in error_of(config_from_dict, {"data": {"channels": True}})
    msg = error_of(config_from_dict, {"data": {"resize_filter": "cubic"}})
    assert "'nearest', 'bilinear', 'bicubic', 'lanczos', 'box', 'hamming', got str 'cubic'" in msg


def test_device_pattern():
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert config_from_dict({"train": {"device": ok}}).train.device == ok
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "cuda:0 "):
        msg = error_of(config_from_dict, {"train": {"device": bad}})
        assert "'train.device' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'" in msg


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.toml"
    msg = error_of(load_config, path)
    assert str(path) in msg and "not found" in msg


def test_toml_syntax_error_names_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train]\nlr = = 3\n")
    msg = error_of(load_config, path)
    assert str(path) in msg and "line 2" in msg


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[train]\nlearning_rate = 0.1\n')
    assert error_of(load_config, path).startswith(f"{path}: unknown key 'train.learning_rate'")


# ------------------------------------------------------------------ overrides
def test_overrides_of_each_type():
    base = Config()
    cfg = apply_overrides(base, [
        "train.max_steps=50", "train.lr=3e-4", "loss.ssim=true", "loss.recon=l1",
        "train.betas=[0.8, 0.99]", "mem.probe_sizes=[2, 4]", "model.encoder=['conv(3, 8)']",
        "train.device=cuda:1", "loss.ssim_kind=ms-ssim",
    ])
    assert cfg.train.max_steps == 50 and cfg.train.lr == 3e-4 and cfg.loss.ssim is True
    assert cfg.loss.recon == "l1" and cfg.train.betas == [0.8, 0.99] and cfg.mem.probe_sizes == [2, 4]
    assert cfg.model.encoder == ["conv(3, 8)"] and cfg.train.device == "cuda:1"
    assert cfg.loss.ssim_kind == "ms-ssim"
    assert base == Config()  # the original is untouched


def test_override_float_accepts_int_and_loose_forms():
    cfg = apply_overrides(Config(), ["train.lr=1", "train.grad_clip=.5"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.grad_clip == 0.5


@pytest.mark.parametrize("text, expected", [
    ("False", False), ("false", False), ("FALSE", False), ("no", False), ("0", False), ("off", False),
    ("True", True), ("true", True), ("yes", True), ("1", True), ("On", True),
])
def test_override_bool_words(text, expected):
    assert apply_overrides(Config(), [f"loss.ssim={text}"]).loss.ssim is expected
    assert apply_overrides(Config(), [f"data.flip={text}"]).data.flip is expected


def test_override_bool_rejects_other_strings():
    assert "'loss.ssim' must be a bool" in error_of(apply_overrides, Config(), ["loss.ssim=maybe"])
    assert "'loss.ssim' must be a bool" in error_of(apply_overrides, Config(), ["loss.ssim=2"])


def test_override_bare_strings():
    cfg = apply_overrides(Config(), [
        "data.path=some/dir", "train.out_dir=runs/2024-01-01", "data.val_path=", "data.source=mnist",
        'data.path="quoted dir"', "model.plugins=my_plugin",
    ])
    assert cfg.data.path == "quoted dir" and cfg.train.out_dir == "runs/2024-01-01"
    assert cfg.data.val_path == "" and cfg.data.source == "mnist" and cfg.model.plugins == ["my_plugin"]
    cfg = apply_overrides(Config(), ["data.path=some/dir", "train.out_dir=2024-01-01", "data.val_path=123"])
    assert cfg.data.path == "some/dir" and cfg.train.out_dir == "2024-01-01" and cfg.data.val_path == "123"


def test_later_override_wins():
    assert apply_overrides(Config(), ["train.seed=1", "train.seed=2"]).train.seed == 2


def test_load_config_applies_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 0.5\n")
    cfg = load_config(path, ["train.lr=0.25", "data.image_size=64"])
    assert cfg.train.lr == 0.25 and cfg.data.image_size == 64


@pytest.mark.parametrize("bad", ["train.lr", "lr=0.1", "=3", "train.=3", ".lr=3"])
def test_malformed_override(bad):
    msg = error_of(apply_overrides, Config(), [bad])
    assert msg.startswith("--set: malformed override") and "section.key=value" in msg


def test_override_errors_use_set_as_source():
    assert error_of(apply_overrides, Config(), ["train.lr=abc"]) == "--set: 'train.lr' must be a float, got str 'abc'"
    assert error_of(apply_overrides, Config(), ["train.lr=-1"]) == "--set: 'train.lr' must be > 0, got -1.0"
    msg = error_of(apply_overrides, Config(), ["train.learning_rate=0.1"])
    assert msg == "--set: unknown key 'train.learning_rate'. Did you mean 'train.lr'?"
    assert "Did you mean 'data.image_size'?" in error_of(apply_overrides, Config(), ["train.image_size=8"])
    assert "unknown section [trian]" in error_of(apply_overrides, Config(), ["trian.lr=0.1"])
    assert "must be one of 1, 3, 4, got int 2" in error_of(apply_overrides, Config(), ["data.channels=2"])


# ------------------------------------------------------------------ misc
def test_tomllib_fallback_is_in_place():
    assert hasattr(config_module, "tomllib") and hasattr(config_module.tomllib, "loads")
    source = Path(config_module.__file__).read_text(encoding="utf-8")
    assert "import tomli as tomllib" in source


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    for name in ("cuda", "cuda:1", "mps"):
        if name.startswith("cuda") and torch.cuda.device_count() > int(name.partition(":")[2] or 0):
            assert resolve_device(name) == name
        elif name == "mps" and torch.backends.mps.is_available():
            assert resolve_device(name) == name
        else:
            with pytest.raises(DeviceError, match=f"device '{name}' was asked for"):
                resolve_device(name)
    with pytest.raises(DeviceError, match="'foo' is not one of auto, cpu, cuda, cuda:N or mps"):
        resolve_device("foo")
    assert resolve_device("auto") in ("cuda", "mps", "cpu")


def test_old_loss_weight_names_load_as_the_new_ones_with_a_note(tmp_path, capsys):
    old = tmp_path / "old.toml"
    old.write_text("[loss]\nobjective = \"weighted\"\n" + "".join(f"{k} = {v}\n" for k, (_, v) in OLD_NAMES.items()))
    new = tmp_path / "new.toml"
    new.write_text("[loss]\nobjective = \"weighted\"\n" + "".join(f"{n} = {v}\n" for n, v in OLD_NAMES.values()))
    assert load_config(old) == load_config(new)
    assert load_config(new).loss.ssim_weight == 0.25 and load_config(new).loss.kl_cycle_steps == 300
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {old}: loss.{k} is now called loss.{n} (the old name still works)"
                     for k, (n, _) in OLD_NAMES.items()]
    cfg = apply_overrides(Config(), ["loss.beta=0.5"])
    assert cfg.loss.ssim_weight == 0.5
    assert "note: --set: loss.beta is now called loss.ssim_weight" in capsys.readouterr().err


def test_a_stored_config_with_old_names_loads_quietly(capsys):
    cfg = config_from_dict({"loss": {"alpha": 3.0}}, "ckpt (stored config)", stored=True)
    assert cfg.loss.recon_weight == 3.0 and capsys.readouterr().err == ""


def test_old_and_new_name_together_is_an_error(tmp_path):
    path = tmp_path / "both.toml"
    path.write_text("[loss]\ngamma = 0.1\nsparse_weight = 0.2\n")
    with pytest.raises(ConfigError, match=r"both.toml: \[loss\] sets both 'gamma' and 'sparse_weight', its new name; "
                                          r"keep 'sparse_weight'"):
        load_config(path)
