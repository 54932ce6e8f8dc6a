"""The block samplers (dsdpo/evaluation/block_sampler.py) against the published ones: the canvases SDAR's
generate.py's block_diffusion_generate returned on the tiny SDAR checkpoint (tests/fixtures/families/
build_sdar.py, sampler_runs), greedy (top_k 1) under each remasking rule, sampled from the same seeded
global RNG, and stopped after a block by a stop token; and the answers LLaDA 2.x's generate()
returned on the tiny LLaDA 2.x checkpoint (build_llada2.py), greedy (dllm's later argmax branch),
sampled, stopped by EOS, and at the published temperature 0."""

import json
from pathlib import Path

import pytest
import torch

from dsdpo.errors import DsdpoError
from dsdpo.evaluation.block_sampler import block_generate, transfer_counts
from dsdpo.evaluation.sampler import generate
from dsdpo.models.loading import load_model
from dsdpo.models.tiny import build_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "families" / "sdar"
RUNS = json.loads((FIXTURE / "expected.json").read_text())["sampler_runs"]
MASK = build_tokenizer().mask_token_id


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE).eval()


@pytest.mark.parametrize(
    "run", RUNS, ids=lambda run: f"{run['options']['remasking_strategy']}-seed{run['seed']}"
)
def test_canvas_equals_the_published_sampler(model, run):
    options = dict(run["options"])
    torch.manual_seed(run["seed"])  # the published sampler draws from the global RNG
    canvas = block_generate(
        model,
        run["prompt_ids"],
        mask_token_id=MASK,
        remasking=options.pop("remasking_strategy"),
        stop_token_ids=run["stops"] or (),
        **options,
    )
    assert canvas.tolist() == run["canvas"]


def test_transfer_counts_spread_the_block_over_the_steps():
    assert transfer_counts(4, 4) == [1, 1, 1, 1]
    assert transfer_counts(5, 2) == [3, 2]


def test_dsdpo_generate_runs_the_block_sampler_greedy_at_temperature_zero(model):
    """generate() (dsdpo generate, eval accuracy, make-pairs, evaluation during training) hands a block
    model to its own sampler: temperature 0 is top_k 1 with static low-confidence remasking."""
    run = RUNS[0]
    assert run["options"]["remasking_strategy"] == "low_confidence_static" and run["options"]["top_k"] == 1
    assert (run["options"]["gen_length"], run["options"]["denoising_steps"]) == (8, 4)
    prompt = run["prompt_ids"]
    answers = generate(model, [prompt, prompt[:2]], mask_token_id=MASK, gen_length=8, block_length=4, steps=8)
    assert answers[0].tolist() == run["canvas"][len(prompt) : len(prompt) + 8]
    alone = generate(model, [prompt[:2]], mask_token_id=MASK, gen_length=8, block_length=4, steps=8)
    assert torch.equal(answers[1], alone[0])  # rows of other prompt lengths decode as alone
    # Its own blocks whatever block_length says (held-out evaluation's default is the whole answer).
    whole = generate(model, [prompt], mask_token_id=MASK, gen_length=8, block_length=8, steps=8)
    assert torch.equal(whole[0], answers[0])
    with pytest.raises(DsdpoError, match="block size 4"):  # called directly, it names the mismatch
        block_generate(model, prompt, mask_token_id=MASK, block_length=8, gen_length=8, denoising_steps=4)


LLADA2 = Path(__file__).parent / "fixtures" / "families" / "llada2"
LLADA2_RUNS = json.loads((LLADA2 / "expected.json").read_text())["sampler_runs"]
# The run of the published temperature 0 (which samples) is test_llada2_published_temperature_zero_samples'.
AS_DSDPO_RUNS = [run for run in LLADA2_RUNS if run["greedy"] or run["options"]["temperature"] > 0]


@pytest.fixture(scope="module")
def llada2():
    return load_model(LLADA2).eval()


def llada2_answer(model, run, temperature: float) -> list[int]:
    """block_generate with LLaDA 2.x's published generate() options; its answer cut after the first
    EOS, as generate() returns it."""
    options, prompt = run["options"], run["prompt_ids"]
    torch.manual_seed(run["seed"])  # the published sampler draws from the global RNG
    canvas = block_generate(
        model, prompt, mask_token_id=options["mask_id"], block_length=options["block_length"],
        gen_length=options["gen_length"], denoising_steps=options["steps"], temperature=temperature,
        top_p=options.get("top_p", 1.0), remasking="low_confidence_dynamic",
        confidence_threshold=options.get("threshold", 0.95), minimal_topk=options.get("minimal_topk", 1),
        keep_at_most_masked=True, stop_token_ids=[options["eos_id"]] if "eos_id" in options else (),
    )  # fmt: skip
    answer = canvas[len(prompt) : len(prompt) + options["gen_length"]].tolist()
    return answer[: answer.index(options["eos_id"]) + 1] if options.get("eos_id") in answer else answer


@pytest.mark.parametrize(
    "run", AS_DSDPO_RUNS, ids=lambda run: f"{'greedy' if run['greedy'] else 'sampled'}-seed{run['seed']}"
)
def test_llada2_answer_equals_the_published_generate(llada2, run):
    """Greedy runs: the published generate() with dllm's later argmax branch at temperature 0, which is
    dsdpo's temperature 0. The others sample from the seeded global RNG, as published."""
    temperature = run["options"].get("temperature", 0.0)
    assert llada2_answer(llada2, run, temperature) == run["answer"]


def test_llada2_published_temperature_zero_samples():
    """The published bug: generate(temperature=0) draws as at temperature 1 (the run recorded with it
    equals dsdpo's temperature 1 under the same seed, and not its greedy answer)."""
    (run,) = [run for run in LLADA2_RUNS if run not in AS_DSDPO_RUNS]
    model = load_model(LLADA2).eval()
    assert llada2_answer(model, run, 1.0) == run["answer"]
    assert llada2_answer(model, run, 0.0) != run["answer"]


def test_dsdpo_generate_runs_llada2s_sampler_greedy_at_temperature_zero(llada2):
    """generate() (dsdpo generate, eval accuracy, make-pairs, evaluation during training) hands LLaDA
    2.x to its own sampler: its threshold rule (0.95), temperature 0 its argmax branch."""
    run = LLADA2_RUNS[0]
    assert run["greedy"] and run["options"] == {
        "gen_length": 8,
        "block_length": 4,
        "mask_id": MASK,
        "steps": 4,
    }
    prompt = run["prompt_ids"]
    answers = generate(
        llada2, [prompt, prompt[:2]], mask_token_id=MASK, gen_length=8, block_length=32, steps=8
    )
    assert answers[0].tolist() == run["answer"]
    alone = generate(llada2, [prompt[:2]], mask_token_id=MASK, gen_length=8, block_length=4, steps=8)
    assert torch.equal(answers[1], alone[0])


def test_dsdpo_generate_samples_llada2_under_its_published_threshold(llada2):
    """At temperature 0.25 some confidences fall between 0.85 and 0.95: generate() keeps them only as the
    published default threshold (0.95) does."""
    (run,) = [run for run in LLADA2_RUNS if run["options"].get("temperature") == 0.25]
    torch.manual_seed(run["seed"])
    answers = generate(
        llada2,
        [run["prompt_ids"]],
        mask_token_id=MASK,
        gen_length=8,
        block_length=4,
        steps=8,
        temperature=0.25,
    )
    assert answers[0].tolist() == run["answer"]
