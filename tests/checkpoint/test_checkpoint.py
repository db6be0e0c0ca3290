"""Checkpoint files: round trips, atomic writes, no pickle, run folders, RNG state."""

from __future__ import annotations

import json
import os
import random
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flexvae.checkpoint import (
    Checkpoint,
    checkpoint_name,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    load_run,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from flexvae.checkpoint import format as ckpt
from flexvae.errors import CheckpointError
from flexvae.train.rng import capture_rng_state, restore_rng_state
from helpers.inprocess import run_in_process
from helpers.labelled import (
    cond_args,
    labelled_folder,
)
from helpers.runs import make_images, tiny
from helpers.tiny_training import train


def assert_same(a, b, where="<root>"):
    """Exact structural equality: same container types, key types, dtypes and values."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            assert type(k) is type(next(kk for kk in b if kk == k)), f"{where}: key {k!r}"
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def nasty_state():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
            1: {"step": torch.tensor(7, dtype=torch.int64), "mask": torch.tensor([True, False])},
        },
        "groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "fused": None}],
        "nested": (1, (2.5, "x"), [None, True, False], {}),
        "tensors": {
            "bf16": torch.randn(4).to(torch.bfloat16),
            "u8": torch.tensor([0, 255], dtype=torch.uint8),
            "scalar": torch.tensor(5, dtype=torch.int64),
            "empty": torch.zeros(0),
            "full": base,
            "view_row": base[1],  # shares storage with "full"
            "view_t": base.t(),  # non-contiguous view
            "same": base,  # the very same tensor twice
        },
        "big_int": 2**70,
        "neg": -1,
        "float_int": 2.0,
        "inf": float("inf"),
        "__dunder__": "kept",
        "a.b": torch.ones(1),
        "a": {"b": torch.zeros(1)},  # same dotted path as "a.b"
        "mixed": {0: "int key", "0": "str key", -3: [1, 2]},
    }


def make_training(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_step(model, opt, sched, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    sched.step()


def make_run(tmp_path, steps):
    run = tmp_path / "run"
    for s in steps:
        path = run / "checkpoints" / checkpoint_name(s)
        save_checkpoint(path, {"w": torch.tensor([float(s)])}, {"step": s})
    return run


def draws():
    python = [random.gauss(0, 1), random.random()]  # the first gauss uses the cached one
    return python, np.random.rand(3).tolist(), np.random.randn(), torch.rand(3)




def test_flatten_round_trip_is_exact():
    state = nasty_state()
    tensors, skeleton = flatten_state(state, "train")
    assert all(k.startswith("train.") for k in tensors)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    ptrs = [t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()]
    assert len(ptrs) == len(set(ptrs)), "saved tensors must not share storage"
    skeleton = json.loads(json.dumps(skeleton))  # must survive JSON
    assert_same(state, unflatten_state(skeleton, tensors))


def test_flatten_rejects_unknown_types():
    with pytest.raises(TypeError, match="opt.thing"):
        flatten_state({"opt": {"thing": object()}}, "")


def test_flatten_state_survives_a_file(tmp_path):
    state = nasty_state()
    save_checkpoint(tmp_path / "c.safetensors", {}, {"step": 1}, train_state=state)
    assert_same(state, load_checkpoint(tmp_path / "c.safetensors").train_state)


def test_training_resumes_bit_identically(tmp_path):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(4)]
    model, opt, sched = make_training()
    for x, y in batches[:3]:
        train_step(model, opt, sched, x, y)
    path = save_checkpoint(
        tmp_path / checkpoint_name(3),
        model.state_dict(),
        {"step": 3},
        train_state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
    )

    loaded = load_checkpoint(path)
    assert loaded.step == 3
    model2, opt2, sched2 = make_training(seed=123)  # different init, overwritten below
    model2.load_state_dict(loaded.model_state)
    opt2.load_state_dict(loaded.train_state["optimizer"])
    sched2.load_state_dict(loaded.train_state["scheduler"])

    train_step(model, opt, sched, *batches[3])
    train_step(model2, opt2, sched2, *batches[3])
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_metadata_and_ema_round_trip(tmp_path):
    meta = {
        "step": 42,
        "scaling_factor": 0.18215,
        "version": "0.1.0",
        "config": {
            "model": {"widths": [32, 64], "act": "silu"},
            "lr": 1e-4,
            "nested": [{"a": [1, "b", None, True]}],
        },
        "data_shape": [3, 64, 64],
    }
    model = {"w": torch.randn(2, 2), "b": torch.randn(2)}
    ema = {"w": torch.randn(2, 2), "b": torch.randn(2)}
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta, ema_state=ema)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, Checkpoint)
    assert loaded.metadata == meta and loaded.step == 42
    assert loaded.train_state is None
    assert_same(model, loaded.model_state)
    assert_same(ema, loaded.ema_state)


def test_tied_weights_are_saved(tmp_path):
    shared = torch.randn(3, 3)
    model = {"enc.w": shared, "dec.w": shared}
    path = save_checkpoint(tmp_path / "t.safetensors", model, {}, ema_state=model)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.model_state["dec.w"], shared)
    assert torch.equal(loaded.ema_state["enc.w"], shared)


def test_without_train_state_reads_no_train_tensors(tmp_path, monkeypatch):
    model = {"w": torch.randn(3)}
    path = save_checkpoint(
        tmp_path / "c.safetensors",
        model,
        {"step": 5},
        train_state={"opt": {"m": torch.randn(1000)}},
    )
    requested = []
    real_open = ckpt.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def metadata(self):
            return self.f.metadata()

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            requested.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(ckpt, "safe_open", Spy)
    loaded = load_checkpoint(path, with_train_state=False)
    assert loaded.train_state is None
    assert_same(model, loaded.model_state)
    assert requested == ["model.w"]


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.ones(4)}, {"step": 1})
    before = path.read_bytes()

    def broken_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(4)}, {"step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_failed_replace_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.ones(4)}, {"step": 1})
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(ckpt.os, "replace", broken_replace)
    with pytest.raises(OSError, match="replace failed"):
        save_checkpoint(path, {"w": torch.zeros(4)}, {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]
    assert load_checkpoint(path).step == 1


def test_truncated_file_is_a_checkpoint_error(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.randn(64)}, {"step": 1})
    data = path.read_bytes()
    for cut in (len(data) - 10, 40, 5, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="c.safetensors"):
            load_checkpoint(path)


def test_file_is_safetensors_and_pickle_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.randn(2)}, {"step": 1})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert raw[8:9] == b"{"
    header = json.loads(raw[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["flexvae"]) == {"step": 1}

    pt = tmp_path / "model.pt"
    torch.save({"w": torch.randn(2)}, pt)
    fake = tmp_path / "fake.safetensors"
    pt.rename(fake)
    with pytest.raises(CheckpointError, match="fake.safetensors"):
        load_checkpoint(fake)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.randn(2)}, str(path))
    with pytest.raises(CheckpointError, match="no 'flexvae' metadata"):
        load_checkpoint(path)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_list_sorts_numerically_and_ignores_other_files(tmp_path):
    run = make_run(tmp_path, [100, 2, 10])
    folder = run / "checkpoints"
    (folder / (checkpoint_name(500) + ".tmp-123")).write_bytes(b"partial")
    (folder / "notes.txt").write_text("hi")
    (folder / "step_abc.safetensors").write_bytes(b"")
    names = [p.name for p in list_checkpoints(run)]
    assert names == [
        "step_00000002.safetensors",
        "step_00000010.safetensors",
        "step_00000100.safetensors",
    ]
    assert list_checkpoints(folder) == list_checkpoints(run)
    # steps wider than the zero padding still sort by number
    (folder / "step_123456789.safetensors").write_bytes(b"")
    assert list_checkpoints(run)[-1].name == "step_123456789.safetensors"


def test_resolve_checkpoint(tmp_path):
    run = make_run(tmp_path, [2, 10, 100])
    latest = run / "checkpoints" / checkpoint_name(100)
    assert resolve_checkpoint(run) == latest
    assert resolve_checkpoint(run / "checkpoints") == latest
    some = run / "checkpoints" / checkpoint_name(10)
    assert resolve_checkpoint(some) == some
    assert load_checkpoint(resolve_checkpoint(str(run))).step == 100

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(empty)
    expected = f"no checkpoint found in {empty} (looked for checkpoints/step_*.safetensors)"
    assert str(info.value) == expected

    with pytest.raises(CheckpointError, match="missing"):
        resolve_checkpoint(tmp_path / "missing")


def test_prune_keeps_newest(tmp_path):
    run = make_run(tmp_path, [1, 2, 10, 100, 20])
    deleted = prune_checkpoints(run, keep_last=2)
    assert [p.name for p in deleted] == [checkpoint_name(s) for s in (1, 2, 10)]
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(20), checkpoint_name(100)]
    assert prune_checkpoints(run, keep_last=5) == []
    with pytest.raises(ValueError):
        prune_checkpoints(run, keep_last=0)


def test_rng_capture_and_restore(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in Python's state
    np.random.randn()  # and one in NumPy's
    state = capture_rng_state()
    expected = draws()

    # through a checkpoint file, after the generators have moved on
    path = save_checkpoint(tmp_path / "r.safetensors", {}, {}, train_state={"rng": state})
    draws()
    random.seed(99)
    restore_rng_state(load_checkpoint(path).train_state["rng"])
    got = draws()
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_rng_restore_in_process():
    state = capture_rng_state()
    expected = draws()
    restore_rng_state(state)
    got = draws()
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_corrupt_stored_classes_are_refused(tmp_path):
    from flexvae.checkpoint import load_checkpoint, load_run, save_checkpoint
    from flexvae.errors import CheckpointError

    images = labelled_folder(tmp_path / "img")
    assert run_in_process(["-t", *cond_args(images, tmp_path / "run", "--set", "train.max_steps=2")]).returncode == 0
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.safetensors")
    for bad in (["a", "a", "b"], "abc", ["a"], ["a", "b"]):
        meta = {**ckpt.metadata, "classes": bad}
        path = save_checkpoint(tmp_path / "bad.safetensors", ckpt.model_state, meta)
        with pytest.raises(CheckpointError):
            load_run(path)


def test_a_run_has_config_as_well_as_cfg(tmp_path):
    images = make_images(tmp_path / "images", 2)
    assert run_in_process(["-t", *tiny(images, tmp_path / "run", "--set", "train.max_steps=1")]).returncode == 0
    import flexvae

    run = flexvae.load_run(tmp_path / "run")
    assert run.config is run.cfg and run.config.train.max_steps == 1


@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_elbo_models_rebuild_from_the_checkpoint_with_their_likelihood(photos, tmp_path, likelihood):
    train(photos, tmp_path / "run", "train.max_steps=2", "loss.objective=elbo", f"loss.likelihood={likelihood}",
          "loss.scale=channel")
    loaded = load_run(tmp_path / "run", prefer_ema=False)
    assert loaded.vae.likelihood.name == likelihood
    state = load_file(str(list_checkpoints(tmp_path / "run")[-1]))
    if likelihood == "gaussian":
        torch.testing.assert_close(loaded.vae.likelihood.log_scale, state["model.likelihood.log_scale"])
        assert loaded.vae.likelihood.log_scale.shape == (3,)
    assert loaded.vae.output == ("logits" if likelihood == "bernoulli" else "value")
