"""Training configuration, DeepSpeed config resolution and the step batches (no engines here)."""

import json
import os

import pytest

from dsdpo.config import (
    Config,
    DataConfig,
    ModelConfig,
    ScoreConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config_file,
    parse_assignments,
)
from dsdpo.data import PairBatcher
from dsdpo.data.tokenize import TokenizedPair
from dsdpo.errors import DsdpoError
from dsdpo.runtime.ds_config import (
    precision,
    read_ds_config,
    reference_ds_config,
    resolve_batch_sizes,
    resolve_ds_config,
)
from dsdpo.training.setup import step_batches
from tests.run_helpers import REPO


def test_config_file_flags_and_set_overrides_compose(tmp_path):
    (tmp_path / "train.yaml").write_text("model: {path: m}\ndata: {path: d.jsonl}\nscore: {budget: 4}\n")
    data = load_config_file(tmp_path / "train.yaml")
    data = apply_overrides(data, {"loss.beta": 0.3, "score.estimator": None})  # None: flag not given
    data = apply_overrides(data, parse_assignments(["score.budget=16", "train.max_steps=none"]))
    config = config_from_dict(data).validate()
    assert (config.score.budget, config.loss.beta, config.score.estimator) == (16, 0.3, "l_over_L")
    assert config.train.max_steps is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"score": {"budgte": 4}}, r"unknown field score.budgte \(did you mean score.budget\?\)"),
        ({"scores": {}}, "unknown section 'scores'"),
        ({"score": {"budget": "many"}}, "score.budget: expected int, got 'many'"),
        (
            {"train": {"keep_last": 0}, "model": {"path": "m"}, "data": {"path": "d"}},
            "train.keep_last must be",
        ),
        ({"data": {"path": "d"}}, "model.path is required"),
        ({"loss": {"type": "kto"}}, "loss.type: unknown loss 'kto'"),
        (
            {"score": {"max_tokens_no_grad": 0}, "model": {"path": "m"}, "data": {"path": "d"}},
            "score.max_tokens_no_grad must be positive, got 0",
        ),
        (
            {
                "score": {"antithetic": False},
                "model": {"path": "m"},
                "data": {"path": "d"},
                "loss": {"objective": "per_draw"},
            },
            "score.antithetic false gives the reference its own draws: not with",
        ),
    ],
)
def test_bad_configs_name_the_field(data, message):
    with pytest.raises(DsdpoError, match=message):
        config_from_dict(data, "train.yaml").validate()


