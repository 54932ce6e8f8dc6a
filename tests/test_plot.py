"""`dsdpo plot`: the curves drawn are the metrics logged, per run and per metric."""

import json

from tests.cli_helpers import assert_one_line_error, run


def _run_folder(path, records, torn_tail=False):
    path.mkdir()
    text = "".join(json.dumps(record) + "\n" for record in records)
    (path / "metrics.jsonl").write_text(text + ('{"step": 9, "lo' if torn_tail else ""))
    return path


def test_plot_draws_each_runs_logged_values(tmp_path):
    from dsdpo.training.plot import plot_runs

    first = _run_folder(
        tmp_path / "a",
        [
            {"step": 0, "eval/loss": 0.69},
            {"step": 1, "loss": 0.7, "rewards/accuracies": 0.5},
            {"step": 2, "loss": 0.9, "rewards/accuracies": 0.5},
            {"step": 2, "loss": 0.6, "rewards/accuracies": 0.75},  # logged again after a resume: wins
        ],
        torn_tail=True,
    )
    second = _run_folder(tmp_path / "b", [{"step": 1, "loss": 0.8}, {"step": 3, "loss": 0.4}])
    figure = plot_runs([first, second], tmp_path / "out" / "curves.png")
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    panels = {axis.get_title(): axis for axis in figure.axes if axis.get_visible()}
    assert list(panels) == ["loss", "rewards/accuracies", "eval/loss"]
    lines = {line.get_label(): line for line in panels["loss"].get_lines()}
    assert list(lines[str(first)].get_xdata()) == [1, 2] and list(lines[str(first)].get_ydata()) == [0.7, 0.6]
    assert list(lines[str(second)].get_xdata()) == [1, 3] and list(lines[str(second)].get_ydata()) == [
        0.8,
        0.4,
    ]
    assert [line.get_label() for line in panels["eval/loss"].get_lines()] == [str(first)]


def test_plot_cli_writes_the_file_and_bad_runs_are_one_line(tmp_path):
    folder = _run_folder(tmp_path / "a", [{"step": 1, "loss": 0.7}])
    result = run("plot", folder, "--out", tmp_path / "c.png", "--metric", "loss")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert_one_line_error(run("plot", tmp_path / "nowhere", "--out", tmp_path / "d.png"), "no metrics.jsonl")
    assert_one_line_error(run("plot", folder, "--metric", "eval/loss"), "none of the runs logged eval/loss")


def test_plot_draws_every_logged_held_out_metric_by_default(tmp_path):
    from dsdpo.training.plot import plot_runs

    records = [
        {"step": 0, "eval/loss": 0.69, "eval/accuracy": 0.25, "eval/accuracy_ci95_low": 0.1},
        {"step": 1, "loss": 0.7, "lr": 1e-3},
        {"step": 2, "loss": 0.6, "eval/loss": 0.6, "eval/accuracy": 0.5, "eval/logps/chosen": -3.0},
    ]
    figure = plot_runs([_run_folder(tmp_path / "a", records)], tmp_path / "curves.png")
    panels = [axis.get_title() for axis in figure.axes if axis.get_visible()]
    assert panels == ["loss", "eval/loss", "eval/accuracy", "eval/accuracy_ci95_low", "eval/logps/chosen"]
