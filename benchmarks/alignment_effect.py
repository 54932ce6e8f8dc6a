"""Does DPO with dsdpo make a masked diffusion LM better at a task, and do VRPO's variance reductions
matter? A miniature of LLaDA 1.5's experiment (issue 12), on the CPU.

1. Data: arithmetic word problems from templates ("Ann has 12 pens and gets 7 more. How many
   pens?"), or any question/answer task (--task: a JSONL of {"question", "answer"} rows as `dsdpo eval
   accuracy --data` reads them, or a reasoning-gym generator by name, judged by its own scorer), split
   into training and held-out problems with no shared question.
2. SFT from scratch: a small bidirectional transformer (dsdpo.models.tiny, character tokenizer) trained with
   `--loss sft` (LLaDA's masked-diffusion SFT objective) on prompt/completion rows, with held-out
   accuracy and a checkpoint every --sft-eval-every steps. DPO starts from the --sft-start-step
   checkpoint: one whose accuracy is well inside (0, 1), with room to improve.
   Every response is scored on the sampler's canvas (--pad-responses-to gen_length).
3. On-policy pairs: the SFT model samples --samples answers per problem at --temperature
   (dsdpo.evaluation.on_policy, as `dsdpo make-pairs --source model` does); a right and a wrong answer make a
   pair. Training problems give the DPO data, held-out problems the held-out pairs.
4. From the SFT model, at equal steps and seeds, DPO with RPO's NLL term (--sft-weight; 0: plain DPO)
   in three arms, and a control:
      (a) budget 1, reference on its own draws (--budget 1 --no-antithetic)
      (b) budget 8, VRPO: stratified draws shared by policy and reference (the default)
      (c) budget 8, stratified, reference on its own draws (--no-antithetic)
      (r) the control: SFT on the same pairs' chosen answers alone (rejection-sampling fine-tuning),
          which tells what the preference adds to training on the model's own right answers
5. Reported per arm and seed: held-out generation accuracy (greedy sampler) with its 95% Wilson
   interval, held-out reward accuracy (eval/rewards/accuracies at the last step, same draws at every
   evaluation), the standard error of B̂_θ − B̂_ref over draws (vrpo/diff_stderr, mean over steps) and
   the spread of the gradient: the variance over steps of the gradient norm (grad_norm) when the run
   logs it. Each arm is compared with the SFT model and with the control r (same seed), problem by
   problem: problems won and lost, exact McNemar p. Pooled rows add up the seeds' problems.

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/alignment_effect.py [--seeds 3] [--out runs/alignment]

Another task, e.g. reasoning-gym's chain_sum with one-digit numbers (answers must fit the sampler's
4 positions; the character tokenizer reads any printable ASCII):

    ... alignment_effect.py --task chain_sum --task-options '{"max_digits": 1, "max_terms": 3}'

(One --out per task: a rerun reuses the SFT run, the SFT model and the pairs it finds in OUT.)

With --eval-curve N each DPO run also logs held-out generation accuracy every N steps (--eval-problems).

--arms picks arms by letter (--arms b: a quick look). The numbers go to OUT/results-SETTINGS-*.json
and a markdown table on stdout (benchmarks/README.md records one).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal"]
ITEMS = ["pen", "cup", "box", "hat", "egg", "toy"]
ARMS = {
    "a: budget 1, independent": ["--budget", "1", "--no-antithetic"],
    "b: budget 8, VRPO": ["--budget", "8"],
    "c: budget 8, no antithetic": ["--budget", "8", "--no-antithetic"],
    # The control: as many steps of SFT on the same pairs' chosen (right) answers, no rejected side.
    "r: SFT on the chosen answers": ["--loss", "sft", "--budget", "8", "--sft-weight", "0"],
}
SAMPLER = dict(gen_length=4, block_length=4, steps=4, remasking="low_confidence", cfg_scale=0.0)


def word_problems(seed: int) -> list[dict]:
    """Every problem the templates make, shuffled: sums, differences and small products."""
    rows = []
    for a in range(1, 31):
        for b in range(1, 31):
            name, item = NAMES[(a + b) % len(NAMES)], ITEMS[(a * b) % len(ITEMS)]
            rows.append((f"{name} has {a} {item}s and gets {b} more. How many {item}s?", a + b))
            if a > b:
                rows.append((f"{name} has {a} {item}s and gives {b} away. How many are left?", a - b))
            if a <= 12 and b <= 12:
                rows.append((f"{name} buys {a} bags of {b} {item}s. How many {item}s?", a * b))
    random.Random(seed).shuffle(rows)
    return [{"question": question, "answer": answer} for question, answer in rows]


def task_problems(task: str | None, size: int, options: dict, out: Path) -> list:
    """The benchmark's problems (dsdpo.evaluation.answers.Problem), one per question, in the order they
    split in.

    No task: the word problems (already shuffled). A JSONL file or a reasoning-gym generator: through
    dsdpo's own loaders, shuffled; a question asked twice is kept once, so no question is both trained
    on and held out.
    """
    from dsdpo.evaluation.answers import load_problems_jsonl, load_reasoning_gym

    if task is None:
        return load_problems_jsonl(write_jsonl(word_problems(seed=0), out / "word_problems.jsonl"))
    if task.endswith(".jsonl"):
        problems = load_problems_jsonl(task)
    else:
        problems = load_reasoning_gym(task, size, seed=0, **options)
    problems = list({problem.question: problem for problem in problems}.values())
    random.Random(0).shuffle(problems)
    return problems


def check_fits(problems, tokenizer) -> None:
    """Every reference answer fits the sampler's canvas, and is a number (the training-time curve,
    --eval-problems, reads numbers only)."""
    from dsdpo.evaluation.answers import parse_number

    for problem in problems:
        if len(tokenizer(problem.reference, add_special_tokens=False)["input_ids"]) > SAMPLER["gen_length"]:
            sys.exit(
                f"--task: the answer {problem.reference!r} is longer than the sampler's "
                f"{SAMPLER['gen_length']} positions; choose a task with shorter answers"
            )
        if parse_number(problem.reference) is None:
            sys.exit(f"--task: the answer {problem.reference!r} is not a number")


def split_task(task: str | None, size: int, options: dict, heldout: int, out: Path) -> tuple[list, list]:
    """The task's first `heldout` problems held out, the rest for training."""
    from dsdpo.models.tiny import build_tokenizer

    problems = task_problems(task, size, options, out)
    check_fits(problems, build_tokenizer())
    if heldout >= len(problems):
        sys.exit(f"--heldout {heldout} leaves no training problems of the task's {len(problems)}")
    return problems[:heldout], problems[heldout:]


