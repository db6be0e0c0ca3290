"""Training the same run under torchrun with 2 CPU processes and in one process (tests/helpers/ddp_train.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "tests" / "helpers" / "ddp_train.py")


def train_two_and_one(tmp_path: Path, common: list, two_batch: int = 2, one_batch: int = 4):
    """(rank 0's weights, rank 1's, the single process's) after training ``common`` overrides into
    tmp_path/two (2 processes, batch ``two_batch`` each) and tmp_path/one (batch ``one_batch``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", SCRIPT,
                          str(tmp_path / "two"), *common, f"train.batch_size={two_batch}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "one"), *common, f"train.batch_size={one_batch}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "two" / f"rank{r}.safetensors")) for r in (0, 1))
    return rank0, rank1, load_file(str(tmp_path / "one" / "rank0.safetensors"))


def assert_two_processes_match_one(tmp_path: Path, common: list, columns=("loss",)) -> None:
    """The replicas of a 2-process run are identical and match one process with the same global
    batch: weights within 5e-5 (Adam's normalised steps amplify rounding in tiny gradients), the
    logged ``columns`` of metrics.csv to 1e-5 relative, 1e-6 absolute (a latent group's KL starts
    at zero, where a relative tolerance alone asks for more than float sums give)."""
    import csv

    import numpy as np
    import torch

    rank0, rank1, single = train_two_and_one(tmp_path, common)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=5e-5)

    def logged(run):
        with open(run / "metrics.csv", newline="") as fh:
            return [[float(row[c]) for c in columns] for row in csv.DictReader(fh)]

    assert np.allclose(logged(tmp_path / "two"), logged(tmp_path / "one"), rtol=1e-5, atol=1e-6), \
        (logged(tmp_path / "two"), logged(tmp_path / "one"))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_two_nodes(tmp_path: Path, common: list, batch: int = 2):
    """Two torchrun agents on this machine as two nodes of one process each, meeting through a
    c10d rendezvous on localhost (what several machines do with the first one's address); the
    weights of rank 0 and rank 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=flexvae-test",
                                f"--node_rank={node}", SCRIPT, str(tmp_path / "nodes"), *common,
                                f"train.batch_size={batch}"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for node in range(2)]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    return tuple(load_file(str(tmp_path / "nodes" / f"rank{r}.safetensors")) for r in (0, 1))
