"""dsdpo.evaluation.reports: preference metrics, scores and comparisons against direct elbo() computations."""

import json
import math

import pytest
import torch

from dsdpo.data import collate_pairs, load_preference_data, tokenize_pairs
from dsdpo.evaluation.reports import (
    PairedDifference,
    ScoreSettings,
    compare_preference,
    evaluate_preference,
    score_pairs,
)
from dsdpo.models.loading import load_model
from dsdpo.models.tiny import init_tiny
from dsdpo.objective.draws import draw_keys_for, sample_draws
from dsdpo.objective.elbo import elbo, elbo_terms
from dsdpo.objective.losses import LossConfig

ROWS = [
    {"id": "a", "prompt": "2+2=", "chosen": "4", "rejected": "five"},
    {"id": "b", "prompt": "Sky?", "chosen": "blue", "rejected": "green!"},
    {"id": "c", "prompt": "Hi", "chosen": "hello there", "rejected": "no"},
]
SETTINGS = ScoreSettings(budget=4, seed=3, batch_size=2, max_tokens_per_forward=64)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizer):
    path = write_rows(tmp_path_factory.mktemp("data") / "pairs.jsonl", ROWS)
    examples, _ = load_preference_data(path)
    return tokenize_pairs(examples, tokenizer, max_length=64)[0]


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("tiny-other"), arch="gemma", seed=1)


def ids(tokenizer):
    return dict(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id)


def test_policy_equal_to_reference_gives_zero_margins_and_log_2(tiny_gemma_dir, pairs, tokenizer):
    policy, reference = load_model(tiny_gemma_dir), load_model(tiny_gemma_dir)  # two copies
    report = evaluate_preference(policy, reference, pairs, **ids(tokenizer), settings=SETTINGS)
    assert report.reward_margin == 0.0 and report.chosen_reward == 0.0 and report.rejected_reward == 0.0
    assert report.loss == pytest.approx(0.6931471805599453, abs=1e-7)  # -log σ(0) = ln 2
    assert report.reward_accuracy == 0.0  # ties are not wins (TRL's convention)
    assert report.ratio_std_error == 0.0  # shared draws: the difference has no noise at all
    assert report.score_std_error > 0


def test_metrics_match_direct_elbo_calls_with_the_same_keys(tiny_gemma, other_dir, pairs, tokenizer):
    reference = load_model(other_dir).eval()
    loss = LossConfig(type="sigmoid", beta=0.5)
    report = evaluate_preference(tiny_gemma, reference, pairs, **ids(tokenizer), loss=loss, settings=SETTINGS)

    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    keys = draw_keys_for(batch.example_ids, SETTINGS.seed, 0)
    common = dict(
        mask_token_id=tokenizer.mask_token_id, budget=4, keys=keys, attention_mask=batch.attention_mask
    )
    with torch.no_grad():
        policy = elbo(tiny_gemma, batch.input_ids, batch.response_mask, **common).double()
        ref = elbo(reference, batch.input_ids, batch.response_mask, **common).double()
    p = len(pairs)
    chosen = 0.5 * (policy[:p] - ref[:p])
    rejected = 0.5 * (policy[p:] - ref[p:])
    assert report.reward_margin == pytest.approx(float((chosen - rejected).mean()), abs=1e-5)
    assert report.chosen_reward == pytest.approx(float(chosen.mean()), abs=1e-5)
    assert report.rejected_reward == pytest.approx(float(rejected.mean()), abs=1e-5)
    assert report.reward_accuracy == pytest.approx(float((chosen > rejected).double().mean()))
    expected_loss = float(-torch.nn.functional.logsigmoid(chosen - rejected).mean())
    assert report.loss == pytest.approx(expected_loss, abs=1e-5)
    assert report.reward_margin != 0.0


def test_score_std_error_matches_a_direct_computation(tiny_gemma, pairs, tokenizer):
    scores = score_pairs(tiny_gemma, pairs, **ids(tokenizer), settings=SETTINGS)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    keys = draw_keys_for(batch.example_ids, SETTINGS.seed, 0)
    draws = sample_draws(len(keys), batch.response_mask.sum(1), 4, keys=keys)
    with torch.no_grad():
        terms = elbo_terms(
            tiny_gemma, batch.input_ids, batch.response_mask, mask_token_id=tokenizer.mask_token_id,
            draws=draws, attention_mask=batch.attention_mask,
        ).double()  # fmt: skip
    for row, pair_index, side in [(0, 0, "chosen"), (4, 1, "rejected")]:
        f = terms[row].tolist()
        mean = sum(f) / 4
        se = math.sqrt(sum((x - mean) ** 2 for x in f) / 3) / 2  # sample sd / sqrt(n)
        record = scores.records()[pair_index]
        assert record[f"{side}_elbo"] == pytest.approx(mean, abs=1e-4)
        assert record[f"{side}_std_error"] == pytest.approx(se, rel=1e-4)


def test_budget_one_has_no_std_error(tiny_gemma, pairs, tokenizer):
    scores = score_pairs(tiny_gemma, pairs, **ids(tokenizer), settings=ScoreSettings(budget=1))
    assert scores.records()[0]["chosen_std_error"] is None


def test_compare_tuned_equal_to_base_gives_zero_difference(tiny_gemma_dir, pairs, tokenizer):
    base, tuned = load_model(tiny_gemma_dir), load_model(tiny_gemma_dir)
    comparison = compare_preference(base, tuned, pairs, **ids(tokenizer), settings=SETTINGS)
    for difference in (comparison.gap_difference, comparison.accuracy_difference, comparison.margin):
        assert difference.mean == 0.0
        assert difference.ci95_low <= 0.0 <= difference.ci95_high
    assert comparison.base_accuracy == comparison.tuned_accuracy


def test_paired_difference_interval_by_hand():
    d = PairedDifference.of(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    # mean 3, sample sd sqrt(14/3) = 2.160247, se 1.080123, half-width 1.959964·se = 2.117003
    assert d.mean == 3.0 and d.std_error == pytest.approx(1.080123, abs=1e-6)
    assert d.ci95_low == pytest.approx(0.882997, abs=1e-6) and d.ci95_high == pytest.approx(
        5.117003, abs=1e-6
    )
    assert PairedDifference.of(torch.tensor([2.0])).ci95_low is None
