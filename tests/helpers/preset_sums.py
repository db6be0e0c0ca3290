"""Per-tensor sums of a shipped preset's weights after a few training steps on the CPU: the
reference the objective refactor is checked against (tests/objective/test_terms.py). Run as a script it
prints them as JSON (tests/helpers/preset_sums.json was written by the code before the objective
module existed: ``PYTHONPATH=<old>/src python tests/helpers/preset_sums.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRESETS = {"config.toml": [], "digits.toml": ["train.fit_prior=0"], "latent_vq.toml": [],
           "photos_gan.toml": ["loss.perceptual_weights=random", "adversarial.start=1"]}
STEPS = 3


def preset_sums(name: str, out: Path, digits: Path) -> dict:
    import torch

    from flexvae.config import load_config
    from flexvae.train.trainer import Trainer

    torch.set_num_threads(1)
    data = f"data.path={digits}" if name.startswith("digits") else f"data.path={REPO / 'assets' / 'photos'}"
    cfg = load_config(REPO / "configs" / name, [f"train.out_dir={out}", "train.device=cpu", "data.num_workers=0",
                                                f"train.max_steps={STEPS}", "train.batch_size=8", data,
                                                *PRESETS[name]])
    trainer = Trainer(cfg, REPO / "configs" / name, quiet=True)
    trainer.train()
    return {k: float(v.double().sum()) for k, v in trainer.model.state_dict().items() if v.dtype.is_floating_point}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits.py"), f"{tmp}/digits", "--holdout", "0.25"],
                       check=True, capture_output=True)
        print(json.dumps({name: preset_sums(name, Path(tmp) / name, Path(tmp) / "digits" / "train")
                          for name in PRESETS}, indent=1, sort_keys=True))
