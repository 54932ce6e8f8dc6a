"""`--loss sft`: LLaDA's masked-diffusion SFT on prompt/completion rows, one chunked pass, exact."""

import json

import pytest
import torch

from dsdpo.data import load_preference_data
from dsdpo.errors import DsdpoError
from dsdpo.objective.draws import sample_draws
from dsdpo.objective.losses import LossConfig
from dsdpo.objective.sft import sft_micro_step
from tests.ds_helpers import MASK, PAIRS, cpu_ds_config, engines_for, full_weights, micro_step, pair_batch
from tests.run_helpers import REPO, metrics_by_step, run_train, tail, train_args

INDICES = [0, 1, 2, 3]


def _sft_step(model_dir, tokenizer, *, max_tokens, budget=4, per_response=False):
    """One SFT micro-step on the chosen sides of ds_helpers.PAIRS, keyed as the pair path keys them."""
    engines = engines_for(model_dir, cpu_ds_config(micro=len(INDICES)))
    before = full_weights(engines.policy)
    batch, keys = pair_batch(tokenizer, INDICES)
    P = len(INDICES)
    chosen = type(batch).build(batch.input_ids[:P], batch.response_mask[:P], batch.attention_mask[:P])
    draws = sample_draws(P, chosen.response_lengths, budget, "l_over_L", keys=keys[:P])
    result = sft_micro_step(
        engines.policy, chosen, draws, mask_token_id=MASK, max_tokens_per_forward=max_tokens, loss_scale=1.0,
        per_response=per_response,
    )  # fmt: skip
    engines.policy.step()
    return before, full_weights(engines.policy), result, draws


@pytest.fixture(scope="module")
def pair_path_sft(tiny_gemma_dir, tokenizer):
    """The `sft` loss through the (already tested) two-pass preference path: −B̂(y_w)/|y_w| per pair."""
    engines = engines_for(tiny_gemma_dir, cpu_ds_config(micro=len(INDICES)))
    result, _, _ = micro_step(engines, tokenizer, INDICES, budget=4, loss_config=LossConfig(type="sft"))
    engines.policy.step()
    return full_weights(engines.policy), result


@pytest.mark.parametrize("max_tokens", [1 << 20, 1])
def test_sft_step_equals_the_sft_loss_of_the_pair_path(tiny_gemma_dir, tokenizer, pair_path_sft, max_tokens):
    expected_weights, expected = pair_path_sft
    before, after, result, _ = _sft_step(tiny_gemma_dir, tokenizer, max_tokens=max_tokens)
    assert result.finite and result.metrics["loss"] == pytest.approx(expected.metrics["loss"], abs=1e-6)
    assert result.metrics["loss"] > 0.5  # a real NLL per token, not a zero that trivially matches
    # One pass: a forward and a backward per chunk (the pair path needs a first pass and a reference).
    assert result.sweeps == (2 if max_tokens > 1 else 2 * 4 * len(INDICES))
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3
    for name in after:
        assert torch.allclose(after[name], expected_weights[name], atol=1e-6, rtol=0), name


@torch.no_grad()
def _elbos_by_hand(model, tokenizer, draws) -> tuple[list[float], list[int]]:
    """LLaDA's l/L estimate worked out directly: for each draw of completion p, the prompt and the
    completion with the draw's positions masked, one plain forward of the model (unpadded, so no
    attention mask), Σ log softmax at the masked positions × L/l; B̂_p the mean over the draws."""
    elbos, lengths = [], []
    for p, i in enumerate(INDICES):
        prompt, completion = tokenizer(PAIRS[i][0]).input_ids, tokenizer(PAIRS[i][1]).input_ids
        length, total = len(completion), 0.0
        for row in (draws.example == p).nonzero(as_tuple=True)[0].tolist():
            masked = [j for j in range(length) if draws.masked[row, j]]
            ids = torch.tensor(prompt + [MASK if j in masked else t for j, t in enumerate(completion)])
            logprobs = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            total += (
                length / len(masked) * sum(float(logprobs[len(prompt) + j, completion[j]]) for j in masked)
            )
        elbos.append(total / draws.budget)
        lengths.append(length)
    return elbos, lengths


