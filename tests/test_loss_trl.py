"""dsdpo's losses against TRL 1.16.0's own DPOTrainer._compute_loss on the same scores and lengths.

The numbers were computed once by TRL's code (tests/fixtures/trl/build.py, which says how); TRL is
not a dependency. Each case names TRL's settings and the dsdpo LossConfig meant to give the same loss
and the same gradient with respect to the policy scores: TRL's names give TRL's numbers.
"""

import json
from pathlib import Path

import pytest
import torch

from dsdpo.objective.losses import LossConfig, preference_loss

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "trl" / "expected.json").read_text())
# float64: TRL's float64 arithmetic, in another order; float32 (TRL's alpha_divergence accepts no float64).
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
FLOAT32_CONSTANTS = 1e-7  # the cases whose note says TRL rounds a constant to float32


def dsdpo_loss(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = getattr(torch, case["dtype"])
    s = {name: torch.tensor(values, dtype=dtype) for name, values in FIXTURE["scores"].items()}
    chosen = s["policy_chosen"].clone().requires_grad_()
    rejected = s["policy_rejected"].clone().requires_grad_()
    out = preference_loss(
        chosen, rejected, s["ref_chosen"], s["ref_rejected"], LossConfig(**case["dsdpo"]),
        chosen_lengths=s["chosen_lengths"], rejected_lengths=s["rejected_lengths"],
    )  # fmt: skip
    out.loss.backward()
    # A loss of the chosen side alone (sft) leaves the rejected scores out of the graph: gradient 0.
    rejected_grad = torch.zeros_like(rejected) if rejected.grad is None else rejected.grad
    return out.loss.detach(), chosen.grad, rejected_grad


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["name"] for c in FIXTURE["cases"]])
def test_loss_and_gradient_equal_trls(case):
    loss, grad_chosen, grad_rejected = dsdpo_loss(case)
    tolerance = FLOAT32_CONSTANTS if case["note"] else TOLERANCE[case["dtype"]]
    assert float(loss) == pytest.approx(case["loss"], rel=tolerance, abs=tolerance)
    assert grad_chosen.tolist() == pytest.approx(case["grad_policy_chosen"], rel=tolerance, abs=tolerance)
    assert grad_rejected.tolist() == pytest.approx(case["grad_policy_rejected"], rel=tolerance, abs=tolerance)


def test_the_fixture_covers_every_trl_loss_type_and_divergence():
    assert FIXTURE["trl_version"] == "1.16.0"
    types = {t for c in FIXTURE["cases"] for t in c["trl"]["loss_types"]}
    assert types == {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }  # fmt: skip
    divergences = {c["trl"]["f_divergence_type"] for c in FIXTURE["cases"]}
    assert divergences == {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"}