def write_jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ds_config(path: Path, *, lr: float, micro: int, accumulation: int) -> Path:
    config = copy.deepcopy(json.loads((REPO / "ds_configs" / "cpu.json").read_text()))
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation)
    config["optimizer"]["params"]["lr"] = lr
    config["scheduler"]["params"].update(warmup_max_lr=lr, warmup_min_lr=lr / 10, warmup_num_steps=10)
    path.write_text(json.dumps(config))
    return path


def train(args: list, log: Path) -> None:
    """python launch/train.py ARGS; its output goes to `log`; a failure stops the benchmark."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    with log.open("w") as sink:
        done = subprocess.run(
            [sys.executable, str(REPO / "launch" / "train.py"), *map(str, args)],
            stdout=sink,
            stderr=sink,
            env=env,
        )
    if done.returncode:
        sys.exit(f"training failed, see {log}:\n" + log.read_text()[-2000:])


def metrics(run: Path) -> dict[int, dict]:
    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def accuracy(model_dir: Path, problems, batch_size: int, out: Path):
    """Greedy held-out accuracy; and each problem's right (True) or wrong, from the records in `out`."""
    from dsdpo.evaluation.accuracy import evaluate_accuracy
    from dsdpo.models.loading import load_config, load_model, load_tokenizer, resolve_mask_token_id

    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    mask = resolve_mask_token_id(None, load_config(model_dir), tokenizer)
    report = evaluate_accuracy(
        model,
        tokenizer,
        problems,
        mask_token_id=mask,
        sampler={**SAMPLER, "temperature": 0.0},
        batch_size=batch_size,
        chat=False,
        out=out,
        progress=False,
    )
    return report, [json.loads(line)["correct"] for line in out.read_text().splitlines()]


