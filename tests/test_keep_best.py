"""--keep-best METRIC (issue 12): `best` names the checkpoint of the best logged evaluation, saved at
that step (its weights reproduce the logged number), kept past --keep-last, and kept across a resume."""

import json

import pytest

from dsdpo.config import Config, TrainConfig
from dsdpo.runtime.checkpoint import TrainState
from dsdpo.training.checkpoint_policy import best_improved
from dsdpo.training.demo import write_jsonl
from tests.cli_helpers import run
from tests.run_helpers import metrics_by_step, train_on_cpu
from tests.tiny_runs import training_and_held_out_rows

OPTIONS = dict(epochs=2, budget=2, beta=0.5, seed=1, eval_every=1, keep_last=1, keep_best="eval/loss")


@pytest.fixture(scope="module")
def resumed_run(tiny_gemma_dir, tmp_path_factory):
    """A DPO run whose held-out pairs prefer what training rejects: eval/loss rises as training goes
    on, so its best evaluation comes early, not last. 5 steps, then resumed to 8."""
    folder = tmp_path_factory.mktemp("keep-best")
    train, held_out = training_and_held_out_rows(folder)
    swapped = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in held_out]
    eval_file = write_jsonl(swapped, folder / "eval.jsonl")
    run = (tiny_gemma_dir, train, folder / "run")
    train_on_cpu(*run, max_steps=5, eval_data=eval_file, **OPTIONS)
    best_after_first = (folder / "run" / "best").read_text().strip()
    train_on_cpu(*run, "--resume", "auto", max_steps=8, eval_data=eval_file, **OPTIONS)
    return folder, eval_file, best_after_first


def _best_logged_step(metrics: dict, last: int) -> int:
    losses = {step: metrics[step]["eval/loss"] for step in range(1, last + 1)}
    return min(losses, key=losses.get)


def test_best_names_the_step_with_the_lowest_logged_eval_loss(resumed_run):
    folder, _, best_after_first = resumed_run
    metrics = metrics_by_step(folder / "run")
    best = _best_logged_step(metrics, 8)
    assert best != 8, "the run's best evaluation should not be its last (the test needs that)"
    assert (folder / "run" / "best").read_text().strip() == f"step_{best:06d}"
    assert best_after_first == f"step_{_best_logged_step(metrics, 5):06d}"
    # --keep-last 1 keeps the newest checkpoint and, besides it, only the best one
    kept = sorted(p.name for p in (folder / "run").glob("step_*"))
    assert kept == sorted({f"step_{best:06d}", "step_000008"})


def test_the_best_checkpoint_holds_the_weights_of_its_step(resumed_run, tiny_gemma_dir, tmp_path):
    folder, eval_file, _ = resumed_run
    best = (folder / "run" / "best").read_text().strip()
    out = tmp_path / "report.json"
    result = run(
        "eval", "preference", "--model", folder / "run" / best, "--ref", tiny_gemma_dir, "--data", eval_file,
        "--json", out, "--budget", "2", "--beta", "0.5", "--seed", "1", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    logged = metrics_by_step(folder / "run")[int(best.removeprefix("step_"))]
    assert logged["eval/loss"] == pytest.approx(json.loads(out.read_text())["loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("metric", "value", "better"),
    [
        ("eval/loss", 0.5, True),
        ("eval/loss", 0.7, False),
        ("eval/accuracy", 0.7, True),
        ("eval/accuracy", 0.5, False),
        ("eval/rewards/accuracies", 0.6, False),  # a tie keeps the earlier checkpoint
    ],
)
def test_direction_of_each_metric(metric, value, better):
    config = Config(train=TrainConfig(keep_best=metric))
    assert best_improved(config, {metric: value}, TrainState(best_step=3, best_value=0.6)) is better


def test_unknown_metric_or_one_without_its_data_is_refused():
    from dsdpo.errors import DsdpoError

    with pytest.raises(DsdpoError, match="unknown metric 'loss'"):
        TrainConfig(keep_best="loss").validate()
    with pytest.raises(DsdpoError, match="--eval-problems"):
        TrainConfig(keep_best="eval/accuracy", eval_data="x.jsonl").validate()


def _fake_checkpoint(output, step: int, best_step: int | None) -> None:
    """A folder that complete_checkpoints counts: only its state file matters to pruning."""
    from dsdpo.runtime.checkpoint import STATE_FILE, step_tag

    folder = output / step_tag(step)
    folder.mkdir()
    (folder / STATE_FILE).write_text(json.dumps({"state": {"step": step, "best_step": best_step}}))


def test_pruning_spares_the_best_that_a_kept_checkpoint_would_restore(tmp_path):
    """Best at 10, a plain checkpoint at 20 (its best: 10), a new best at 25 with --keep-last 2:
    step_000010 must stay, since `--resume step_000020` points `best` at it again (issue 20)."""
    from dsdpo.runtime.checkpoint import prune_checkpoints, write_best

    _fake_checkpoint(tmp_path, 10, best_step=10)
    _fake_checkpoint(tmp_path, 20, best_step=10)
    _fake_checkpoint(tmp_path, 25, best_step=25)
    write_best(tmp_path, "step_000025")
    prune_checkpoints(tmp_path, keep=2, protect="step_000025")
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000010", "step_000020", "step_000025"]
    _fake_checkpoint(tmp_path, 30, best_step=25)  # step_000020 goes, and the best only it named with it
    prune_checkpoints(tmp_path, keep=2, protect="step_000030")
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000025", "step_000030"]
