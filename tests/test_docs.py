"""The README and the docs pages: their tables, examples and error messages are what the code
does, every page is reachable, and the site builds in strict mode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.doc_blocks import blocks, pages, run_by
from helpers.inprocess import run_in_process

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def load_update_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_docs", ROOT / "scripts" / "update_docs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_token_and_config_tables_are_current():
    script = load_update_script()
    for name, tables in script.PAGES.items():
        text = page(name)
        assert script.render(text, tables) == text, f"docs/{name} is out of date: run `python scripts/update_docs.py`"


def test_a_stale_reference_table_is_noticed():
    script = load_update_script()
    text = page("structures.md").replace("| `VAERB` |", "| `VAERB_renamed` |")
    assert script.render(text, script.PAGES["structures.md"]) != text


def test_every_registered_token_and_config_key_is_documented():
    from flexvae import build  # noqa: F401
    from flexvae.config import describe_fields
    from flexvae.registry import LAYERS

    tokens, config = page("structures.md"), page("configuration.md")
    for name in LAYERS.names():
        assert f"| `{name}` |" in tokens, name
    for key, _, _ in describe_fields():
        assert f"| `{key}` |" in config, key


def test_every_mode_option_and_public_name_is_in_the_reference():
    """The generated reference against the parsers and ``flexvae.__all__``, read independently
    of the generator: every mode's flag and subcommand, every option of both parsers (with the
    modes that read it), every exported name with its signature."""
    import inspect

    import flexvae
    from flexvae.cli.modes import (
        MODES,
        OPTION_MODES,
        flexvae_parser,
        mode_parser,
        train_py_parser,
    )

    reference = page("reference.md")
    for mode in MODES:
        assert f"| `{mode.flag}" in reference and f"` | `{mode.name}" in reference, mode.name
    option_rows = {line.split(" | ")[0]: line for line in reference.splitlines() if line.startswith("| `-")}
    every = {f for a in train_py_parser()._actions for f in a.option_strings}
    for mode in MODES:  # the subcommands' parsers
        every |= {f for a in mode_parser(mode, "flexvae")._actions for f in a.option_strings}
    documented = {f.strip("` ") for row in option_rows for f in row.strip("| ").split(",")}
    flags = {mode.flag for mode in MODES}
    assert every - flags - {"-h", "--help", "--version"} <= documented
    for dest, modes in OPTION_MODES.items():
        row = next(line for key, line in option_rows.items() if f"`--{dest.replace('_', '-')}`" in key)
        assert all(f"`{next(m.flag for m in MODES if m.name == name)}`" in row.split(" | ")[2] for name in modes), dest
    assert {mode.name for mode in MODES} == set(flexvae_parser()._subparsers._group_actions[0].choices)
    for name in flexvae.__all__:
        if name == "__version__":
            continue
        assert f"### `{name}`" in reference, name
        obj = getattr(flexvae, name)
        if inspect.isfunction(obj):
            for parameter in inspect.signature(obj).parameters:
                assert parameter in reference.split(f"### `{name}`")[1].split("###")[0], (name, parameter)


def test_a_stale_cli_or_api_reference_is_noticed():
    script = load_update_script()
    text = page("reference.md")
    for changed in (text.replace("| `--tile` |", "| `--tiles` |"), text.replace("### `load_run`", "### `load_runs`")):
        assert script.render(changed, script.PAGES["reference.md"]) != changed


def test_readme_is_short_and_reaches_every_page():
    import yaml

    assert len(README.splitlines()) <= 200
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(entry):
        if isinstance(entry, str):
            yield entry
        elif isinstance(entry, dict):
            for value in entry.values():
                yield from pages(value)
        else:
            for value in entry:
                yield from pages(value)

    listed = set(pages(nav))
    assert listed == {p.name for p in DOCS.glob("*.md")}, "mkdocs.yml's nav and docs/*.md differ"
    for name in listed - {"index.md"}:
        assert f"](docs/{name})" in README, f"the README does not link docs/{name}"
        assert f"]({name})" in page("index.md"), f"docs/index.md does not link {name}"


def test_docs_site_builds_in_strict_mode(tmp_path):
    """mkdocs --strict fails on a broken link or an unlisted page: the docs pass, and a copy with
    a broken link does not."""
    import shutil

    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    result = subprocess.run([*command, "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "structures" / "index.html").is_file()
    copy = tmp_path / "copy"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "docs" / "modes.md").write_text(page("modes.md") + "\nSee [nowhere](no_such_page.md).\n")
    broken = subprocess.run([*command, "-d", str(tmp_path / "site2")], cwd=copy, capture_output=True, text=True,
                            timeout=300)
    assert broken.returncode != 0 and "no_such_page.md" in broken.stderr


def test_readme_and_api_page_show_the_same_five_lines():
    shown = run_by("test_trained_run_api_example")
    assert [b.page for b in shown] == ["README.md", "python-api.md"]
    assert shown[0].code == shown[1].code


def test_python_api_example_runs():
    import contextlib
    import io

    import torch
    from torch.distributions import Normal, kl_divergence

    [block] = [b.code for b in run_by("test_python_api_example_runs")]
    out, names = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(block, "docs/python-api.md", "exec"), names)
    vae, result = names["vae"], names["out"]
    total = re.findall(r"^total parameters: ([\d,]+)$", out.getvalue(), re.M)
    assert len(total) == 2  # the encoder's table, then the decoder's: together, what was built
    assert sum(int(t.replace(",", "")) for t in total) == sum(p.numel() for p in vae.parameters())
    mean, logvar = result.posterior.mean, result.posterior.logvar
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(names["kl"], expected, atol=1e-4)  # "(4,), summed over every non-batch dim"
    assert torch.allclose(result.recon, vae.decoder(result.z), atol=1e-5)


def test_error_examples_print_what_the_readme_shows():
    [block] = [b.code for b in run_by("test_error_examples_print_what_the_readme_shows")]
    commands = re.findall(r"^\$ python (.+)$", block, re.M)
    expected = re.findall(r"^(error: .+)$", block, re.M)
    assert len(commands) == len(expected) == 2
    for command, message in zip(commands, expected):
        import shlex

        words = shlex.split(command)
        assert words[0] == "train.py"
        result = run_in_process(words[1:])
        assert result.returncode == 1
        assert result.stderr.strip() == message
        assert "Traceback" not in result.stderr


def test_plugin_example(tmp_path):
    code, toml = [b.code for b in run_by("test_plugin_example")]
    (tmp_path / "my_layers.py").write_text(code)
    config = tmp_path / "plugin.toml"
    config.write_text(
        toml + "\n"
        'decoder = ["C2d_4_16_3_1_1", "SiLU", "C2d_16_3_3_1_1"]\n'
        "[data]\nimage_size = 16\n"
    )
    # both commands in one process (one torch import): a plugin registers into that process only
    code = ("import sys; from flexvae.cli import main\n"
            "print('rc', main(['--check', '-c', sys.argv[1]], prog='train.py'))\n"
            "print('rc', main(['--layers', '-c', sys.argv[1]], prog='train.py'))\n")
    result = run("-c", code, str(config))
    assert result.stdout.count("rc 0") == 2, result.stderr
    check, listing = result.stdout.split("rc 0", 1)
    assert "Scale_0.5" in check
    assert "Scale(factor=1.0)" in listing


def test_trained_run_api_example(tmp_path):
    import contextlib
    import io

    import torch

    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "tiny_test.toml", [f"train.out_dir={tmp_path / 'run'}",
                                                            f"data.path={ROOT / 'assets' / 'photos'}",
                                                            f"model.encoder={ROOT / 'structures/tiny_encoder.json'}",
                                                            f"model.decoder={ROOT / 'structures/tiny_decoder.json'}"])
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(cfg, quiet=True).train()
    block = run_by("test_trained_run_api_example")[0].code
    assert len([line for line in block.splitlines() if line.strip()]) == 5
    block = block.replace('"runs/default"', repr(str(tmp_path / "run"))).replace(
        '"assets/photos/chelsea/001.png"', repr(str(ROOT / "assets/photos/chelsea/001.png")))
    names = {"flexvae": __import__("flexvae")}
    exec(compile(block, "README.md (trained run)", "exec"), names)
    assert names["x"].shape == (1, 3, 16, 16) and names["recon"].shape == (1, 3, 16, 16)
    assert names["samples"].shape == (4, 3, 16, 16) and float(names["recon"].detach().abs().max()) <= 1
    assert torch.is_tensor(names["z"]) and names["z"].shape == (1, 2, 8, 8)


def test_conditional_python_example_runs(tmp_path):
    import contextlib
    import io

    import numpy as np
    import torch
    from PIL import Image

    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    images = tmp_path / "digits"
    rng = np.random.default_rng(0)
    for digit in range(10):
        (images / str(digit)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(images / str(digit) / "0.png")
    config = ROOT / "configs" / "digits_cond.toml"
    cfg = load_config(config, [f"train.out_dir={tmp_path / 'run'}", f"data.path={images}", "train.max_steps=2",
                               "train.batch_size=4"])
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(cfg, config, quiet=True).train()
    [block] = [b.code for b in run_by("test_conditional_python_example_runs")]
    block = block.replace('"runs/digits_cond"', repr(str(tmp_path / "run")))
    names = {"flexvae": __import__("flexvae"), "torch": torch}
    exec(compile(block, "docs/hierarchical-conditional.md", "exec"), names)
    assert names["sevens"].shape == (8, 1, 16, 16) and names["halfway"].shape == (8, 1, 16, 16)


def test_loss_terms_section_examples_run(tmp_path):
    """The section's term table lists every registered term, its plugin example trains, and its
    TOML blocks load as a config."""
    import tomllib

    from flexvae.config import load_config
    from flexvae.config.load import config_from_dict
    from flexvae.objective import TERMS, check_loss_config
    from flexvae.train.trainer import Trainer
    from helpers.runs import TINY, make_images

    section = page("objectives.md").split("## Loss terms and training stages", 1)[1].split("## Adversarial training", 1)[0]
    for name in [n for n in TERMS.names() if TERMS.layers[n].factory.__module__.startswith("flexvae.")]:
        assert re.search(rf"^\| `{name}[_`]", section, re.M), name
    plugin = tmp_path / "edge_term.py"
    loss_block, plugin_code, stage_block = [b.code for b in run_by("test_loss_terms_section_examples_run")]
    plugin.write_text(plugin_code)
    cfg = config_from_dict(tomllib.loads(loss_block), "README")
    check_loss_config(cfg, (3, 32, 32))
    stages = config_from_dict(tomllib.loads(stage_block), "README").stage
    assert [s.start for s in stages] == [0, 2000] and stages[1].train == ["decoder:10-12", "discriminator"]
    images = make_images(tmp_path / "images", 4)
    run_cfg = load_config(TINY, [f"train.out_dir={tmp_path / 'run'}", f"data.path={images}", "train.device=cpu",
                                 "train.max_steps=1", f"model.plugins={plugin}",
                                 'loss.terms=["Recon", "KL_weight=0.0001", "EdgeL1_power=2_weight=0.3"]'])
    Trainer(run_cfg, TINY, quiet=True).train()
    assert "edge" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")


def test_structure_and_config_blocks_load(tmp_path):
    """The JSON structures and TOML fragments the guides show: structures parse and trace,
    config fragments load as configs, the matrix file loads as a matrix."""
    import json

    import tomllib

    from flexvae.analysis.matrix import load_matrix
    from flexvae.build import plan_vae
    from flexvae.config.load import config_from_dict
    from flexvae.dsl import parse_structure
    from flexvae.latents import DeterministicLatent

    shown = run_by("test_structure_and_config_blocks_load")
    assert [b.lang for b in shown] == ["toml", "toml", "json", "json", "json"]  # analysis, priors, structures x 3
    matrix_file = tmp_path / "matrix.toml"
    matrix_file.write_text(shown[0].code.replace('"configs/tiny_test.toml"', repr(str(ROOT / "configs/tiny_test.toml"))))
    matrix = load_matrix(matrix_file)
    assert len(matrix.axes) == 3 and all(len(values) == 2 for values in matrix.axes.values())
    assert config_from_dict(tomllib.loads(shown[1].code)).model.prior == "Vamp_components=50"
    encoder = json.loads(shown[2].code)
    plan = plan_vae(encoder, ["C2d_4_32_3_1_1", "UpS_2", "C2d_32_3_3_1_1"], (3, 32, 32))
    assert plan.latent_shape == (4, 16, 16)
    dcae = json.loads(shown[3].code)
    assert [spec.name for spec in parse_structure(dcae, source="structures.md")] == ["C2d", "Res", "Res", "Res"]
    plan = plan_vae(dcae, ["C2d_64_3_3_1_1"], (3, 32, 32))  # down by S2C, back up by C2S: 128 channels
    assert plan.latent_shape == (64, 32, 32)
    pca_decoder = json.loads(shown[4].code)  # with the PCA it mirrors, on 32 px images
    plan = plan_vae(["Flat", "PCA_3072_64"], pca_decoder, (3, 32, 32), DeterministicLatent())
    assert plan.latent_shape == (64,) and [s.name for s in plan.decoder.specs] == ["PCAInv", "Reshape", "Res"]


def test_every_code_block_runs_in_a_test_or_says_why_not():
    """Above each fenced block of the README and docs/: ``runs in test_NAME`` naming a test of
    this file that takes its blocks from ``run_by`` (so the block it runs is this one), or
    ``not run: why``."""
    import inspect

    found = [b for path in pages() for b in blocks(path)]
    assert len(found) >= 30
    this = sys.modules[__name__]
    for block in found:
        where = f"{block.page}:{block.line}"
        assert block.mark is not None, f"{where}: no <!-- runs in test_... --> or <!-- not run: ... --> above the block"
        if block.mark.startswith("not run: "):
            assert len(block.mark) > len("not run: ") + 5, f"{where}: say why it is not run"
            continue
        name = block.mark.removeprefix("runs in ")
        assert name != block.mark, f"{where}: unknown mark {block.mark!r}"
        test = getattr(this, name, None)
        assert callable(test), f"{where}: no test named {name}"
        assert f'run_by("{name}")' in inspect.getsource(test), f"{where}: {name} does not take its blocks from run_by"


def test_the_python_quickstart_works_outside_a_clone(tmp_path, monkeypatch):
    import torch

    import flexvae

    monkeypatch.chdir(tmp_path)  # no structures/ here: the shipped presets are found, as configs find them
    plan = flexvae.plan_vae("structures/small_encoder.json", "structures/small_decoder.json", (3, 32, 32))
    vae = plan.build()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode_latents(x)
    assert not z.requires_grad and not vae.decode_latents(z).requires_grad
    assert not vae.sample_prior(2).requires_grad
    assert vae.encode(x).mode().requires_grad and vae.decode(z).requires_grad  # for training code
    with pytest.raises(ValueError, match="gaussian latent has no class part"):
        vae.class_probs(x)
