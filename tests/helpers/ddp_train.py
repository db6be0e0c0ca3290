"""Run by tests/train/test_runtime.py under torchrun: train, then save this process's weights.

    python -m torch.distributed.run --nproc_per_node=2 tests/helpers/ddp_train.py OUT_DIR [CONFIG.toml] KEY=VALUE...
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from flexvae.config import load_config
from flexvae.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    config = ROOT / "configs" / "tiny_test.toml"
    if overrides and overrides[0].endswith(".toml"):
        config, overrides = Path(overrides[0]), overrides[1:]
    cfg = load_config(config, [f"train.out_dir={out_dir}", *overrides])
    trainer = Trainer(cfg, config, quiet=True)
    try:
        trainer.train()
    finally:
        state = {k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
        if trainer.objective.adversary is not None:
            disc = trainer.objective.adversary.model.state_dict()
            state.update({f"discriminator.{k}": v.detach().cpu().contiguous() for k, v in disc.items()})
        save_file(state, str(out_dir / f"rank{os.environ.get('RANK', '0')}.safetensors"))
        from flexvae.train.distributed import cleanup

        cleanup(trainer.dist)


if __name__ == "__main__":
    main()