def test_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DsdpoError, match=r"bad\.json: not valid JSON"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(DsdpoError, match="no such training config file"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    with pytest.raises(DsdpoError, match=r"list\.yaml: expected a mapping of sections .* found a list"):
        load_config_file(tmp_path / "list.yaml")


def test_batch_sizes_fill_auto_and_reject_inconsistent_triples():
    assert resolve_batch_sizes(
        {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 2, "x"
    ) == {
        "train_batch_size": 12,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
    }
    assert (
        resolve_batch_sizes({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 2, "x")[
            "gradient_accumulation_steps"
        ]
        == 4
    )
    bad = {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}
    with pytest.raises(
        DsdpoError,
        match=r"x: inconsistent batch sizes: train_batch_size \(10\) must equal "
        r"train_micro_batch_size_per_gpu \(2\) × gradient_accumulation_steps "
        r"\(2\) × world size \(2\)",
    ):
        resolve_batch_sizes(bad, 2, "x")
    with pytest.raises(DsdpoError, match="gradient_accumulation_steps must be a positive integer"):
        resolve_batch_sizes({"gradient_accumulation_steps": 0}, 1, "x")


@pytest.mark.parametrize(
    "name",
    [
        "cpu.json",
        "rtx4080.json",
        "rtx4080_lora.json",
        "rtx4080_nvme.json",
        "rtx4080_hybrid.json",
        "multi_gpu.json",
    ],
)
def test_shipped_configs_resolve(name, tmp_path):
    raw = read_ds_config(REPO / "ds_configs" / name)
    resolved = resolve_ds_config(
        raw,
        world_size=8 if name == "multi_gpu.json" else 1,
        total_steps=100,
        nvme_path=str(tmp_path),
        largest_parameter=126464 * 4096,  # LLaDA-8B's embedding and output layer
        source=name,
    )
    assert resolved["managed_gradient_accumulation"] is False  # dsdpo owns the boundary
    assert "auto" not in json.dumps(resolved)
    reference = reference_ds_config(resolved)
    assert "optimizer" not in reference and "scheduler" not in reference
    assert "offload_optimizer" not in reference["zero_optimization"]
    if name == "rtx4080_nvme.json":  # each engine swaps to its own folder
        assert resolved["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path / "policy")
        assert reference["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path / "reference")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_shipped_bf16_configs_accumulate_gradients_in_fp32(name):
    raw = read_ds_config(REPO / "ds_configs" / name)
    if precision(raw) == "bf16":
        assert raw["data_types"] == {"grad_accum_dtype": "fp32"}


def test_bf16_config_without_fp32_accumulation_warns_naming_the_field(caplog):
    raw = read_ds_config(REPO / "ds_configs" / "rtx4080.json")
    resolve_ds_config(raw, world_size=1, total_steps=1, source="rtx4080.json")
    assert "grad_accum_dtype" not in caplog.text  # the shipped file sets it
    del raw["data_types"]
    resolve_ds_config(raw, world_size=1, total_steps=1, source="rtx4080.json")
    assert "rtx4080.json: bf16 without data_types.grad_accum_dtype" in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["zero_optimization"].update(stage=2), "zero_optimization.stage must be 3"),
        (lambda c: c.update(fp16={"enabled": True}), "fp16 is not supported"),
        (lambda c: c.pop("optimizer"), "an optimizer block is required"),
        (lambda c: c["optimizer"]["params"].update(eps="auto"), 'fill "auto" for optimizer.params.eps'),
    ],
)
def test_unusable_ds_configs_are_clear_errors(change, message):
    raw = read_ds_config(REPO / "ds_configs" / "cpu.json")
    change(raw)
    with pytest.raises(DsdpoError, match=message):
        resolve_ds_config(raw, world_size=1, total_steps=1)


def test_nvme_config_without_a_path_says_how_to_give_one():
    raw = read_ds_config(REPO / "ds_configs" / "rtx4080_nvme.json")
    with pytest.raises(DsdpoError, match="offloads to NVMe: give --nvme-path DIR"):
        resolve_ds_config(raw, world_size=1, total_steps=1)


def test_bad_ds_config_json_names_file_line_and_column(tmp_path):
    (tmp_path / "ds.json").write_text('{\n  "train_batch_size": 4,\n  oops\n}')
    with pytest.raises(DsdpoError, match=r"ds.json: not valid JSON: line 3, column 3"):
        read_ds_config(tmp_path / "ds.json")


def _pairs(count):
    return [TokenizedPair(f"p{i}", [1] * (1 + i % 5), [2], [3], None) for i in range(count)]


def _step_pairs(world, micro, accumulation, steps):
    """The pair ids of each step, over all ranks, as the trainer would cut them."""
    per_rank = [
        step_batches(PairBatcher(_pairs(40), micro * accumulation, seed=7, world_size=world, rank=r), micro)
        for r in range(world)
    ]
    result = []
    for _ in range(steps):
        step = [next(rank_steps) for rank_steps in per_rank]
        assert all(len(micro_batches) == accumulation for _, micro_batches in step)
        assert all(len(mb) == micro for _, micro_batches in step for mb in micro_batches)
        result.append(sorted(p.example_id for _, micro_batches in step for mb in micro_batches for p in mb))
    return result


def test_a_step_takes_the_same_pairs_however_they_are_spread_over_ranks_and_accumulation():
    reference = _step_pairs(world=1, micro=4, accumulation=1, steps=25)  # crosses into epoch 2
    assert _step_pairs(world=1, micro=1, accumulation=4, steps=25) == reference
    assert _step_pairs(world=2, micro=1, accumulation=2, steps=25) == reference
    assert _step_pairs(world=2, micro=2, accumulation=1, steps=25) == reference
    assert len({tuple(step) for step in reference[:10]}) == 10  # an epoch: 10 distinct steps


def test_step_batches_report_the_epoch_of_each_step():
    steps = step_batches(PairBatcher(_pairs(8), 4, seed=0), 2)
    assert [next(steps)[0] for _ in range(5)] == [0, 0, 1, 1, 2]


def test_bad_input_to_the_trainer_is_one_line_before_any_distributed_start_up(tiny_gemma_dir, tmp_path):
    from tests.run_helpers import run_train, train_args

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    args = train_args(
        REPO / "ds_configs" / "cpu.json", tiny_gemma_dir, tmp_path / "pairs.jsonl", tmp_path / "out"
    )
    result = run_train(args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'pairs.jsonl'}:1: ")
    assert "rejected" in result.stderr and "Traceback" not in result.stderr
    assert "shm_comm" not in result.stdout + result.stderr  # failed before DeepSpeed's start-up


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(fp16=True), r'"fp16" must be a JSON object, got True'),
        (lambda c: c.update(zero_optimization="three"), r'"zero_optimization" must be a JSON object'),
        (
            lambda c: c.update(zero_optimisation={"stage": 3}),
            r"unknown key 'zero_optimisation': did you mean",
        ),
        (lambda c: c.update(my_notes="x"), r"unknown key 'my_notes': DeepSpeed would ignore it"),
        (
            lambda c: c["zero_optimization"].update(reduce_bucket_sise=5),
            r"zero_optimization\.reduce_bucket_sise: Extra inputs are not permitted",
        ),
        (
            lambda c: c["zero_optimization"].update(reduce_bucket_size="many"),
            r"zero_optimization\.reduce_bucket_size: Input should be a valid integer.*'many'",
        ),
        (lambda c: c["optimizer"].update(type="Adamm"), r"optimizer\.type 'Adamm' is not an optimizer"),
        (
            lambda c: c.update(scheduler={"type": "WarmupLRR", "params": {}}),
            r"scheduler\.type 'WarmupLRR' is not a scheduler",
        ),
        (
            lambda c: c.update(scheduler={"type": "WarmupLR", "params": {"warmup_steps": 5}}),
            r"scheduler\.params\.warmup_steps: WarmupLR takes no such parameter",
        ),
        (
            lambda c: c.update(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": "10"}}),
            r"scheduler\.params\.warmup_num_steps must be a number, got '10'",
        ),
        (
            lambda c: c["optimizer"]["params"].update(lr=-1e-3),
            r"optimizer\.params\.lr must be a finite number >= 0, got -0\.001$",
        ),
        (
            lambda c: c["scheduler"]["params"].update(warmup_max_lr=-2e-3),
            r"scheduler\.params\.warmup_max_lr must be a finite number >= 0, got -0\.002$",
        ),
        (
            lambda c: c.update(gradient_clipping=-1.0),
            r"gradient_clipping must be a finite number >= 0, got -1\.0$",
        ),
        (
            lambda c: c.update(gradient_clipping=float("nan")),
            r"gradient_clipping must be a finite number >= 0, got nan$",
        ),
    ],
)
def test_what_deepspeed_would_refuse_after_start_up_is_refused_before_it(change, message):
    raw = read_ds_config(REPO / "ds_configs" / "cpu.json")
    change(raw)
    with pytest.raises(DsdpoError, match=rf"^cpu\.json: {message}"):
        resolve_ds_config(raw, world_size=1, total_steps=1, source="cpu.json")


