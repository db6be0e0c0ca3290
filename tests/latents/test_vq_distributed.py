"""VQ codebook statistics under torch.distributed: two CPU processes (gloo), each quantizing its
own share of every global batch, keep identical codebooks; the EMA update is the one a single
process computes on the whole global batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flexvae.latents.vq import VectorQuantizer
from flexvae.layers.quantize import VQLayer

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")]
WORLD, STEPS, CODES, DIM = 2, 6, 16, 4
FAR = 50.0  # the initial offset of the codebook's second half: those codes get no vectors (dead)
SCENARIOS = {
    # EMA codebook, no restarts: compared with one process on the global batches as well.
    "ema": lambda: VectorQuantizer(CODES, DIM, decay=0.9),
    # EMA + dead-code restarts (the VQ layer token): the restarts' random picks differ per rank.
    "ema_dead": lambda: VQLayer(CODES, DIM, decay=0.9, dead=0.5),
    # k-means initialisation on the first batch, then EMA + restarts.
    "kmeans_dead": lambda: VectorQuantizer(CODES, DIM, decay=0.9, dead_threshold=0.5, kmeans_init=True),
    # Codebook learned by gradient (none here) with restarts: the usage counts decide them.
    "gradient_dead": lambda: VectorQuantizer(CODES, DIM, decay=0.0, dead_threshold=0.5),
}


def make_quantizer(name: str) -> VectorQuantizer:
    torch.manual_seed(0)  # the same initial codebook everywhere (DDP broadcasts rank 0's)
    quantizer = SCENARIOS[name]()
    with torch.no_grad():
        quantizer.embedding[CODES // 2:] += FAR
    return quantizer.train()


def global_batch(step: int) -> torch.Tensor:
    """(4, DIM, 4, 4): 64 vectors around a few centres; rank r quantizes samples 2r and 2r+1."""
    generator = torch.Generator().manual_seed(1000 + step)
    centres = torch.randn(4, DIM, 1, 1, generator=generator) * 3
    return centres + torch.randn(4, DIM, 4, 4, generator=generator)


def state(quantizer: VectorQuantizer) -> dict:
    tensors = {**dict(quantizer.named_parameters()), **dict(quantizer.named_buffers())}
    return {"tensors": {k: v.detach().clone() for k, v in tensors.items()}, "metrics": quantizer.metrics()}


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name in SCENARIOS:
            quantizer = make_quantizer(name)
            torch.manual_seed(100 + rank)  # the random picks (restarts, k-means) differ per process
            for step in range(STEPS):
                share = global_batch(step).chunk(WORLD)[rank]
                quantizer(share)
            results[name] = state(quantizer)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("vq_ddp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(_free_port()))
        patch.setenv("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(str(out_dir),), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_processes_keep_identical_codebooks(ranks, name):
    first, second = (results[name] for results in ranks)
    for key, value in first["tensors"].items():
        assert torch.equal(value, second["tensors"][key]), key
    assert first["metrics"] == second["metrics"]
    if name != "ema":
        # The far codes were restarted (or placed by k-means) near the data.
        assert first["tensors"]["embedding"].abs().max() < FAR / 2
    if name == "kmeans_dead":
        assert bool(first["tensors"]["initialized"])


def test_ema_update_matches_one_process_on_the_global_batch(ranks):
    reference = make_quantizer("ema")
    for step in range(STEPS):
        reference(global_batch(step))
    expected, found = state(reference), ranks[0]["ema"]
    assert int(expected["tensors"]["cluster_size"].gt(0).sum()) < CODES  # some codes never used: kept
    for key, value in expected["tensors"].items():
        torch.testing.assert_close(found["tensors"][key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert found["metrics"] == pytest.approx(expected["metrics"], rel=1e-6)
