"""Over-optimisation diagnostics: drift of each side against the reference, and the displacement warning."""

import pytest
import torch

from dsdpo.objective.losses import LossConfig, preference_loss
from dsdpo.training.metrics import DisplacementMonitor


def test_drift_is_the_score_change_from_the_reference_in_nats():
    out = preference_loss(*(torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5)), LossConfig(beta=0.5))
    metrics = out.metrics(torch.tensor([-10.0]), torch.tensor([-12.0]))
    assert metrics["drift/chosen"] == pytest.approx(1.0)  # −10 − (−11)
    assert metrics["drift/rejected"] == pytest.approx(-0.5)  # −12 − (−11.5)


def steps(drifts, margins):
    return [{"drift/chosen": d, "rewards/margins": m} for d, m in zip(drifts, margins, strict=True)]


def test_warns_once_when_the_chosen_likelihood_falls_while_the_margin_grows():
    monitor = DisplacementMonitor(window=3)
    history = steps([0.1, -0.2, -0.5, -0.9, -1.4], [0.1, 0.3, 0.6, 0.9, 1.5])
    warnings = [monitor.update(step, m) for step, m in enumerate(history, start=1)]
    assert warnings[:2] == [None, None]  # not a full window yet
    assert "likelihood displacement" in warnings[2] and "step 3" in warnings[2]
    assert warnings[3:] == [None, None]  # once


@pytest.mark.parametrize(
    ("drifts", "margins"),
    [
        ([0.1, -0.2, 0.0, -0.9], [0.1, 0.3, 0.6, 0.9]),  # not steadily falling
        ([0.9, 0.6, 0.3, 0.1], [0.1, 0.3, 0.6, 0.9]),  # falling but still above the reference
        ([0.1, -0.2, -0.5, -0.9], [0.9, 0.6, 0.3, 0.1]),  # the margin shrinks: no reward hacking
    ],
)
def test_no_warning_without_displacement(drifts, margins):
    monitor = DisplacementMonitor(window=3)
    assert all(monitor.update(step, m) is None for step, m in enumerate(steps(drifts, margins), start=1))