def mcnemar_p(won: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: the discordant problems as a fair coin's Binomial(won + lost)."""
    n = won + lost
    tail = sum(math.comb(n, k) for k in range(min(won, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(right: list[bool], baseline: list[bool]) -> dict:
    """Against a baseline (the SFT model, the control r) on the same problems: problems won (right here,
    wrong there) and lost."""
    won = sum(a and not b for a, b in zip(right, baseline, strict=True))
    lost = sum(b and not a for a, b in zip(right, baseline, strict=True))
    return {"won": won, "lost": lost, "mcnemar_p": mcnemar_p(won, lost)}


def on_policy(model_dir: Path, problems, out: Path, *, samples: int, temperature: float, seed: int) -> dict:
    import torch

    from dsdpo.evaluation.on_policy import on_policy_pairs
    from dsdpo.models.loading import load_config, load_model, load_tokenizer, resolve_mask_token_id

    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    mask = resolve_mask_token_id(None, load_config(model_dir), tokenizer)
    sampler = {**SAMPLER, "temperature": temperature, "generator": torch.Generator().manual_seed(seed)}
    rows, counts = on_policy_pairs(
        model,
        tokenizer,
        problems,
        mask_token_id=mask,
        sampler=sampler,
        samples=samples,
        batch_size=64,
        chat=False,
        progress=False,
    )
    prefix = out.stem
    write_jsonl([{**row, "id": f"{prefix}-{row['id']}"} for row in rows], out)
    return counts


def export(run: Path, out: Path) -> Path:
    from dsdpo.runtime.export import export_checkpoint

    return export_checkpoint(run, out, dtype="fp32", max_shard_size="5GB")


def arm_row(name, seed, report, versus_sft, records, steps):
    last = records[steps]
    curve = {s: r["eval/accuracy"] for s, r in sorted(records.items()) if "eval/accuracy" in r}
    spread = [records[s][k] for s in range(1, steps + 1) for k in ["vrpo/diff_stderr"] if k in records[s]]
    norms = [records[s]["grad_norm"] for s in range(1, steps + 1) if "grad_norm" in records[s]]
    return {
        "arm": name,
        "seed": seed,
        "correct": report.correct,
        "n": report.n,
        "accuracy": report.accuracy,
        "ci95": [report.ci95_low, report.ci95_high],
        "vs_sft": versus_sft,
        "eval_reward_accuracy": last.get("eval/rewards/accuracies"),
        "eval_margin": last.get("eval/rewards/margins"),
        "diff_stderr": statistics.fmean(spread) if spread else None,
        "grad_norm_var": statistics.variance(norms) if len(norms) > 1 else None,
        **({"accuracy_curve": curve} if curve else {}),
    }


def table(rows) -> str:
    def fmt(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "| arm | seed | held-out accuracy [95% CI] | vs SFT: won/lost (McNemar p) "
        "| vs r: won/lost (McNemar p) | held-out reward acc | diff_stderr | grad-norm var |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def versus(row, key):
        won_lost = row.get(key)
        return f"+{won_lost['won']}/-{won_lost['lost']} (p={won_lost['mcnemar_p']:.3f})" if won_lost else "-"

    for row in rows:
        low, high = row["ci95"]
        ci = f"{row['accuracy']:.3f} [{low:.3f}, {high:.3f}] ({row['correct']}/{row['n']})"
        lines.append(
            f"| {row['arm']} | {row['seed']} | {ci} | {versus(row, 'vs_sft')} | {versus(row, 'vs_r')} | "
            f"{fmt(row.get('eval_reward_accuracy'))} | "
            f"{fmt(row.get('diff_stderr'), 4)} | {fmt(row.get('grad_norm_var'), 5)} |"
        )
    return "\n".join(lines)


def pooled(rows, name) -> dict:
    from dsdpo.evaluation.accuracy import wilson_interval

    mine = [row for row in rows if row["arm"] == name]
    correct, n = sum(r["correct"] for r in mine), sum(r["n"] for r in mine)
    values = {
        k: [r[k] for r in mine if r[k] is not None]
        for k in ("eval_reward_accuracy", "diff_stderr", "grad_norm_var")
    }

    def summed(key):
        if key not in mine[0]:
            return {}
        won, lost = (sum(r[key][k] for r in mine) for k in ("won", "lost"))
        return {key: {"won": won, "lost": lost, "mcnemar_p": mcnemar_p(won, lost)}}

    return {
        "arm": name,
        "seed": "pooled",
        "correct": correct,
        "n": n,
        "accuracy": correct / n,
        "ci95": list(wilson_interval(correct, n)),
        **summed("vs_sft"),
        **summed("vs_r"),
        **{k: statistics.fmean(v) if v else None for k, v in values.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/alignment_effect"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--arms", default="abcr", help="the arms to run, by letter (b: a quick look; r: the SFT control)"
    )
    p.add_argument(
        "--task",
        default=None,
        help='the problems: a .jsonl of {"question", "answer"} rows (as `dsdpo eval accuracy --data` reads '
        "them) or a reasoning-gym generator's name (e.g. chain_sum); default: the script's word problems",
    )
    p.add_argument(
        "--task-size", type=int, default=2000, help="problems a reasoning-gym task generates (before dedup)"
    )
    p.add_argument(
        "--task-options",
        type=json.loads,
        default={},
        help="the reasoning-gym generator's settings as JSON, e.g. '{\"max_digits\": 1}'",
    )
    p.add_argument("--heldout", type=int, default=300, help="held-out problems")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sft-epochs", type=int, default=120)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-eval-every", type=int, default=370, help="SFT steps between held-out accuracies")
    p.add_argument(
        "--sft-start-step",
        type=int,
        default=1480,
        help="the SFT checkpoint DPO starts from (a multiple of --sft-eval-every; 0: the last)",
    )
    p.add_argument(
        "--pair-problems", type=int, default=None, help="training problems sampled for pairs (default: all)"
    )
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--dpo-steps", type=int, default=60)
    p.add_argument("--dpo-lr", type=float, default=2e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dpo-batch", type=int, default=8, help="pairs per DPO step")
    p.add_argument("--sft-weight", type=float, default=1.0, help="RPO's NLL term on the chosen side (0: DPO)")
    p.add_argument(
        "--no-pad-responses",
        dest="pad_responses",
        action="store_false",
        help="score answers bare (answer + one EOS) instead of on the sampler's EOS-filled canvas of "
        "gen_length tokens (--pad-responses-to)",
    )
    p.add_argument(
        "--eval-curve",
        type=int,
        default=0,
        help="every this many DPO steps, held-out generation accuracy during training (--eval-problems, "
        "all held-out problems, greedy): the eval/accuracy curve in each run's metrics.jsonl; 0: off",
    )
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO))
    from dsdpo.models.tiny import init_tiny

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    held_out, training = split_task(args.task, args.task_size, args.task_options, args.heldout, out)
    held_out_rows = [{"question": problem.question, "answer": problem.reference} for problem in held_out]
    held_out_file = write_jsonl(
        held_out_rows, out / "held_out_problems.jsonl"
    )  # for training's --eval-problems
    args.pair_problems = min(args.pair_problems or len(training), len(training))
    pair_problems = training[: args.pair_problems]
    sft_rows = [
        {"id": f"sft-{i}", "prompt": problem.question, "completion": problem.reference}
        for i, problem in enumerate(training)
    ]
    sft_data = write_jsonl(sft_rows, out / "sft.jsonl")
    print(f"{len(training)} training problems, {len(held_out)} held out", flush=True)

    def accuracy_curve(every: int) -> list:
        """Training options: held-out greedy accuracy on every held-out problem every `every` steps."""
        sampler = [
            *("--eval-gen-length", SAMPLER["gen_length"], "--eval-block-length", SAMPLER["block_length"]),
            *("--eval-steps", SAMPLER["steps"]),
        ]
        return [
            *("--eval-problems", held_out_file, "--eval-num-problems", len(held_out)),
            *sampler,
            *("--eval-every", every, "--no-eval-chat"),  # as accuracy() below: chat=False
        ]

    # The answers' canvas as the sampler fills it: the answer, then EOS to gen_length.
    padding = ["--pad-responses-to", SAMPLER["gen_length"]] if args.pad_responses else []
    model = init_tiny(
        out / "init",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        intermediate_size=4 * args.hidden,
        seed=0,
    )
    sft_run = out / "sft"
    if not (sft_run / "latest").is_file():
        sft_config = ds_config(out / "sft_ds.json", lr=args.sft_lr, micro=32, accumulation=1)
        train(
            [
                "--ds_config",
                sft_config,
                "--model",
                model,
                "--data",
                sft_data,
                "--output",
                sft_run,
                "--loss",
                "sft",
                "--budget",
                "1",
                "--epochs",
                args.sft_epochs,
                "--max-length",
                "96",
                "--log-every",
                "10",
                *padding,
                # Held-out accuracy and a checkpoint every sft_eval_every steps: the SFT curve, and
                # the start of DPO can be any point on it (--sft-start-step).
                *accuracy_curve(args.sft_eval_every),
                *("--save-every", args.sft_eval_every, "--keep-last", 1000),
            ],
            out / "sft.log",
        )
    sft_model = out / "sft_model"
    if not (sft_model / "config.json").is_file():
        start = sft_run / f"step_{args.sft_start_step:06d}" if args.sft_start_step else sft_run
        export(start, sft_model)
    sft_curve = {s: r["eval/accuracy"] for s, r in sorted(metrics(sft_run).items()) if "eval/accuracy" in r}
    print(f"SFT held-out accuracy by step: {sft_curve}", flush=True)
    sft_report, sft_right = accuracy(sft_model, held_out, 100, out / "sft_model-held_out.jsonl")
    print(f"SFT: held-out {sft_report.summary()} ({time.time() - started:.0f} s)", flush=True)

    # Pairs of each sampling setting kept apart, so a rerun with other settings samples anew.
    pairs_tag = f"T{args.temperature:g}-K{args.samples}-N{args.pair_problems}"
    train_pairs, eval_pairs = out / f"dpo_pairs-{pairs_tag}.jsonl", out / f"held_out_pairs-{pairs_tag}.jsonl"
    if not train_pairs.is_file():
        on_policy_counts = (
            on_policy(
                sft_model,
                pair_problems,
                train_pairs,
                samples=args.samples,
                temperature=args.temperature,
                seed=1,
            ),
            on_policy(
                sft_model,
                held_out,
                eval_pairs,
                samples=args.samples,
                temperature=args.temperature,
                seed=2,
            ),
        )
        (out / f"pair_counts-{pairs_tag}.json").write_text(json.dumps(on_policy_counts))
    counts, eval_counts = json.loads((out / f"pair_counts-{pairs_tag}.json").read_text())
    print(f"on-policy pairs: {counts}; held-out: {eval_counts} ({time.time() - started:.0f} s)", flush=True)

    dpo_config = ds_config(
        out / f"dpo_ds-{args.dpo_lr:g}-{args.dpo_batch}.json",
        lr=args.dpo_lr,
        micro=args.dpo_batch,
        accumulation=1,
    )
    settings = f"{pairs_tag}-lr{args.dpo_lr:g}-beta{args.beta:g}-batch{args.dpo_batch}-sft{args.sft_weight:g}"
    settings += f"-steps{args.dpo_steps}" + ("" if args.pad_responses else "-bare")
    settings += f"-curve{args.eval_curve}" if args.eval_curve else ""
    rows, rights = [], {}  # rights: each (arm, seed)'s per-problem right or wrong
    for seed in range(args.seeds):
        for name, options in ARMS.items():
            if name[0] not in args.arms:
                continue
            run = out / f"dpo-{settings}-{name[0]}-seed{seed}"
            if not (run / "latest").is_file():
                train(
                    [
                        "--ds_config",
                        dpo_config,
                        "--model",
                        sft_model,
                        "--data",
                        train_pairs,
                        "--output",
                        run,
                        "--beta",
                        args.beta,
                        "--seed",
                        seed,
                        "--max-steps",
                        args.dpo_steps,
                        "--epochs",
                        "100",
                        "--sft-weight",
                        args.sft_weight,
                        "--eval-data",
                        eval_pairs,
                        "--max-length",
                        "96",
                        *padding,
                        *(accuracy_curve(args.eval_curve) if args.eval_curve else []),
                        *options,
                    ],
                    out / f"{run.name}.log",
                )
            report, right = accuracy(run, held_out, 100, out / f"{run.name}-held_out.jsonl")
            rows.append(arm_row(name, seed, report, paired(right, sft_right), metrics(run), args.dpo_steps))
            rights[name, seed] = right
            print(f"{name} seed {seed}: {report.summary()} ({time.time() - started:.0f} s)", flush=True)
            if "accuracy_curve" in rows[-1]:
                print(f"  eval/accuracy by step: {rows[-1]['accuracy_curve']}", flush=True)
    # What the preference adds to SFT on the chosen answers: each arm against r, problem by problem.
    control = next(name for name in ARMS if name[0] == "r")
    for row in rows:
        if (control, row["seed"]) in rights and row["arm"] != control:
            row["vs_r"] = paired(rights[row["arm"], row["seed"]], rights[control, row["seed"]])
    sft_row = {
        "arm": "SFT (start)",
        "seed": "-",
        "correct": sft_report.correct,
        "n": sft_report.n,
        "accuracy": sft_report.accuracy,
        "ci95": [sft_report.ci95_low, sft_report.ci95_high],
    }
    summary = [sft_row, *rows, *(pooled(rows, name) for name in ARMS if name[0] in args.arms)]
    (out / f"results-{settings}-seeds{args.seeds}-arms{args.arms}.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "pairs": counts,
                "held_out_pairs": eval_counts,
                "sft_accuracy_curve": sft_curve,
                "rows": summary,
                "seconds": time.time() - started,
            },
            indent=2,
        )
    )
    print(table(summary))
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
