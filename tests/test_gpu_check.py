"""benchmarks/gpu_check.py on the CPU: its arithmetic, and its --dry-run (the code path a lent GPU
runs, with a tiny LLaDA and the CPU accelerator)."""

import json

import pytest

from benchmarks.gpu_check import main, measured


def test_metrics_give_the_peak_the_time_of_the_timed_steps_and_the_achieved_rate(tmp_path):
    # Step 1 pays the warm-up: left out of the time, not out of the peak.
    fields = ("seconds", "gpu_peak_memory_mb", "tokens_per_s")
    values = [(10.0, 3072.0, 1.0), (2.0, 2048.0, 100.0), (4.0, 2560.0, 64.0)]
    records = [
        {"step": i + 1, "sweeps": 9, "loss": 0.7, **dict(zip(fields, v, strict=True))}
        for i, v in enumerate(values)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = measured(tmp_path / "metrics.jsonl", pairs_per_step=2, step_tflop=6.0)
    assert result["gpu_peak_gib"] == 3.0
    assert result["seconds_per_step"] == 3.0 and result["seconds_per_pair"] == 1.5
    assert result["achieved_tflops"] == 2.0
    assert result["tokens_per_row"] == 64.0  # 256 tokens in 2 pairs' chosen and rejected rows


def test_dry_run_plans_and_measures_a_shipped_config_and_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    argv = ["--dry-run", "--skip-tests", "--configs", "rtx4080.json", "absent.json", "--steps", "2"]
    argv += ["--run-timeout", "900"]  # the H100's 115 s is too short for a loaded 2-core CPU
    report = main([*argv, "--out", str(out), "--work-dir", str(tmp_path / "work")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    run = report["runs"]["rtx4080.json"]
    assert run["run"]["returncode"] == 0, run["run"]["log_tail"]
    planned, got = run["planned"], run["measured"]
    assert got["steps"] == 2 and got["loss"][0] > 0
    # The trainer's rows are as wide as the planner's, and it made the forward and backward calls the
    # planner counts: the FLOPs divided by the step time are those of the run that was timed.
    width = report["shape"]["prompt_tokens"] + report["shape"]["response_tokens"]
    assert got["tokens_per_row"] == pytest.approx(width)
    assert got["sweeps_per_step"] == planned["sweeps_per_step"] > 2 * report["shape"]["accumulation"]
    assert got["gpu_peak_gib"] is None  # no CUDA: no GPU peak to compare
    assert planned["fits_rtx4080"] and got["achieved_tflops"] > 0
    assert report["runs"]["absent.json"] == {
        "skipped": "ds_configs/absent.json does not exist on this branch"
    }
    assert report["compute"]["tflops"] > 0 and report["sampler"]["tokens_per_s"] > 0
    for leftover in ("run-rtx4080", "run-rtx4080-swap"):  # its checkpoint and swap files: GBs at 1B
        assert not (tmp_path / "work" / leftover).exists()
