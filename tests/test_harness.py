"""`dsdpo eval harness` and its lm_eval model (dsdpo.evaluation.harness) on local task YAMLs, offline.

Generation: the harness's answers are `dsdpo eval accuracy`'s, item by item, cut at the task's `until`
strings (sampled at temperature 1.5, so that the same seed, batches and prompts are needed to agree).
Multiple choice: each loglikelihood is dsdpo's own ELBO of prompt + continuation on the request's keyed
draws, and the same request gives the same number.
"""

import json
import math

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from dsdpo.data.tokenize import TokenizedPair
from dsdpo.errors import DsdpoError
from dsdpo.evaluation.harness import DsdpoLM, run_tasks, sampler_record
from dsdpo.objective.draws import DrawKey
from dsdpo.objective.elbo import elbo
from dsdpo.objective.scoring import ScoreSettings
from tests.cli_helpers import run

SAMPLER = ["--gen-length", "8", "--block-length", "4", "--steps", "4", "--temperature", "1.5"]
UNTIL = ["n", "k"]
PROBLEMS = [
    {"question": "2+3?", "answer": 5},
    {"question": "Half of 8?", "answer": 4},
    {"question": "What is 7 times 6?", "answer": 42},
]
CHOICES = [
    {"question": "The sky is", "choices": ["blue", "green", "made of cheese"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "label": 0},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def task_dir(tmp_path):
    """Two local tasks (JSON data, no hub): a generation task and a multiple-choice task."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    problems, choices = _jsonl(tmp_path / "problems.jsonl", PROBLEMS), _jsonl(tmp_path / "mc.jsonl", CHOICES)
    (tasks / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {problems}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\n"
        f"doc_to_target: '{{{{answer}}}}'\ngeneration_kwargs:\n  until: {json.dumps(UNTIL)}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "num_fewshot: 0\n"
    )
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {choices}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "num_fewshot: 0\n"
    )
    (tasks / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {choices}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{question}}'\nmetric_list:\n  - metric: word_perplexity\n"
    )
    return tasks


def test_harness_answers_are_eval_accuracys_cut_at_until(tiny_gemma_dir, task_dir, tmp_path):
    records, out = tmp_path / "accuracy.jsonl", tmp_path / "harness"
    common = ["--model", tiny_gemma_dir, *SAMPLER, "--batch-size", "2", "--no-progress"]
    accuracy = run(
        "eval", "accuracy", *common, "--data", task_dir.parent / "problems.jsonl", "--out", records
    )
    assert accuracy.exit_code == 0, accuracy.output
    harness = run(
        "eval", "harness", *common, "--tasks", "tiny_gen", "--include-path", task_dir, "--log-samples",
        "--out", out,
    )  # fmt: skip
    assert harness.exit_code == 0, harness.output
    generations = [json.loads(line)["generation"] for line in records.read_text().splitlines()]
    samples = sorted(
        (json.loads(line) for line in (out / "samples_tiny_gen.jsonl").read_text().splitlines()),
        key=lambda row: row["doc_id"],
    )
    answers = [row["resps"][0][0] for row in samples]
    cut = [min((text.split(stop)[0] for stop in UNTIL), key=len) for text in generations]
    assert answers == cut
    assert answers != generations  # `until` cut at least one answer short
    assert len(set(generations)) == len(PROBLEMS)  # the answers differ: a mixed-up prompt would show
    assert samples[0]["arguments"][0][0] == "<user>2+3?\n<assistant>"  # chat: the tokenizer's template
    settings = json.loads((out / "results.json").read_text())["dsdpo"]
    assert settings["sampler"] == {
        "gen_length": 8, "block_length": 4, "steps": 4, "temperature": 1.5, "remasking": "low_confidence",
        "cfg_scale": 0.0,
    }  # fmt: skip
    assert (settings["chat"], settings["seed"], settings["batch_size"]) == (True, 0, 2)


def _lm(model, tokenizer, budget=4, seed=3):
    return DsdpoLM(
        model, tokenizer, mask_token_id=tokenizer.mask_token_id, chat=False, batch_size=2,
        score=ScoreSettings(budget=budget, seed=seed, batch_size=2), progress=False,
    )  # fmt: skip


def _own_elbo(model, tokenizer, context, continuation, *, budget, seed):
    """dsdpo's ELBO of one prompt + response, alone in its batch, keyed on its token ids."""
    prompt = tokenizer(context)["input_ids"]
    response = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + response])
    mask = torch.tensor([[False] * len(prompt) + [True] * len(response)])
    key = DrawKey(seed, TokenizedPair("", prompt, response, [], None).digest)
    return float(
        elbo(model, ids, mask, mask_token_id=tokenizer.mask_token_id, budget=budget, keys=[key]).detach()
    )


