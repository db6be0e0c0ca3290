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
    assert [row.split(" | ")[1] for row in rows] == ["conv", "dcae", "vit", "pca", "PCA", "PCA, 8 px blocks", "JPEG"]
    for row in rows:
        psnr = float(row.split(" | ")[2])
        assert 5 < psnr < 60, row
    # the PCA preset starts as the PCA of the same crops (and their mirror images), and 20 steps of
    # its span, which starts as the identity, move it little
    psnr = {row.split(" | ")[1]: float(row.split(" | ")[2]) for row in rows}
    assert abs(psnr["pca"] - psnr["PCA"]) < 0.5, psnr
    assert "threads, load" in table
    assert "`python bench/bench_rate_distortion.py --tiny`" in table  # the command, without this machine's path


def bench_module(name: str, monkeypatch):
    """A bench script imported as a module, its folder on the path as when it runs."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_block_pca_is_exact_with_every_component_and_is_whole_image_pca_with_one_block(monkeypatch):
    import numpy as np

    bench = bench_module("bench_rate_distortion", monkeypatch)
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


def test_interleaved_timing_alternates_the_order_and_ratios_are_of_medians(monkeypatch):
    """common.interleaved runs A B, B A, A B ...; ratio_of_medians is median(a) / median(b) with
    the range of the per-round ratios. The clock is scripted, so the figures are exact."""
    common = bench_module("common", monkeypatch)
    calls = []
    durations = {"a": [3, 5, 4, 30], "b": [2, 2, 2, 10]}  # seconds of each call, in call order per run
    ticks = {"now": 0.0}

    def fake_counter():
        return ticks["now"]

    def run(name):
        def call():
            calls.append(name)
            ticks["now"] += durations[name][sum(c == name for c in calls) - 1]
        return call

    monkeypatch.setattr(common.time, "perf_counter", fake_counter)
    found = common.interleaved({"a": run("a"), "b": run("b")}, rounds=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert found["a"].rounds == [3, 5, 4, 30] and found["b"].rounds == [2, 2, 2, 10]
    ratio = common.ratio_of_medians(found["a"], found["b"])
    assert ratio.value == pytest.approx(4.5 / 2)
    assert (ratio.low, ratio.high) == (pytest.approx(1.5), pytest.approx(3.0))  # 3/2 .. 30/10
    calls.clear()
    durations["c"] = [1, 7, 2, 6, 5, 9]
    found = common.interleaved({"c": run("c")}, rounds=2, per_round=3)["c"]
    assert found.samples == [[1, 7, 2], [6, 5, 9]]
    assert found.rounds == [2, 6] and found.median == pytest.approx(5.5) and len(calls) == 6


def test_every_bench_script_starts_with_threads_and_load_and_stays_under_400_lines():
    scripts = sorted((REPO / "bench").glob("*.py"))
    assert len(scripts) >= 15
    for script in scripts:
        text = script.read_text()
        assert len(text.splitlines()) <= 400, script.name
        if script.name.startswith("bench_"):
            assert "start(\"" + script.stem + "\", args.threads)" in text, script.name
        assert "getloadavg" not in text or script.name == "common.py", script.name
        assert "set_num_threads(args.threads)" not in text, script.name
