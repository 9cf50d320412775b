"""The engine benchmark (perf/benchmark_engine.py) runs end to end on a CPU with tiny settings: rows, floors and
figure; timings themselves are the benchmark's business, not a test's."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_engine", REPO / "perf" / "benchmark_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_writes_rows_floors_and_a_figure(benchmark, data_root, tmp_path):
    out, fig = tmp_path / "t.json", tmp_path / "t.png"
    assert benchmark.main(["--device", "cpu", "--threads", "1", "--archs", "mlp", "--runs", "1", "2",
                           "--mlp-steps", "2", "--data-root", str(data_root), "--json", str(out),
                           "--figure", str(fig)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["arch"], r["runs"]) for r in rows] == [("mlp", 1), ("mlp", 2)]
    for r in rows:
        # the floor: the products of 36,000 steps, 9 importances and 55 test-set evaluations at the best speed
        assert r["floor_seconds"] == pytest.approx(r["flops_per_run"] / r["matmul_flops_around"])
        assert r["floor_ratio"] == pytest.approx(r["seconds_per_run"] / r["floor_seconds"])
        assert r["floor_ratio_best"] >= r["floor_ratio"] * (1 - 1e-9)
    # one step of the paper's MLP: forward 2 B sum(in*out), backward the same for the weights and the inputs of
    # layers 2 and 3 (no gradient for the images): 2 * 100 * (2 * 281,700 + 300 * 150 + 150 * 10)
    flops_step = 2 * 100 * (2 * 281_700 + 300 * 150 + 150 * 10)
    assert rows[0]["flops_per_run"] > 36_000 * flops_step
    assert result["matmul_flops"]["best"] == max(result["matmul_flops"]["samples"])
    assert fig.stat().st_size > 10_000
