"""`dsdpo make-pairs --source model`: pairs of the model's own right and wrong answers."""

import json

import torch

from dsdpo.evaluation.answers import Problem, extract_answer, numbers_match
from dsdpo.evaluation.on_policy import on_policy_pairs
from dsdpo.evaluation.text_generation import generate_text
from tests.cli_helpers import assert_one_line_error, run

MASK = 4
SAMPLES, BATCH = 4, 6
QUESTIONS = [f"{a}+{b}=" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2)]]
SAMPLER = dict(
    gen_length=8, block_length=8, steps=8, temperature=1.0, remasking="low_confidence", cfg_scale=0.0
)


def _sampled_answers(model, tokenizer, questions=QUESTIONS):
    """The texts the sampler gives each question, batch by batch as on_policy_pairs batches them."""
    jobs = [question for question in questions for _ in range(SAMPLES)]
    generator = torch.Generator().manual_seed(7)
    texts = []
    for start in range(0, len(jobs), BATCH):
        batch = jobs[start : start + BATCH]
        texts += generate_text(
            model, tokenizer, batch, mask_token_id=MASK, chat=False, generator=generator, **SAMPLER
        )
    return [texts[i * SAMPLES : (i + 1) * SAMPLES] for i in range(len(questions))]


def test_a_problem_with_a_right_and_a_wrong_answer_gives_its_first_of_each(tiny_gemma, tokenizer):
    answers = _sampled_answers(tiny_gemma, tokenizer)
    # A random model answers with random digits: call a problem's first number its "reference", so
    # that some problems have right and wrong answers, some only wrong (no number at all) ones.
    problems, expected = [], []
    for question, texts in zip(QUESTIONS, answers, strict=True):
        numbers = [extract_answer(text) for text in texts]
        reference = next((n for n in numbers if n is not None), "-1")
        problems.append(Problem(question, reference, lambda e, r=reference: numbers_match(e, r)))
        right = [t for t, n in zip(texts, numbers, strict=True) if numbers_match(n, reference)]
        wrong = [
            t for t, n in zip(texts, numbers, strict=True) if not numbers_match(n, reference) and t.strip()
        ]
        expected.append((right[0], wrong[0]) if right and wrong else None)
    assert any(expected) and not all(expected), expected  # the case mix this test needs

    rows, counts = on_policy_pairs(
        tiny_gemma, tokenizer, problems, mask_token_id=MASK, samples=SAMPLES, batch_size=BATCH, chat=False,
        progress=False, sampler={**SAMPLER, "generator": torch.Generator().manual_seed(7)},
    )  # fmt: skip
    pairs = [pair for pair in expected if pair]
    assert [(row["chosen"], row["rejected"]) for row in rows] == pairs
    assert [row["prompt"] for row in rows] == [q for q, pair in zip(QUESTIONS, expected, strict=True) if pair]
    assert counts["pairs"] == len(pairs) and counts["samples"] == SAMPLES * len(QUESTIONS)
    no_pair = sum(counts.get(kind, 0) for kind in ("all_correct", "all_wrong", "no_usable_wrong"))
    assert counts["pairs"] + no_pair == len(QUESTIONS)


def test_make_pairs_from_a_model_writes_rows_and_refuses_bad_options(tiny_gemma_dir, tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": q, "answer": 3}) + "\n" for q in QUESTIONS))
    out = tmp_path / "pairs.jsonl"
    fast = ["--gen-length", "8", "--block-length", "8", "--steps", "8", "--samples", "2"]
    base = [
        "make-pairs",
        "--source",
        "model",
        "--model",
        tiny_gemma_dir,
        "--problems",
        problems,
        "--out",
        out,
    ]
    result = run(*base, *fast, "--temperature", "1.0")
    assert result.exit_code == 0, result.output
    assert f"from {len(QUESTIONS)} problems" in result.output and out.is_file()
    assert_one_line_error(run(*base, *fast), "copies of one answer: set --temperature > 0")
    assert_one_line_error(
        run("make-pairs", "--source", "model", "--out", out, "--model", tiny_gemma_dir),
        "needs --model DIR and --problems",
    )
    assert_one_line_error(
        run("make-pairs", "--source", "champ", "--out", out, "--model", tiny_gemma_dir),
        "are for --source model",
    )


def test_make_pairs_from_a_block_model_uses_its_block_sampler_and_the_pairs_train(tmp_path, monkeypatch):
    """SDAR (tests/fixtures/families/sdar: a tiny random checkpoint in the published layout, block 4):
    `make-pairs --source model` samples every answer with the block sampler (dsdpo.evaluation.block_sampler,
    watched, not replaced), writes the pairs the same samples give (each problem's reference set to the
    first number its samples say, so that some problems have a right and a wrong answer), and those
    pairs train: one optimizer step of the block-diffusion ELBO."""
    import dsdpo.evaluation.sampler
    from dsdpo.config import Config, DataConfig, ModelConfig, TrainConfig
    from dsdpo.models.loading import load_model, load_tokenizer
    from dsdpo.training.loop import train
    from tests.ds_helpers import cpu_ds_config
    from tests.test_families import published_folder

    folder = published_folder("sdar", tmp_path / "sdar")
    model, tokenizer = load_model(folder).eval(), load_tokenizer(folder)
    questions = QUESTIONS[:3]  # the block sampler runs one answer at a time
    answers = _sampled_answers(model, tokenizer, questions)
    references = [next((n for n in map(extract_answer, texts) if n is not None), "-1") for texts in answers]
    expected = []
    for texts, reference in zip(answers, references, strict=True):
        right = [t for t in texts if numbers_match(extract_answer(t), reference)]
        wrong = [t for t in texts if not numbers_match(extract_answer(t), reference) and t.strip()]
        expected += [(right[0], wrong[0])] if right and wrong else []
    assert expected, answers  # the case this test needs

    calls = []
    sampler = dsdpo.evaluation.sampler.block_generate
    monkeypatch.setattr(
        dsdpo.evaluation.sampler,
        "block_generate",
        lambda *a, **k: calls.append(k["block_length"]) or sampler(*a, **k),
    )
    problems, out = tmp_path / "problems.jsonl", tmp_path / "pairs.jsonl"
    lines = [json.dumps({"question": q, "answer": r}) for q, r in zip(questions, references, strict=True)]
    problems.write_text("\n".join(lines) + "\n")
    options = [
        "--gen-length",
        8,
        "--block-length",
        8,
        "--steps",
        8,
        "--temperature",
        1.0,
        "--seed",
        7,
        "--no-chat",
    ]
    result = run(
        "make-pairs", "--source", "model", "--model", folder, "--problems", problems, "--out", out,
        "--samples", SAMPLES, "--batch-size", BATCH, *options,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert calls == [4] * (SAMPLES * len(questions))  # one canvas a sample, in the model's blocks of 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["chosen"], row["rejected"]) for row in rows] == expected

    (tmp_path / "ds.json").write_text(json.dumps(cpu_ds_config()))  # one pair a step
    config = Config(
        model=ModelConfig(path=str(folder)),
        data=DataConfig(path=str(out)),
        train=TrainConfig(output=str(tmp_path / "run"), max_steps=1),
    )
    train(config, tmp_path / "ds.json")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("step") == 1 and "loss" in row for row in metrics), metrics
