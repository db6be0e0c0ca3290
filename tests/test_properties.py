"""Property-based tests (hypothesis): whatever a user or an attacker writes into a token,
a structure file, a config file, a ``--set`` value or a checkpoint's metadata, the answer
is a value or the package's own error, never another exception; through the CLI, one
``error:`` line and no traceback.

Each property runs a bounded number of examples in the default suite and many more in the
slow one (``-m slow``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexvae.config import Config, apply_overrides, config_from_dict, config_to_dict
from flexvae.errors import CheckpointError, ConfigError, FlexVAEError, StructureError
from helpers.inprocess import run_in_process

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_test.toml"
QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text that looks like tokens: names, digits, underscores, '*', '@', '=', '?', signs and dots.
token_text = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "_*@=?.-+e ", max_size=40),
    st.builds(lambda n, name, args: f"{n}*{name}_" + "_".join(args),
              st.integers(-5, 10**15), st.sampled_from(["C2d", "VAERB", "GN", "Id", "UpS", "Lin", "VQ", "Nope"]),
              st.lists(st.one_of(st.integers(-10**30, 10**30).map(str), st.sampled_from(["?", "1e999", "nan", "x=1",
                                                                                           "bias=maybe", ""])),
                       max_size=6)),
    st.text(max_size=20),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children,
                                                                               max_size=5)),
    max_leaves=20,
)


def both(strategy):
    """A default-suite test with QUICK settings and a slow one with LONG settings, of one property."""
    def decorate(check):
        quick = QUICK(given(strategy)(check))
        long = pytest.mark.slow(LONG(given(strategy)(check)))
        return quick, long
    return decorate


# ------------------------------------------------------------------ grammar and structures
def _parse(text):
    from flexvae.dsl import parse_token

    try:
        spec = parse_token(text, source="<hypothesis>", position=1)
    except StructureError as exc:
        assert str(exc).startswith("<hypothesis>, position 1")
        return
    assert 1 <= spec.repeat <= 1024 and spec.name[0].isalpha()


test_grammar, test_grammar_long = both(token_text)(_parse)


def _structure(value):
    from flexvae.build import plan_vae

    try:
        plan_vae(value, ["C2d_?_3_3_1_1"], (3, 8, 8))
    except (StructureError, FlexVAEError):
        pass


test_structure_lists, test_structure_lists_long = both(
    st.one_of(json_values, st.lists(token_text, min_size=1, max_size=6)))(_structure)


# ------------------------------------------------------------------ configs and overrides
sections = st.sampled_from(["data", "model", "latent", "loss", "train", "encode", "mem", "trian", ""])
keys = st.one_of(st.sampled_from(["image_size", "latent", "codebook_size", "lr", "seed", "out_dir", "device",
                                  "encoder", "betas", "probe_sizes", "fsq_levels", "precision"]), st.text(max_size=8))


def _config(raw):
    try:
        cfg = config_from_dict(raw, "<hypothesis>")
    except ConfigError as exc:
        assert str(exc).startswith("<hypothesis>") or "latent" in str(exc)
        return
    assert isinstance(cfg, Config)
    assert config_from_dict(config_to_dict(cfg)) == cfg


test_config_dicts, test_config_dicts_long = both(
    st.dictionaries(sections, st.one_of(st.dictionaries(keys, json_values, max_size=4), json_values), max_size=4)
)(_config)


def _override(item):
    try:
        cfg = apply_overrides(Config(), [item])
    except ConfigError as exc:
        assert str(exc).startswith("--set")
        return
    assert isinstance(cfg, Config)


test_overrides, test_overrides_long = both(
    st.builds(lambda s, k, v: f"{s}.{k}={v}", sections, keys, st.text(max_size=30)))(_override)


# ------------------------------------------------------------------ checkpoint metadata
@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A real checkpoint's metadata and weights of the tiny model."""
    from flexvae.assemble import model_from_config
    from flexvae.checkpoint import checkpoint_metadata
    from flexvae.config import load_config

    cfg = load_config(TINY, [f"model.encoder={REPO / 'structures/tiny_encoder.json'}",
                             f"model.decoder={REPO / 'structures/tiny_decoder.json'}"])
    model, plan = model_from_config(cfg)
    return json.loads(json.dumps(checkpoint_metadata(cfg, plan, 3, 1.0))), model.state_dict()


meta_keys = st.sampled_from(["format", "step", "config", "encoder", "decoder", "data_shape", "latent_shape",
                             "scaling_factor", "output", "plugins", "extra"])


def _metadata(stored, changes):
    from flexvae.checkpoint import Checkpoint, model_from_checkpoint

    meta, state = stored
    meta = json.loads(json.dumps(meta))
    for key, value in changes:
        meta[key] = value
    try:
        model, _, _ = model_from_checkpoint(Checkpoint(Path("<hypothesis>"), state, meta))
    except CheckpointError as exc:
        assert str(exc).startswith("<hypothesis>")
        return
    rebuilt = model.state_dict()
    assert {k: tuple(v.shape) for k, v in rebuilt.items()} == {k: tuple(v.shape) for k, v in state.items()}


metadata_changes = st.lists(st.tuples(meta_keys, st.one_of(json_values, st.lists(token_text, max_size=4),
                                                           st.lists(st.integers(-3, 70000), max_size=5))),
                            min_size=1, max_size=3)


@QUICK
@given(metadata_changes)
def test_checkpoint_metadata(stored, changes):
    _metadata(stored, changes)


@pytest.mark.slow
@LONG
@given(metadata_changes)
def test_checkpoint_metadata_long(stored, changes):
    _metadata(stored, changes)


# ------------------------------------------------------------------ through the CLI
def _cli(item):
    proc = run_in_process(["--check", "-c", TINY, "--set", item])
    assert "Traceback" not in proc.stderr
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


test_cli_overrides, test_cli_overrides_long = both(st.one_of(
    st.builds(lambda t: f"model.encoder={json.dumps(t)}", st.lists(token_text, min_size=1, max_size=4)),
    st.builds(lambda s, k, v: f"{s}.{k}={v}", sections, keys, st.text(max_size=20)),
))(_cli)
