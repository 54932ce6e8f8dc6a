"""Out-of-memory recovery (dsdpo/training/out_of_memory.py) and --max-tokens-per-forward auto
(dsdpo/planner/chunking.py), through real ZeRO-3 engines on the CPU: a real torch.OutOfMemoryError is
raised from a chunk-level hook (the CUDA allocator's own error cannot happen here), the step is redone
with halved chunks, and its gradient equals the unchunked step's."""

import pytest
import torch

from dsdpo.config import ScoreConfig
from dsdpo.errors import DsdpoError
from dsdpo.objective.chunks import plan_chunks
from dsdpo.objective.draws import sample_draws
from dsdpo.objective.gradient import preference_micro_step
from dsdpo.objective.losses import LossConfig
from dsdpo.planner.activations import activation_bytes
from dsdpo.planner.chunking import auto_chunk_tokens, resolve_chunk_sizes
from dsdpo.planner.memory import RunShape
from dsdpo.reference.interface import as_reference
from dsdpo.training.out_of_memory import retry_on_out_of_memory
from tests.ds_helpers import MASK, cpu_ds_config, engines_for, full_weights, pair_batch

MICRO_BATCHES = [[0, 1], [2, 3]]
BUDGET = 4


def _step(engines, tokenizer, score):
    """The micro-batches of one step (forward and backward calls only), at the score's chunk sizes."""
    results = []
    for indices in MICRO_BATCHES:
        batch, keys = pair_batch(tokenizer, indices)
        draws = sample_draws(len(keys), batch.response_lengths, BUDGET, "l_over_L", keys=keys)
        results.append(
            preference_micro_step(
                engines.policy,
                as_reference(engines.reference),
                batch,
                draws,
                mask_token_id=MASK,
                loss_config=LossConfig(beta=0.5),
                max_tokens_per_forward=score.max_tokens_per_forward,
                max_tokens_no_grad=score.no_grad_tokens,
                loss_scale=1 / len(MICRO_BATCHES),
            )
        )
    return results


def _widest(tokenizer) -> int:
    return max(int(pair_batch(tokenizer, indices)[0].sequence_ends.max()) for indices in MICRO_BATCHES)


class OutOfMemoryAbove:
    """A forward hook on the last block: a chunk with gradients of more than `tokens` tokens (rows ×
    width) runs out of memory (after `after` chunks with gradients went through), as a CUDA allocator
    would."""

    def __init__(self, engine, tokens: int, after: int = 0, grad: bool = True):
        self.tokens, self.after, self.raised, self.grad = tokens, after, 0, grad
        blocks = engine.module.model.model.layers
        self.handle = blocks[-1].register_forward_hook(self)

    def __call__(self, module, args, output):
        hidden = args[0]
        if torch.is_grad_enabled() != self.grad:
            return
        if self.after:
            self.after -= 1
            return
        if hidden.shape[0] * hidden.shape[1] > self.tokens:
            self.raised += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {hidden.shape[0]} rows)")


def _one_step(model_dir, tokenizer, score, inject=None, on="policy"):
    engines = engines_for(model_dir, cpu_ds_config(micro=2, accumulation=2))
    hook = inject(getattr(engines, on)) if inject else None
    messages = []
    results, retries = retry_on_out_of_memory(
        lambda: _step(engines, tokenizer, score),
        score,
        widest_row=_widest(tokenizer),
        engines=(engines.policy, engines.reference),
        say=messages.append,
    )
    engines.policy.step()
    return full_weights(engines.policy), results, retries, messages, hook


def test_a_step_out_of_memory_in_a_chunk_is_redone_with_halved_chunks_and_the_same_gradient(
    tiny_gemma_dir, tokenizer
):
    width = _widest(tokenizer)
    whole, whole_results, _, _, _ = _one_step(
        tiny_gemma_dir, tokenizer, ScoreConfig(max_tokens_per_forward=1 << 20)
    )
    score = ScoreConfig(max_tokens_per_forward=4 * width, max_tokens_no_grad=16 * width)
    # Chunks of 4 rows or so: the first micro-batch (16 rows, two passes) goes through whole and its
    # gradient is accumulated; the second one's second chunk with gradients runs out of memory.
    batch, keys = pair_batch(tokenizer, MICRO_BATCHES[0])
    first = len(
        plan_chunks(batch, sample_draws(len(keys), batch.response_lengths, BUDGET, keys=keys), 4 * width)
    )
    weights, results, retries, messages, hook = _one_step(
        tiny_gemma_dir,
        tokenizer,
        score,
        inject=lambda engine: OutOfMemoryAbove(engine, tokens=2 * width, after=first + 1),
    )
    assert (hook.raised, retries) == (1, 1)
    assert (score.max_tokens_per_forward, score.max_tokens_no_grad) == (2 * width, 8 * width)
    assert "redone with --max-tokens-per-forward" in messages[0]
    assert results[0].sweeps > whole_results[0].sweeps  # it did run chunked, in two passes
    for a, b in zip(results, whole_results, strict=True):
        assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], abs=1e-6)
    for name in whole:
        assert torch.allclose(weights[name], whole[name], atol=1e-6, rtol=0), name


