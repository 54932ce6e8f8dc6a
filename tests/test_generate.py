from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsdpo.evaluation.sampler
from dsdpo.errors import DsdpoError
from dsdpo.evaluation.sampler import check_schedule, generate, reveal_plan
from dsdpo.evaluation.text_generation import cut_at_stop, generate_text
from dsdpo.families import family_of_model
from dsdpo.models.loading import load_model

MASK = 4  # the tiny tokenizer's [MASK]; the target models below only need it to differ from targets
VOCAB = 32
FAMILY_FIXTURES = Path(__file__).parent / "fixtures" / "families"


class TargetModel(nn.Module):
    """A denoiser that is certain of a fixed answer: at answer column k it favours target[k].

    Each column has its own margin, so the model is more confident at some columns than at others.
    """

    def __init__(self, target: list[int], answer_start: int, margins: list[float] | None = None):
        super().__init__()
        self.target = torch.tensor(target)
        self.answer_start = answer_start
        margins = margins or [50.0] * len(target)
        self.margins = nn.Parameter(torch.tensor(margins), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        rows, width = input_ids.shape
        logits = torch.zeros(rows, width, VOCAB)
        columns = torch.arange(self.answer_start, width)
        logits[:, columns, self.target] = self.margins
        return logits


class GuidanceModel(nn.Module):
    """Prefers a distractor token when it sees the prompt, but less so than when the prompt is masked:
    only classifier-free guidance (cond - uncond points to the target) finds the target."""

    def __init__(self, target: int, distractor: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.target, self.distractor = target, distractor

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        rows, width = input_ids.shape
        logits = torch.zeros(rows, width, VOCAB)
        prompt_seen = (input_ids[:, 0] != MASK)[:, None]
        logits[:, :, self.target] = torch.where(prompt_seen, 1.0, 0.0)
        logits[:, :, self.distractor] = torch.where(prompt_seen, 1.2, 1.5)
        return logits * self.scale


def test_reveal_plan_spreads_the_block_evenly_earliest_steps_first():
    assert reveal_plan(10, 4) == [3, 3, 2, 2]
    assert reveal_plan(8, 8) == [1] * 8
    assert sum(reveal_plan(37, 5)) == 37


@pytest.mark.parametrize(
    ("gen_length", "block_length", "steps", "message"),
    [
        (10, 4, 4, "not a multiple of block_length"),
        (8, 4, 3, "multiple of the number of blocks"),
        (8, 4, 16, "exceed block_length"),
        (0, 4, 4, "must be positive"),
    ],
)
def test_bad_schedules_are_clear_errors(gen_length, block_length, steps, message):
    with pytest.raises(DsdpoError, match=message):
        check_schedule(gen_length, block_length, steps)


def test_tiny_model_steps_follow_the_plan_block_by_block(tiny_gemma):
    prompts = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
    traces = []
    answers = generate(
        tiny_gemma, prompts, mask_token_id=MASK, gen_length=12, block_length=4, steps=6,
        temperature=1.0, generator=torch.Generator().manual_seed(0), on_step=traces.append,
    )  # fmt: skip
    assert answers.shape == (3, 12)
    assert not bool((answers == MASK).any())
    assert len(traces) == 6
    plan = reveal_plan(4, 2)
    for trace in traces:
        start = trace.answer_start
        for row, prompt in enumerate(prompts):
            assert trace.canvas[row, start - len(prompt) : start].tolist() == prompt
        block = slice(start + 4 * trace.block, start + 4 * (trace.block + 1))
        assert trace.revealed.sum(1).tolist() == [plan[trace.step]] * 3
        outside_block = torch.ones_like(trace.revealed)
        outside_block[:, block] = False
        assert not bool((trace.revealed & outside_block).any())
        masked = trace.canvas == MASK
        assert not bool(masked[:, start : block.start].any()), "earlier blocks are finished"
        assert bool(masked[:, block.stop :].all()), "later blocks are untouched"
    assert torch.equal(traces[-1].canvas[:, traces[-1].answer_start :], answers)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_a_certain_model_gets_exactly_its_answer(remasking, temperature, cfg_scale):
    target = [7, 8, 9, 10, 11, 12, 13, 14]
    model = TargetModel(target, answer_start=3, margins=[50.0 + k for k in range(8)])
    answers = generate(
        model, [[20, 21, 22], [23]], mask_token_id=MASK, gen_length=8, block_length=4, steps=4,
        temperature=temperature, remasking=remasking, cfg_scale=cfg_scale,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert answers.tolist() == [target, target]


def test_low_confidence_reveals_the_most_confident_tokens_first():
    margins = [1.0, 9.0, 3.0, 7.0, 5.0, 2.0]
    model = TargetModel([7, 8, 9, 10, 11, 12], answer_start=1, margins=margins)
    traces = []
    generate(model, [[20]], mask_token_id=MASK, gen_length=6, block_length=6, steps=6, on_step=traces.append)
    order = [int(trace.revealed[0].nonzero()) - 1 for trace in traces]
    assert order == sorted(range(6), key=lambda k: -margins[k])


def test_classifier_free_guidance_uses_the_prompt_masked_pass():
    model = GuidanceModel(target=7, distractor=8)
    common = dict(mask_token_id=MASK, gen_length=4, block_length=4, steps=2)
    assert generate(model, [[20, 21]], **common).tolist() == [[8] * 4]
    assert generate(model, [[20, 21]], cfg_scale=1.0, **common).tolist() == [[7] * 4]


@pytest.mark.parametrize("model_dir", ["tiny_gemma_dir", "tiny_bert_dir"])
def test_padding_is_never_attended(model_dir, request):
    model = load_model(request.getfixturevalue(model_dir)).eval()
    prompts = [[10, 11, 12, 13, 14, 15, 16], [20, 21], [30, 31, 32, 33]]
    common = dict(mask_token_id=MASK, gen_length=8, block_length=4, steps=4)
    together = generate(model, prompts, **common)
    for row, prompt in enumerate(prompts):
        assert together[row].tolist() == generate(model, [prompt], **common)[0].tolist()


def test_a_seeded_generator_reproduces_sampling(tiny_gemma):
    def sample(seed):
        return generate(
            tiny_gemma, [[10, 11, 12]], mask_token_id=MASK, gen_length=8, block_length=8, steps=4,
            temperature=1.0, remasking="random", generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    assert torch.equal(sample(3), sample(3))
    assert not all(torch.equal(sample(3), sample(seed)) for seed in range(4, 8))


def test_stop_tokens_end_generation_early_without_changing_the_text():
    eos = 3
    target = [7, 8, eos, 9, 10, 11, 12, 13]
    model = TargetModel(target, answer_start=1)
    common = dict(mask_token_id=MASK, gen_length=8, block_length=4, steps=8)
    full_steps, short_steps = [], []
    full = generate(model, [[20]], on_step=full_steps.append, **common)
    short = generate(model, [[20]], stop_token_ids=[eos], on_step=short_steps.append, **common)
    assert len(full_steps) == 8 and len(short_steps) == 4
    assert short.tolist() == [[7, 8, eos, 9, eos, eos, eos, eos]]  # filled after the stopped block
    assert cut_at_stop(full[0].tolist(), [eos]) == cut_at_stop(short[0].tolist(), [eos]) == [7, 8]


def test_generate_text_decodes_up_to_the_first_eos(tiny_gemma, tokenizer):
    texts = generate_text(
        tiny_gemma, tokenizer, ["What is 2+3?", "Hi"], mask_token_id=tokenizer.mask_token_id,
        gen_length=8, block_length=8, steps=8,
    )  # fmt: skip
    assert len(texts) == 2
    assert all("[MASK]" not in text and "[EOS]" not in text for text in texts)


def test_bad_sampler_settings_are_clear_errors(tiny_gemma):
    common = dict(mask_token_id=MASK, gen_length=4, block_length=4, steps=4)
    with pytest.raises(DsdpoError, match="unknown remasking 'top_k'"):
        generate(tiny_gemma, [[10]], remasking="top_k", **common)
    with pytest.raises(DsdpoError, match="temperature must be >= 0"):
        generate(tiny_gemma, [[10]], temperature=-1.0, **common)
    with pytest.raises(DsdpoError, match="no prompts"):
        generate(tiny_gemma, [], **common)


def llada_greedy(model, prompt, *, gen_length, block_length, steps, cfg_scale):
    """LLaDA's generate.py at temperature 0 with low-confidence remasking, written from the paper: full
    logits of one unpadded prompt, float64 softmax over the whole canvas, the mask token never proposed
    (dsdpo's rule), Dream's logits read one position to the left (its own sampler's shift)."""
    family = family_of_model(model)
    canvas = torch.tensor([[*prompt] + [MASK] * gen_length])
    blocks = gen_length // block_length
    for block in range(blocks):
        start = len(prompt) + block * block_length
        for count in reveal_plan(block_length, steps // blocks):
            if cfg_scale > 0:
                unconditional = canvas.clone()
                unconditional[0, : len(prompt)] = MASK
                cond, uncond = model(input_ids=torch.cat([canvas, unconditional])).logits.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(input_ids=canvas).logits
            if family.logit_shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            logits[..., MASK] = -torch.inf
            proposal = logits.argmax(-1)
            probability = F.softmax(logits.double(), -1).gather(-1, proposal[..., None])[..., 0]
            confidence = torch.full_like(probability, -torch.inf)
            in_block = slice(start, start + block_length)
            still_masked = canvas[:, in_block] == MASK
            confidence[:, in_block] = probability[:, in_block].masked_fill(~still_masked, -torch.inf)
            chosen = confidence[0].topk(count).indices
            canvas[0, chosen] = proposal[0, chosen]
    return canvas[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_greedy_answers_equal_full_logits_decoding(family, cfg_scale, monkeypatch):
    """The output layer on the block's still-masked positions, 3 at a time (padded batch), against
    full logits of each prompt alone."""
    monkeypatch.setattr(dsdpo.evaluation.sampler, "positions_per_slice", lambda vocab: 3)
    model = load_model(FAMILY_FIXTURES / family).eval()
    prompts = [[10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
    schedule = dict(gen_length=8, block_length=4, steps=4, cfg_scale=cfg_scale)
    with torch.no_grad():
        answers = generate(model, prompts, mask_token_id=MASK, **schedule)
        for row, prompt in enumerate(prompts):
            assert answers[row].tolist() == llada_greedy(model, prompt, **schedule)
