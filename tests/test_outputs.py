"""outputs.py: a mode replaces its own earlier outputs and never a file it did not write.

The sweep runs each output-writing mode once into an empty folder to learn what it writes,
then again into a folder holding the user's own files of exactly those names: the mode must
stop with one line and leave every byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexvae.errors import DataError
from flexvae.files import write_text
from flexvae.outputs import HEADER, RECORD, ForeignFiles, OutputFolder, writing_into
from helpers.inprocess import run_in_process
from helpers.runs import make_images, tiny

REPO = Path(__file__).resolve().parents[1]


def _labelled(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    images = make_images(root / "images", 4)
    labelled = _labelled(root / "labelled")
    run = root / "run"
    proc = run_in_process(["-t", *tiny(images, run, "--set", "train.max_steps=2")])
    assert proc.returncode == 0, proc.stderr
    latents = root / "latents"
    assert run_in_process(["-e", *tiny(images, run, "--input", images, "--output", latents)]).returncode == 0
    return {"root": root, "images": images, "labelled": labelled, "run": run, "latents": latents}


def _one_error(proc) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


MODES = {
    "-i": lambda r: ["--input", r["images"]],
    "-e": lambda r: ["--input", r["images"]],
    "-d": lambda r: ["--input", r["latents"]],
    "-eval": lambda r: ["--input", r["images"], "--nll-samples", "2"],
    "-inter": lambda r: ["--input", r["images"] / "0.png", "--input2", r["images"] / "1.png", "--steps", "3"],
    "-pics": lambda r: ["--steps", "3"],
    "-analyze": lambda r: ["--steps", "3", "--input", r["images"]],
    "-probe": lambda r: ["--input", r["labelled"]],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_leaves_the_users_files_of_its_own_names_byte_identical(run, tmp_path, mode):
    base = tiny(run["images"], run["run"], "--ckpt", run["run"], *MODES[mode](run))
    first = run_in_process([mode, *base, "--output", tmp_path / "first"])
    if first.returncode != 0 and "needs" in first.stderr:  # an optional extra missing (plots, probes)
        pytest.skip(first.stderr.strip().splitlines()[-1])
    assert first.returncode == 0, first.stderr
    written = [rel for rel in _files(tmp_path / "first") if rel != RECORD]
    assert written
    # the same mode again into its own folder replaces its own files
    again = run_in_process([mode, *base, "--output", tmp_path / "first"])
    assert again.returncode == 0, again.stderr

    users = tmp_path / "users"
    for i, rel in enumerate(written):
        (users / rel).parent.mkdir(parents=True, exist_ok=True)
        (users / rel).write_bytes(f"the user's own file {i}\n".encode())
    before = _files(users)
    line = _one_error(run_in_process([mode, *base, "--output", users]))
    assert str(users) in line and "not flexvae's output" in line and "--overwrite" in line
    if mode != "-e":  # -e checks its manifest first: one not ours is not even read
        assert f"{len(written)} file" in line
    assert _files(users) == before

    replaced = run_in_process([mode, *base, "--output", users, "--overwrite"])
    assert replaced.returncode == 0, replaced.stderr
    assert all(_files(users)[rel] != before[rel] for rel in written if rel in _files(tmp_path / "first"))


def test_the_refusal_names_the_first_paths_and_the_count(run, tmp_path):
    out = tmp_path / "out"
    make_images(out, 4)  # the user's PNGs named exactly like the reconstructions 0.png .. 3.png
    before = _files(out)
    line = _one_error(run_in_process(["-i", *tiny(run["images"], run["run"], "--input", run["images"],
                                                  "--output", out)]))
    assert line == (f"error: {out}: 4 files would be replaced that are not flexvae's outputs (flexvae did not "
                    f"write them, or they changed since): 0.png, 1.png, 2.png and 1 more; choose another "
                    f"--output, or add --overwrite to replace them")
    assert _files(out) == before and not (out / RECORD).exists()


def test_a_file_flexvae_wrote_and_the_user_then_edited_is_the_users(run, tmp_path):
    out = tmp_path / "out"
    args = ["-d", *tiny(run["images"], run["run"], "--input", run["latents"], "--output", out)]
    assert run_in_process(args).returncode == 0
    (out / "2.png").write_bytes(b"edited by the user")
    line = _one_error(run_in_process(args))
    assert "1 file would be replaced" in line and ": 2.png;" in line
    assert (out / "2.png").read_bytes() == b"edited by the user"
    assert run_in_process([*args, "--overwrite"]).returncode == 0
    assert (out / "2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_in_process(args).returncode == 0  # replaced with --overwrite, it is flexvae's again


def test_a_forged_or_foreign_record_makes_nothing_ours(run, tmp_path):
    out = tmp_path / "out"
    args = ["-i", *tiny(run["images"], run["run"], "--input", run["images"], "--output", out)]
    out.mkdir()
    (out / "0.png").write_bytes(b"mine")
    forged = {"path": "0.png", "sha256": hashlib.sha256(b"something else").hexdigest(), "stat": [4, 0, 0]}
    (out / RECORD).write_text(json.dumps(HEADER) + "\n" + json.dumps(forged) + "\n")
    assert "0.png" in _one_error(run_in_process(args))
    assert (out / "0.png").read_bytes() == b"mine"
    # a file of the record's name that is not our record: never trusted, never appended to
    (out / RECORD).write_text('{"path": "0.png"}\n')
    line = _one_error(run_in_process(args))
    assert "its record .flexvae-written.jsonl is not flexvae's" in line
    assert (out / RECORD).read_text() == '{"path": "0.png"}\n'
    assert (out / "0.png").read_bytes() == b"mine"


def test_links_and_folders_in_the_way_are_never_replaced(run, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    elsewhere.write_text("precious")
    (out / "notes.txt").write_text("notes")
    (out / "0.png").symlink_to(out / "notes.txt")
    (out / "1.png").mkdir()
    args = ["-i", *tiny(run["images"], run["run"], "--input", run["images"], "--output", out)]
    line = _one_error(run_in_process(args))
    assert "2 files" in line and "0.png, 1.png;" in line
    assert (out / "0.png").is_symlink() and (out / "notes.txt").read_text() == "notes" and (out / "1.png").is_dir()
    (out / "0.png").unlink()
    (out / "0.png").symlink_to(elsewhere)  # a link out of the folder is refused as such
    assert "refusing output path outside" in _one_error(run_in_process(args))
    assert elsewhere.read_text() == "precious"


def test_a_resumed_encode_appends_to_its_own_manifest_only(run, tmp_path):
    out = tmp_path / "latents"
    args = ["-e", *tiny(run["images"], run["run"], "--input", run["images"], "--output", out)]
    assert run_in_process(args).returncode == 0
    (run["images"] / "4.png").write_bytes((run["images"] / "0.png").read_bytes())
    try:
        proc = run_in_process(args)
        assert proc.returncode == 0 and "encoded 1 images" in proc.stdout, proc.stderr
        manifest = out / "manifest.jsonl"
        manifest.write_text(manifest.read_text() + "\n")  # the user touched it
        assert "manifest.jsonl" in _one_error(run_in_process(args))
    finally:
        (run["images"] / "4.png").unlink()


# ------------------------------------------------------------------ the record itself
def test_the_record_tolerates_a_torn_last_line_and_hashes_when_the_stat_differs(tmp_path):
    with writing_into(tmp_path) as folder:
        write_text(tmp_path / "a.txt", "one")
    with open(tmp_path / RECORD, "a") as fh:
        fh.write('{"path": "b.txt", "sha2')  # a crash mid-append
    fresh = OutputFolder(tmp_path)
    assert fresh.is_ours(tmp_path / "a.txt") and fresh.is_ours(tmp_path / "missing.txt")
    # the same bytes written again by someone else (a new inode and time): the hash still says ours
    shutil.copyfile(tmp_path / "a.txt", tmp_path / "copy")
    (tmp_path / "copy").replace(tmp_path / "a.txt")
    assert OutputFolder(tmp_path).is_ours(tmp_path / "a.txt")
    (tmp_path / "a.txt").write_text("two")
    assert not OutputFolder(tmp_path).is_ours(tmp_path / "a.txt")
    with pytest.raises(ForeignFiles, match="1 file would be replaced"):
        with writing_into(tmp_path):
            write_text(tmp_path / "a.txt", "three")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert isinstance(ForeignFiles("x"), DataError)


def test_a_file_that_appears_while_ours_is_written_is_kept(tmp_path):
    from flexvae.files import atomic_open

    with pytest.raises(ForeignFiles):
        with writing_into(tmp_path):
            with atomic_open(tmp_path / "x.txt") as fh:
                fh.write("ours")
                (tmp_path / "x.txt").write_text("the user's, meanwhile")
    assert (tmp_path / "x.txt").read_text() == "the user's, meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]  # no temporary left


def test_writes_outside_an_open_folder_are_not_checked(tmp_path):
    (tmp_path / "inside").mkdir()
    (tmp_path / "outside.txt").write_text("x")
    with writing_into(tmp_path / "inside"):
        write_text(tmp_path / "outside.txt", "y")  # the run directory, say: not this folder's business
    assert (tmp_path / "outside.txt").read_text() == "y"


def test_decoding_with_the_wrong_checkpoint_names_the_right_one(run, tmp_path):
    other = tmp_path / "other"
    encoder = '["C2d_3_8_3_1_1", "Down_?_8", "C2d_?_8_3_1_1"]'
    decoder = '["C2d_4_8_3_1_1", "UpS_2", "C2d_?_3_3_1_1"]'
    proc = run_in_process(["-t", *tiny(run["images"], other, "--set", "train.max_steps=1",
                                       "--set", f"model.encoder={encoder}", "--set", f"model.decoder={decoder}")])
    assert proc.returncode == 0, proc.stderr
    proc = run_in_process(["-d", *tiny(run["images"], other, "--ckpt", other, "--input", run["latents"],
                                       "--output", tmp_path / "decoded")])
    line = _one_error(proc)
    made_by = json.loads((run["latents"] / "manifest.jsonl").read_text().splitlines()[0])["made_by"]["checkpoint"]
    assert line.startswith(f"error: the latents under {run['latents']} do not fit this model (0.safetensors: "
                           "latent shape (2, 8, 8), the model expects (4, 8, 8))")
    assert line.endswith(f"says 4 of them were made by {made_by} (step 2): decode them with --ckpt {made_by}")
    assert "warning" not in proc.stderr


# ------------------------------------------------------------------ the run directory
def test_training_into_a_folder_of_the_users_leaves_their_files(run, tmp_path):
    folder = tmp_path / "project"
    (folder / "samples").mkdir(parents=True)
    (folder / "metrics.csv").write_text("my,own,table\n")
    (folder / "samples" / "step_00000001.png").write_bytes(b"my picture")
    before = _files(folder)
    line = _one_error(run_in_process(["-t", *tiny(run["images"], folder, "--set", "train.max_steps=1")]))
    assert "train.out_dir" in line and "metrics.csv" in line and "samples/step_00000001.png" in line
    assert {rel: data for rel, data in _files(folder).items() if rel != ".flexvae.lock"} == before
    proc = run_in_process(["-t", *tiny(run["images"], folder, "--set", "train.max_steps=1"), "--overwrite"])
    assert proc.returncode == 0, proc.stderr
    assert (folder / "metrics.csv").read_text().startswith("step,")


def test_a_run_of_an_older_version_without_a_record_resumes(run, tmp_path):
    out = tmp_path / "old"
    args = tiny(run["images"], out, "--set", "train.save_every=1", "--set", "train.keep_last=1")
    assert run_in_process(["-t", *args, "--set", "train.max_steps=1"]).returncode == 0
    (out / RECORD).unlink()  # as an older flexvae left it
    (out / "checkpoints" / "step_00000000.safetensors").write_bytes(b"a user's file named like a checkpoint")
    proc = run_in_process(["-t", *args, "--set", "train.max_steps=3"])
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # the old checkpoints of the run were pruned (keep_last = 1); the foreign one stays
    assert names == ["step_00000000.safetensors", "step_00000003.safetensors"]
    assert (out / "checkpoints" / "step_00000000.safetensors").read_bytes() == b"a user's file named like a checkpoint"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_matrix_results_never_replace_the_users_files_and_nothing_is_trained(tmp_path):
    spec = tmp_path / "m.toml"
    out = tmp_path / "runs"
    out.mkdir()
    (out / "results.md").write_text("my notes on the results")
    spec.write_text(f'base = "{(REPO / "configs" / "tiny_test.toml").as_posix()}"\nout_dir = "{out.as_posix()}"\n'
                    '[matrix]\n"train.lr" = [1e-3]\n[fixed]\n"train.max_steps" = 1\n"train.device" = "cpu"\n')
    line = _one_error(run_in_process(["-matrix", "--matrix", spec], cwd=tmp_path))
    assert line == (f"error: {out}: 1 file would be replaced that is not flexvae's output (flexvae did not write "
                    f"it, or it changed since): results.md; choose another out_dir in {spec}, or add --overwrite "
                    "to replace it")
    assert sorted(p.name for p in out.iterdir()) == ["results.md"]


def test_a_record_too_large_to_be_ours_is_foreign_and_not_read(tmp_path, monkeypatch):
    import flexvae.outputs as outputs

    with writing_into(tmp_path):
        write_text(tmp_path / "a.txt", "ours")
    assert OutputFolder(tmp_path).is_ours(tmp_path / "a.txt")
    monkeypatch.setattr(outputs, "MAX_RECORD_BYTES", 10)
    folder = OutputFolder(tmp_path)
    assert not folder.is_ours(tmp_path / "a.txt")
    with pytest.raises(ForeignFiles, match="its record .flexvae-written.jsonl is not flexvae's"):
        folder.check([tmp_path / "a.txt"])
