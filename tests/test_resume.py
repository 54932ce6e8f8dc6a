"""Crash and resume: SIGKILL at exact points (dsdpo.runtime.faults), then --resume auto continues exactly."""

import copy
import json
import signal
import time

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from dsdpo.config import Config, DataConfig, ModelConfig, ScoreConfig, TrainConfig
from dsdpo.errors import DsdpoError
from dsdpo.runtime.checkpoint import LATEST_FILE, STATE_FILE
from dsdpo.training.demo import addition_pairs, write_jsonl
from dsdpo.training.loop import train
from tests.ds_helpers import CPU_CONFIG
from tests.run_helpers import REPO, metrics_by_step, run_train, start_train, tail, train_args

STEPS = 12


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(addition_pairs(24, seed=3), tmp_path_factory.mktemp("data") / "pairs.jsonl")


def _args(model_dir, data_file, output, *extra):
    cpu = REPO / "ds_configs" / "cpu.json"
    options = dict(max_steps=STEPS, epochs=10, budget=2, beta=0.5, save_every=3, keep_last=2)
    return [*train_args(cpu, model_dir, data_file, output, **options), *extra]


def _final_weights(output):
    state = get_fp32_state_dict_from_zero_checkpoint(str(output), tag=f"step_{STEPS:06d}")
    return {name: tensor.clone() for name, tensor in state.items()}


@pytest.fixture(scope="module")
def straight(tiny_gemma_dir, data_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    result = run_train(_args(tiny_gemma_dir, data_file, output))
    assert result.returncode == 0, tail(result)
    assert sorted(p.name for p in output.glob("step_*")) == ["step_000009", "step_000012"]  # --keep-last 2
    return output


def _assert_same_run(output, straight):
    expected, got = metrics_by_step(straight), metrics_by_step(output)
    assert sorted(got) == list(range(1, STEPS + 1))
    logged = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))  # a resume cut the log back: no step twice
    for step in expected:
        assert got[step]["loss"] == expected[step]["loss"], step  # exactly: fp32 on the CPU
    a, b = _final_weights(straight), _final_weights(output)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_killed_after_a_checkpoint_resumes_exactly(tiny_gemma_dir, data_file, tmp_path, straight):
    args = _args(tiny_gemma_dir, data_file, tmp_path)
    killed = run_train(args, env={"DSDPO_FAULT": f"after_save:{STEPS // 2}"})
    assert killed.returncode == -9, tail(killed)
    assert (tmp_path / LATEST_FILE).read_text() == f"step_{STEPS // 2:06d}"
    resumed = run_train([*args, "--resume", "auto"])
    assert resumed.returncode == 0, tail(resumed)
    assert f"resumed from {tmp_path / f'step_{STEPS // 2:06d}'}" in resumed.stdout + resumed.stderr
    _assert_same_run(tmp_path, straight)


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(
    tiny_gemma_dir, data_file, tmp_path, straight
):
    args = _args(tiny_gemma_dir, data_file, tmp_path)
    killed = run_train(args, env={"DSDPO_FAULT": "in_save:9"})
    assert killed.returncode == -9, tail(killed)
    partial = tmp_path / "step_000009.partial"
    assert any(partial.glob("*model_states.pt")) and not (partial / STATE_FILE).exists()
    assert not (tmp_path / "step_000009").exists()  # only complete checkpoints carry a step's name
    assert (tmp_path / LATEST_FILE).read_text() == "step_000006"  # never names the partial one
    resumed = run_train([*args, "--resume", "auto"])
    assert resumed.returncode == 0, tail(resumed)
    assert (
        "resumed from" in resumed.stdout + resumed.stderr and "step_000006" in resumed.stdout + resumed.stderr
    )
    _assert_same_run(tmp_path, straight)


def test_resume_from_a_named_partial_checkpoint_is_a_clear_error(tiny_gemma_dir, data_file, tmp_path):
    args = _args(tiny_gemma_dir, data_file, tmp_path)
    run_train(args, env={"DSDPO_FAULT": "in_save:3"})
    result = run_train([*args, "--resume", tmp_path / "step_000003.partial"])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "dsdpo_state.json is missing" in last
    assert "Traceback" not in result.stderr


def test_changed_options_are_named_on_resume(tiny_gemma_dir, data_file, tmp_path):
    args = _args(tiny_gemma_dir, data_file, tmp_path)
    assert run_train(args, env={"DSDPO_FAULT": "after_save:3"}).returncode == -9
    resumed = run_train([*args, "--resume", "auto", "--beta", 0.25])
    assert resumed.returncode == 0, tail(resumed)
    assert "loss.beta: 0.5 -> 0.25" in resumed.stdout + resumed.stderr


