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
    assert [row.split(" | ")[1] for row in rows] == ["conv", "dcae", "vit", "PCA", "JPEG"]
    for row in rows:
        psnr = float(row.split(" | ")[2])
        assert 5 < psnr < 60, row
    assert "threads, load" in table
