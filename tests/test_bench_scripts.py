"""The benchmarks CI runs at tiny sizes: they run end to end and write what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rate_distortion_bench_runs_at_tiny_size_and_writes_its_table(tmp_path):
    out = tmp_path / "rd"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_rate_distortion.py"), "--tiny",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 64 |")]
    assert [row.split(" | ")[1] for row in rows] == ["conv", "dcae", "vit", "PCA", "PCA, 8 px blocks", "JPEG"]
    for row in rows:
        psnr = float(row.split(" | ")[2])
        assert 5 < psnr < 60, row
    assert "threads, load" in table
    assert "`python bench/bench_rate_distortion.py --tiny`" in table  # the command, without this machine's path


def test_block_pca_is_exact_with_every_component_and_is_whole_image_pca_with_one_block():
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("bench_rd", REPO / "bench" / "bench_rate_distortion.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    train = rng.uniform(-0.9, 0.9, (300, 3, 16, 16)).astype(np.float32)
    test = rng.uniform(-0.9, 0.9, (7, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(bench.block_pca_reconstruct(train, test, 3 * 8 * 8, 8), test, atol=1e-4)
    np.testing.assert_allclose(bench.block_pca_reconstruct(train, test, 12, 16), bench.pca_reconstruct(train, test, 12),
                               atol=1e-5)
    # each block is coded on its own: changing one 8 px square of an image changes no other square
    changed = test.copy()
    changed[0, :, :8, :8] += 0.05
    before, after = (bench.block_pca_reconstruct(train, x, 5, 8) for x in (test, changed))
    np.testing.assert_array_equal(before[0, :, 8:, :], after[0, :, 8:, :])
    assert not np.allclose(before[0, :, :8, :8], after[0, :, :8, :8])
