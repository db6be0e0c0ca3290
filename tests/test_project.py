"""project.py: flexvae init writes a starter project that trains from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.inprocess import run_in_process
from helpers.runs import make_images

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_new_project_trains_from_any_folder(tmp_path):
    """flexvae init, then train, encode, decode and evaluate from that folder (outside the clone)."""
    import subprocess
    import sys

    project = tmp_path / "myproject"
    proc = run_in_process(["--init", project], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*")) == [
        "config.toml", "images", "structures", "structures/small_decoder.json", "structures/small_encoder.json"]
    again = run_in_process(["--init", project], cwd=tmp_path)
    assert again.returncode == 1 and "is not an empty folder" in again.stderr
    make_images(project / "images", 4)
    small = ["--set", "train.max_steps=2", "--set", "data.num_workers=0"]  # config.toml found in the project
    for args in (["-t", *small], ["-e", *small], ["-d", *small], ["-eval", *small, "--nll-samples", "0"]):
        proc = run_in_process(args, cwd=project)
        assert proc.returncode == 0, (args, proc.stderr)
    assert (project / "runs" / "default" / "latents" / "manifest.jsonl").is_file()
    assert (project / "runs" / "default" / "decoded" / "0.png").is_file()
    # a shipped config names its structures relative to the clone: from another folder they are
    # found among the installed presets (a subprocess, so nothing of this process helps)
    check = subprocess.run([sys.executable, "-c", "import sys; from flexvae.cli import main; sys.exit(main())",
                            "check", "-c", str(REPO / "configs" / "config.toml")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert "total parameters: 188,963" in check.stdout
