"""The benchmark runs anywhere (tiny model, CPU) and reports every figure; speed itself is not asserted."""

import json

from vlui import bench


def test_bench_reports_baseline_engine_and_rooflines(capsys):
    out = bench.main(["--family", "llava", "--size", "tiny", "--device", "cpu", "--users", "3", "--baseline-users", "2",
                      "--overload-users", "6", "--max-batch", "2", "--new-tokens", "6", "--stagger", "0.1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["model"] == out["model"]
    for key in ("copy_bandwidth_GBps", "matmul_TFLOPs", "roofline_batch1_tok_s", "first_token_floor_s",
                "baseline_single", "baseline_multi", "vlui_single", "vlui_multi", "vlui_breakdown", "ratios"):
        assert key in out, key
    assert out["vlui_single"]["tokens"] == 6 and out["baseline_single"]["tokens"] == 6
    assert out["overload"]["completed"] == 6 and out["overload"]["max_queue_position"] >= 1  # more users than slots