class OutOfMemoryInBackward:
    """A backward hook on the first block (the last one backward reaches): the backward of the
    chunk with gradients after `after` such backwards runs out of memory, once."""

    def __init__(self, engine, after: int):
        self.after, self.raised = after, 0
        engine.module.model.model.layers[0].register_full_backward_hook(self)

    def __call__(self, module, grad_input, grad_output):
        if self.after:
            self.after -= 1
        elif not self.raised:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected in a backward)")


def test_out_of_memory_in_a_backward_leaves_nothing_behind(tiny_gemma_dir, tokenizer):
    """Gradients half reduced when a backward stops (ZeRO-3's buckets) are thrown away too."""
    width = _widest(tokenizer)
    whole, *_ = _one_step(tiny_gemma_dir, tokenizer, ScoreConfig(max_tokens_per_forward=1 << 20))
    score = ScoreConfig(max_tokens_per_forward=4 * width, max_tokens_no_grad=16 * width)
    weights, _, retries, _, hook = _one_step(
        tiny_gemma_dir, tokenizer, score, inject=lambda engine: OutOfMemoryInBackward(engine, after=5)
    )
    assert (hook.raised, retries) == (1, 1)
    for name in whole:
        assert torch.allclose(weights[name], whole[name], atol=1e-6, rtol=0), name


def test_out_of_memory_in_the_reference_engine_is_redone_too(tiny_gemma_dir, tokenizer):
    width = _widest(tokenizer)
    whole, *_ = _one_step(tiny_gemma_dir, tokenizer, ScoreConfig(max_tokens_per_forward=1 << 20))
    score = ScoreConfig(max_tokens_per_forward=4 * width, max_tokens_no_grad=8 * width)
    weights, _, retries, _, hook = _one_step(
        tiny_gemma_dir,
        tokenizer,
        score,
        inject=lambda engine: OutOfMemoryAbove(engine, tokens=4 * width, after=3, grad=False),
        on="reference",
    )
    assert (hook.raised, retries) == (1, 1)
    for name in whole:
        assert torch.allclose(weights[name], whole[name], atol=1e-6, rtol=0), name


def test_a_row_that_does_not_fit_alone_stops_with_one_line(tiny_gemma_dir, tokenizer):
    width = _widest(tokenizer)
    score = ScoreConfig(max_tokens_per_forward=2 * width, max_tokens_no_grad=2 * width)
    with pytest.raises(DsdpoError, match=f"one row of {width} tokens per forward: a single row does not fit"):
        _one_step(tiny_gemma_dir, tokenizer, score, inject=lambda engine: OutOfMemoryAbove(engine, tokens=0))
    assert score.max_tokens_per_forward == width  # halved once, then nothing was left to halve


def test_auto_takes_the_largest_chunk_whose_activations_fit(tiny_gemma_dir):
    import json

    ds_config = cpu_ds_config()
    run = RunShape(max_length=64, budget=8, micro_batch=2)
    tokens, no_grad, room = auto_chunk_tokens(tiny_gemma_dir, ds_config, run, free_bytes=4e6)
    rows = tokens // 64
    from dsdpo.planner.shapes import model_shape

    shape = model_shape(tiny_gemma_dir)
    assert 1 <= rows < 32 and no_grad % 64 == 0
    assert activation_bytes(shape, rows * 64, rows * 32, 4, checkpointing=True) <= room
    assert activation_bytes(shape, (rows + 1) * 64, (rows + 1) * 32, 4, checkpointing=True) > room
    assert json.dumps(ds_config)  # untouched, still plain JSON