def test_ctrl_c_saves_at_the_next_step_boundary_and_the_run_resumes(tiny_gemma_dir, data_file, tmp_path):
    process = start_train(_args(tiny_gemma_dir, data_file, tmp_path, "--max-steps", 400))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    stopped_at = int((tmp_path / LATEST_FILE).read_text().removeprefix("step_"))
    assert 2 <= stopped_at < 400 and "resume with --resume auto" in stderr
    assert max(metrics_by_step(tmp_path)) == stopped_at  # nothing trained after the checkpoint
    # A later --max-steps wins over the earlier one: resume for two more steps.
    resumed = run_train(
        _args(tiny_gemma_dir, data_file, tmp_path, "--max-steps", stopped_at + 2, "--resume", "auto")
    )
    assert resumed.returncode == 0, tail(resumed)
    assert max(metrics_by_step(tmp_path)) == stopped_at + 2


def test_a_two_rank_checkpoint_resumes_on_one_rank_after_conversion(tiny_gemma_dir, data_file, tmp_path):
    import copy
    import json

    from click.testing import CliRunner

    from dsdpo.cli import main

    configs = {}
    for ranks, accumulation in ((2, 1), (1, 2)):  # the same 4 pairs a step either way
        config = copy.deepcopy(json.loads((REPO / "ds_configs" / "cpu.json").read_text()))
        config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=accumulation)
        configs[ranks] = tmp_path / f"ds{ranks}.json"
        configs[ranks].write_text(json.dumps(config))
    output = tmp_path / "run"
    options = dict(max_steps=6, budget=2, beta=0.5, save_every=3, keep_last=5)
    two = run_train(train_args(configs[2], tiny_gemma_dir, data_file, output, **options), ranks=2)
    assert two.returncode == 0, tail(two)
    expected = metrics_by_step(output)

    one_rank = run_train(train_args(configs[1], tiny_gemma_dir, data_file, output, **options, resume="auto"))
    assert one_rank.returncode == 2 and "dsdpo convert-checkpoint" in one_rank.stderr  # says how
    converted = CliRunner().invoke(main, ["convert-checkpoint", str(output / "step_000003")])
    assert converted.exit_code == 0, converted.output
    resumed = run_train(
        train_args(
            configs[1], tiny_gemma_dir, data_file, output, **options, resume=output / "step_000003_universal"
        )
    )
    assert resumed.returncode == 0, tail(resumed)
    got = metrics_by_step(output)
    for step in (4, 5, 6):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-5), step


def test_a_data_file_edited_in_place_is_refused_on_resume(tiny_gemma_dir, tmp_path):
    rows = addition_pairs(8, seed=3)
    data = write_jsonl(rows, tmp_path / "pairs.jsonl")
    ds = copy.deepcopy(CPU_CONFIG)
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    (tmp_path / "ds.json").write_text(json.dumps(ds))

    def run(max_steps, resume=None):
        config = Config(
            model=ModelConfig(path=str(tiny_gemma_dir)),
            data=DataConfig(path=str(data)),
            score=ScoreConfig(budget=2),
            train=TrainConfig(output=str(tmp_path / "run"), max_steps=max_steps),
        )
        return train(config, tmp_path / "ds.json", resume=resume)

    run(1)
    edited = copy.deepcopy(rows)
    edited[5]["chosen"] = "99"  # same path, same number of rows: the batcher's position stays valid
    write_jsonl(edited, data)
    with pytest.raises(DsdpoError, match=r"pairs\.jsonl changed since .*step_000001 was written"):
        run(2, resume="auto")
    write_jsonl(rows, data)  # restored: resumes
    assert run(2, resume="auto")["consumed_pairs"] == 4


def test_a_flipped_byte_in_an_optimizer_shard_is_refused_naming_the_file(tiny_gemma_dir, data_file, tmp_path):
    """Issue 20: bytes flipped inside an optimizer-state tensor resumed silently with other weights."""
    args = _args(tiny_gemma_dir, data_file, tmp_path)
    killed = run_train(args, env={"DSDPO_FAULT": "after_save:3"})
    assert killed.returncode == -9, tail(killed)
    (shard,) = (tmp_path / "step_000003").glob("*optim_states.pt")
    data = bytearray(shard.read_bytes())
    data[-len(data) // 3] ^= 0xFF  # inside the tensors' storage, far from the pickle header
    shard.write_bytes(bytes(data))
    result = run_train([*args, "--resume", "auto"])
    assert result.returncode == 2, tail(result)
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: {shard} is corrupt: its contents differ from the digest recorded when it was saved; "
        "resume from an earlier checkpoint"
    )


def test_a_checkpoint_without_digests_is_read_with_a_note(tmp_path, capsys):
    """Checkpoints saved before digests existed still load; the note says they are not verified."""
    from dsdpo.runtime.checkpoint import verify_checkpoint

    (tmp_path / STATE_FILE).write_text(json.dumps({"state": {}, "world_size": 1}))
    (tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    verify_checkpoint(tmp_path, trust_checkpoint=True)
    assert capsys.readouterr().err == (
        f"note: {tmp_path} was saved without file digests (by an older dsdpo): its files are not verified\n"
    )
