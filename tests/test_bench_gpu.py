"""benchmarks/bench_gpu.py runs every part with tiny shapes on the CPU (`--dry`), so that the
script is known to work before an H200 runs it, and writes what it measured to one JSON file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tiny_runs import needs_fixtures

ROOT = Path(__file__).resolve().parents[1]


@needs_fixtures
def test_the_dry_run_measures_every_part_and_writes_one_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" /
                                                  "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--dry", "--out", str(out), "--work", str(tmp_path)])
    result = json.loads(out.read_text())
    assert result["dry"] and result["environment"]["device"] == "cpu"
    assert result["matmul"]["flops"] > 0 and not result["skipped"]
    assert [row["shape"] for row in result["minilm"]] == ["pubmedqa", "biosses"]
    for row in result["minilm"]:
        assert row["eager"]["attention"] == "eager" and row["fused"]["attention"] == "fused"
        assert row["separate"]["ex_per_s"] > 0 and row["fused_speedup"] > 0
        # fp32 on the CPU, dropout off: the two attentions train the same members
        assert row["loss_after_steps"]["max_abs_diff"] < 1e-5
    assert [(r["length"], r["members"]) for r in result["bert"]] == [(8, 1), (8, 2), (16, 1),
                                                                      (16, 2)]
    assert all(r["tflop_per_s"] > 0 and r["share_of_matmul"] > 0 for r in result["bert"])
    preset = result["preset"]
    assert (preset["exit"], preset["runs"], preset["completed_runs"], preset["stacks"]) == \
        (0, 2, 2, 1)
    assert 0 < preset["to_first_step_s"] < preset["wall_s"]
    printed = capsys.readouterr().out
    assert "| BERT-base shape |" in printed and "BIOSSES preset: 2/2 runs completed" in printed


def test_the_profile_runs_on_the_cpu_with_tiny_shapes(capsys):
    import profile_stack

    profile_stack.main()
    out = capsys.readouterr().out
    assert out.startswith("launch: a tiny kernel:")
    steps = [line for line in out.splitlines() if " ms a step" in line]
    assert len(steps) == 10