def test_auto_on_the_cpu_resolves_from_the_planner_and_says_so(tiny_gemma_dir):
    options = dict(
        model=str(tiny_gemma_dir), ds_config=cpu_ds_config(), max_length=64, budget=4, micro_batch=1,
        gradient_checkpointing=True, reference="engine", device=torch.device("cpu"),
    )  # fmt: skip
    score = ScoreConfig(max_tokens_per_forward="auto")
    note = resolve_chunk_sizes(score, **options)
    assert "auto" in note and "RAM (CPU accelerator)" in note
    assert isinstance(score.max_tokens_per_forward, int) and score.max_tokens_per_forward % 64 == 0
    unset = ScoreConfig(max_tokens_per_forward=None)
    assert resolve_chunk_sizes(unset, **options) is None and unset.max_tokens_per_forward == 4096
    given = ScoreConfig(max_tokens_per_forward=333)
    assert resolve_chunk_sizes(given, **options) is None and given.no_grad_tokens == 4 * 333


def _train(tmp_path, model_dir, name, monkeypatch, *, tokens, inject=None, steps=2):
    import dsdpo.training.loop
    from tests.tiny_runs import addition_data, constant_lr_ds_config, tiny_run_config

    if inject is not None:
        real = dsdpo.training.loop.build_engines

        def build_engines(*args, **kwargs):
            engines = real(*args, **kwargs)
            inject(engines.policy)
            return engines

        monkeypatch.setattr(dsdpo.training.loop, "build_engines", build_engines)
    ds_config = constant_lr_ds_config(tmp_path, micro=2, accumulation=1)
    config = tiny_run_config(
        model_dir, addition_data(tmp_path), tmp_path / name, score=dict(max_tokens_per_forward=tokens),
        loss=LossConfig(beta=0.5), max_steps=steps, save_every=1, keep_last=10,
    )  # fmt: skip
    dsdpo.training.loop.train(config, ds_config)
    return tmp_path / name


def test_the_training_loop_recovers_from_an_out_of_memory_chunk_exactly(
    tiny_gemma_dir, tmp_path, monkeypatch
):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tests.run_helpers import metrics_by_step

    halved = _train(tmp_path, tiny_gemma_dir, "halved", monkeypatch, tokens=32, steps=2)
    # Chunks of up to 64 tokens run out of memory (once: the retry's are at most 32).
    hooks = []
    run = _train(
        tmp_path,
        tiny_gemma_dir,
        "recovered",
        monkeypatch,
        tokens=64,
        inject=lambda engine: hooks.append(OutOfMemoryAbove(engine, tokens=32)),
    )
    assert hooks[0].raised == 1
    metrics = metrics_by_step(run)
    assert metrics[1]["oom_retries"] == 1.0 and "oom_retries" not in metrics[2]
    assert metrics[1]["sweeps"] == metrics_by_step(halved)[1]["sweeps"]
    assert {"cpu_memory_mb", "cpu_peak_memory_mb"} <= metrics[1].keys()
    assert metrics[1]["loss"] == pytest.approx(metrics_by_step(halved)[1]["loss"], abs=1e-6)
    for step in (1, 2):
        a = get_fp32_state_dict_from_zero_checkpoint(str(run), tag=f"step_{step:06d}")
        b = get_fp32_state_dict_from_zero_checkpoint(str(halved), tag=f"step_{step:06d}")
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), (step, name)


def test_training_with_auto_chunks_on_the_cpu_says_what_it_chose(
    tiny_gemma_dir, tmp_path, monkeypatch, capsys
):
    import yaml

    run = _train(tmp_path, tiny_gemma_dir, "auto", monkeypatch, tokens="auto", steps=1)
    assert "--max-tokens-per-forward auto:" in capsys.readouterr().out
    saved = yaml.safe_load((run / "train_config.yaml").read_text())["score"]
    assert isinstance(saved["max_tokens_per_forward"], int)  # the resolved number is recorded


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), ("512", 512), ("none", None)])
def test_max_tokens_per_forward_takes_a_number_auto_or_nothing(value, parsed):
    from dsdpo.config import apply_overrides, config_from_dict, parse_assignments

    data = apply_overrides({"model": {"path": "m"}, "data": {"path": "d.jsonl"}}, {})
    data = apply_overrides(data, parse_assignments([f"score.max_tokens_per_forward={value}"]))
    assert config_from_dict(data).validate().score.max_tokens_per_forward == parsed


def test_max_tokens_per_forward_refuses_other_words():
    with pytest.raises(DsdpoError, match=r'score\.max_tokens_per_forward: a positive number or "auto"'):
        ScoreConfig(max_tokens_per_forward="big").validate()
    with pytest.raises(DsdpoError, match="must be positive"):
        ScoreConfig(max_tokens_per_forward=0).validate()