@pytest.mark.parametrize("per_response", [False, True])
def test_sft_loss_is_the_formula_worked_by_hand(tiny_gemma_dir, tiny_gemma, tokenizer, per_response):
    """TRL's −Σ B̂ / Σ|y| of the micro-batch, or LLaDA's mean over completions of −B̂/|y| (its SFT
    normalisation, `--sft-per-response`), against ELBOs computed here without dsdpo's scorer."""
    _, _, result, draws = _sft_step(tiny_gemma_dir, tokenizer, max_tokens=1, per_response=per_response)
    elbos, lengths = _elbos_by_hand(tiny_gemma, tokenizer, draws)
    if per_response:
        expected = sum(-b / n for b, n in zip(elbos, lengths, strict=True)) / len(elbos)
    else:
        expected = -sum(elbos) / sum(lengths)
    assert len(set(lengths)) > 1  # mixed lengths: the two normalisations differ
    assert result.metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_completion_rows_and_the_chosen_side_of_pairs_load_for_sft(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
        },
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples, _ = load_preference_data(path, completions=True)
    assert [e.chosen for e in examples[:2]] == ["2", "4"] and all(e.rejected is None for e in examples)
    path.write_text(json.dumps({"prompt": "p", "answer": "x"}) + "\n")
    with pytest.raises(DsdpoError, match=r'sft\.jsonl:1: field "completion" \(or "chosen"\) is missing'):
        load_preference_data(path, completions=True)


def test_sft_run_on_completions_lowers_the_held_in_nll(tiny_gemma_dir, tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(10)]
    data, held_out = tmp_path / "sft.jsonl", tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows[:8]))
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows[8:]))
    config = REPO / "ds_configs" / "cpu.json"
    args = train_args(
        config, tiny_gemma_dir, data, tmp_path / "run", loss="sft", epochs=6, budget=4, eval_data=held_out
    )
    result = run_train(args)
    assert result.returncode == 0, tail(result)
    metrics = metrics_by_step(tmp_path / "run")
    first, last = metrics[1]["loss"], metrics[max(metrics)]["loss"]
    assert last < 0.8 * first, (first, last)  # measured: 4.75 -> 3.49 nats per token
    assert metrics[max(metrics)]["eval/loss"] < metrics[0]["eval/loss"]  # held-out NLL per token


def test_completions_are_padded_with_eos_to_the_longest_of_the_data_within_max_length():
    """Issue 20: padded to the longest of a micro-batch, a long prompt's row grew past --max-length."""
    from dsdpo.data.tokenize import TokenizedPair
    from dsdpo.objective.sft import pad_completions_with_eos

    pairs = [
        TokenizedPair("a", [1], [7, 2], [], None),
        TokenizedPair("b", [1, 1], [7, 7, 7, 2], [], None),
        TokenizedPair("c", [1, 1, 1, 1], [7, 2], [], None),
    ]
    padded = pad_completions_with_eos(pairs, eos_token_id=2, max_length=6)
    assert [p.chosen_ids for p in padded] == [[7, 2, 2, 2], [7, 7, 7, 2], [7, 2]]  # c: 4 + 2 = 6 tokens
    assert [p.prompt_ids for p in padded] == [[1], [1, 1], [1, 1, 1, 1]]
    assert pad_completions_with_eos(pairs, eos_token_id=None, max_length=6) == pairs


def test_sft_loss_does_not_depend_on_the_micro_batching(tiny_gemma_dir, tmp_path):
    """Two micro-batches of 1 or one of 2 make the same step: each completion's EOS canvas is set by
    the data, not by the completion it is batched with."""
    from dsdpo.training.loop import train
    from tests.tiny_runs import constant_lr_ds_config, tiny_run_config

    rows = [{"id": f"r{i}", "prompt": f"{i}+1=", "completion": "1" * (1 + 2 * i)} for i in range(4)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    losses = []
    for micro in (1, 2):
        ds_config = constant_lr_ds_config(tmp_path, f"ds{micro}.json", micro=micro, accumulation=2 // micro)
        loss = LossConfig(type="sft", sft_per_response=True)
        config = tiny_run_config(tiny_gemma_dir, data, tmp_path / f"run{micro}", loss=loss, max_steps=2)
        train(config, ds_config)
        losses.append([metrics_by_step(tmp_path / f"run{micro}")[step]["loss"] for step in (1, 2)])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