def test_nvme_path_must_be_an_existing_writable_folder(tmp_path):
    raw = read_ds_config(REPO / "ds_configs" / "rtx4080_nvme.json")
    (tmp_path / "file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path / "file": "is a file",
        locked: "is not writable",
    }
    for path, problem in cases.items():
        if path is locked and os.geteuid() == 0:
            continue  # root writes anywhere
        with pytest.raises(DsdpoError, match=rf"swaps to NVMe: {path} {problem}"):
            resolve_ds_config(raw, world_size=1, total_steps=1, nvme_path=str(path))


def test_nvme_swap_buffers_auto_hold_the_largest_parameter_partition(tmp_path):
    raw = read_ds_config(REPO / "ds_configs" / "rtx4080_nvme.json")
    assert raw["zero_optimization"]["offload_param"]["buffer_size"] == "auto"
    for ranks, expected in ((1, 518_000_001), (2, 259_000_001)):  # a partition is ceil(numel / ranks)
        resolved = resolve_ds_config(
            raw, world_size=ranks, total_steps=1, nvme_path=str(tmp_path), largest_parameter=518_000_001
        )
        assert resolved["zero_optimization"]["offload_param"]["buffer_size"] == expected
    with pytest.raises(
        DsdpoError, match=r'cannot fill "auto" for zero_optimization\.offload_param\.buffer_size'
    ):
        resolve_ds_config(raw, world_size=1, total_steps=1, nvme_path=str(tmp_path))


@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT"])
def test_a_second_stop_signal_stops_at_once(second):
    """Issue 20: a second SIGTERM waited for the step boundary (minutes with a large --budget)."""
    import os
    import signal

    from dsdpo.training.stopping import StoppedAtOnce, StopRequest

    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested  # the first one: stop and save at the next step boundary
        with pytest.raises(StoppedAtOnce, match="stopped at once by a second signal"):
            os.kill(os.getpid(), getattr(signal, second))
    finally:
        stop.restore()


def test_a_budget_whose_draws_cannot_fit_is_refused_before_start_up(tiny_gemma_dir, tmp_path):
    """Issue 20: --budget 1000000 was accepted and grew memory for minutes without a step."""
    import psutil

    from dsdpo.training.demo import addition_pairs, write_jsonl
    from dsdpo.training.setup import DRAW_ROW_BYTES, plan_run

    data = write_jsonl(addition_pairs(8), tmp_path / "pairs.jsonl")
    free = psutil.virtual_memory().available
    per_row, overhead = DRAW_ROW_BYTES
    budget = int(free / (2 * (per_row * 1024 + overhead)))  # 1 pair a micro-batch: all the free memory
    config = Config(
        model=ModelConfig(path=str(tiny_gemma_dir)),
        data=DataConfig(path=str(data)),
        score=ScoreConfig(budget=budget),
        train=TrainConfig(output=str(tmp_path / "run")),
    )
    ds = read_ds_config(REPO / "ds_configs" / "cpu.json")
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(
        DsdpoError, match=rf"^--budget {budget}: a micro-batch's draws alone take .* lower --budget$"
    ):
        plan_run(config, tmp_path / "ds.json", nvme_path=None, resume=None)
    config.score.budget = 8
    assert plan_run(config, tmp_path / "ds.json", nvme_path=None, resume=None).total_steps > 0