def test_multiple_choice_loglikelihoods_are_dsdpos_elbo(tiny_gemma, tokenizer, task_dir):
    lm = _lm(tiny_gemma, tokenizer)
    results = run_tasks(lm, ["tiny_mc"], include_path=str(task_dir), log_samples=True)
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    requests = [(row["arguments"], row["resps"]) for row in results["samples"]["tiny_mc"]]
    scored = [
        (args, resp[0])
        for doc_args, doc_resps in requests
        for args, resp in zip(doc_args, doc_resps, strict=True)
    ]
    assert len(scored) == sum(len(row["choices"]) for row in CHOICES)
    for (context, continuation), (loglikelihood, is_greedy) in scored:
        own = _own_elbo(tiny_gemma, tokenizer, context, continuation, budget=4, seed=3)
        assert loglikelihood == pytest.approx(own, rel=1e-5, abs=1e-5)
        assert math.isfinite(loglikelihood) and loglikelihood < 0 and is_greedy is False
    assert len({round(ll, 4) for _, (ll, _) in scored}) == len(scored)  # each continuation its own number


def _requests(pairs):
    return [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]


def test_the_same_request_gives_the_same_number(tiny_gemma, tokenizer):
    lm = _lm(tiny_gemma, tokenizer, budget=2)
    request = ("Two plus two is", " four")
    alone = lm.loglikelihood(_requests([request]))
    longer = ("A much longer context than the other one", " x")
    twice = lm.loglikelihood(_requests([longer, request, request]))  # batches of 2: rows 1 and 0
    assert alone[0] == twice[1] == twice[2]  # keyed on the request, not its place in the batch
    # A context's trailing space belongs to the continuation (lm_eval's convention): the same text.
    assert lm.loglikelihood(_requests([("Two plus two is ", "four")])) == alone
    other_seed = _lm(tiny_gemma, tokenizer, budget=2, seed=4).loglikelihood(_requests([request]))
    assert other_seed[0][0] != alone[0][0]  # the seed keys the draws too


def _greedy_by_hand(model, prompt, length, mask_id):
    """LLaDA's suffix_greedy_prediction: reveal one token a step, the most confident of all masked ones
    (never the mask token itself, as dsdpo's sampler)."""
    canvas = torch.tensor([prompt + [mask_id] * length])
    for _ in range(length):
        logits = model(input_ids=canvas).logits[0].double()
        logits[:, mask_id] = -torch.inf
        masked = (canvas[0] == mask_id).nonzero().flatten()
        confidence, tokens = logits[masked].softmax(-1).max(-1)
        best = int(confidence.argmax())
        canvas[0, masked[best]] = tokens[best]
    return canvas[0, len(prompt) :].tolist()


def test_is_greedy_says_whether_greedy_denoising_gives_the_continuation(tiny_gemma, tokenizer):
    lm = _lm(tiny_gemma, tokenizer, budget=1)
    lm.check_greedy = True
    with torch.no_grad():
        tokens = _greedy_by_hand(tiny_gemma, tokenizer("2+3?")["input_ids"], 3, tokenizer.mask_token_id)
    greedy = tokenizer.decode(tokens)
    assert tokenizer(greedy, add_special_tokens=False)["input_ids"] == tokens  # text round trip
    results = lm.loglikelihood(_requests([("2+3?", greedy), ("2+3?", greedy[1:] + greedy[0] + "!")]))
    assert [is_greedy for _, is_greedy in results] == [True, False]
    lm.check_greedy = False
    assert lm.loglikelihood(_requests([("2+3?", greedy)]))[0][1] is False


def test_loglikelihood_rolling_is_refused(tiny_gemma, tokenizer, tiny_gemma_dir, task_dir, tmp_path):
    lm = _lm(tiny_gemma, tokenizer)
    with pytest.raises(DsdpoError, match=r"loglikelihood_rolling .* not defined for a masked diffusion"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text",), 0)])
    result = run(
        "eval", "harness", "--model", tiny_gemma_dir, "--tasks", "tiny_ppl", "--include-path", task_dir,
        "--out", tmp_path / "ppl", "--no-progress",
    )  # fmt: skip
    # Refused before the model loads; the line above it is datasets' progress bar (stderr).
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: task(s) tiny_ppl: loglikelihood_rolling (perplexity tasks"), last


def test_lm_eval_builds_the_model_by_name(tiny_gemma_dir):
    """`lm_eval --model dsdpo --model_args pretrained=DIR,...` (after importing the module)."""
    args = f"pretrained={tiny_gemma_dir},gen_length=8,block_length=4,steps=2,budget=3,seed=5,chat=False"
    lm = get_model("dsdpo").create_from_arg_string(args, {"batch_size": 4, "device": "cpu"})
    assert isinstance(lm, DsdpoLM) and lm.chat is False and lm.batch_size == 4
    assert sampler_record(lm.sampler) == {
        "gen_length": 8, "block_length": 4, "steps": 2, "temperature": 0.0, "remasking": "low_confidence",
        "cfg_scale": 0.0,
    }  # fmt: skip
    assert (lm.score.budget, lm.score.seed) == (3, 5)
    with pytest.raises(DsdpoError, match="unknown dsdpo model_args gen_len"):
        DsdpoLM.from_folder(tiny_gemma_dir, gen_len=8)
    with pytest.raises(DsdpoError, match="batch_size 'auto': dsdpo takes a number"):
        DsdpoLM.from_folder(tiny_gemma_dir, batch_size="auto")
