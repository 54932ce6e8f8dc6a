"""Peak resident memory of `dsdpo score` and `dsdpo eval accuracy` with LLaDA-8B's output layer (issue 22).

A LLaDA-format model with LLaDA-8B's vocabulary (126464 words) and a tiny trunk (d_model 64, 2
layers) is written to a temporary folder with a character tokenizer padded to that vocabulary, then
each command runs as its own process under `/usr/bin/time -v`, whose "Maximum resident set size" is
the peak (the kernel's count, nothing measured from inside):

    score      8 pairs, responses of ~1000 tokens, --budget 8 --max-tokens-per-forward 16384
    accuracy   8 prompts, --gen-length 512 --block-length 512 --steps 16 (one batch of 8), greedy
               and at temperature 1

With the output layer on all masked positions at once these peaked at 8.5 and 10.3 GiB (issue 22,
measured on main): [positions, V] logits and, in the sampler, float64 copies of the whole block.

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/output_layer_memory.py
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dsdpo.families.llada import LLaDAConfig, LLaDAModelLM
from dsdpo.models.tiny import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 126464  # LLaDA-8B's


def write_model(folder: Path) -> Path:
    """LLaDA-8B's published config with a tiny trunk, random weights, and a tokenizer of its vocabulary."""
    tokenizer = build_tokenizer(vocab_size=VOCAB)
    published = json.loads((REPO / "tests/fixtures/planner/llada-8b.json").read_text())
    published.pop("model_type")
    published.update(
        d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=256, max_sequence_length=4096,
        mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LLaDAModelLM(LLaDAConfig(**published)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(folder: Path, response_length: int) -> tuple[Path, Path]:
    words = "the quick brown fox jumps over the lazy dog "
    text = (words * (response_length // len(words) + 1))[:response_length]
    pairs = folder / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"id": str(i), "prompt": f"Q{i}: ", "chosen": text, "rejected": text[::-1]}) + "\n"
            for i in range(8)
        )
    )
    problems = folder / "problems.jsonl"
    problems.write_text(
        "".join(json.dumps({"question": f"{i}+{i}=", "answer": 2 * i}) + "\n" for i in range(8))
    )
    return pairs, problems


def peak_rss_gib(args: list[str]) -> float:
    """Run `python -m dsdpo ARGS` under /usr/bin/time -v; its maximum resident set size in GiB."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "dsdpo", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"dsdpo {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--response-length", type=int, default=1000)
    parser.add_argument("--gen-length", type=int, default=512)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="output-layer-") as tmp:
        folder = Path(tmp)
        model = write_model(folder / "model")
        pairs, problems = write_data(folder, options.response_length)
        common = ["--model", model, "--no-progress"]
        runs = {
            "dsdpo score": [
                "score", *common, "--data", pairs, "--out", folder / "scores.jsonl", "--budget", "8",
                "--max-length", options.response_length + 64, "--max-tokens-per-forward", "16384",
            ],
            "dsdpo eval accuracy": [
                "eval", "accuracy", *common, "--data", problems, "--gen-length", options.gen_length,
                "--block-length", options.gen_length, "--steps", "16", "--batch-size", "8",
            ],
        }  # fmt: skip
        # Sampling adds the float64 Gumbel noise of a slice.
        runs["dsdpo eval accuracy, T=1"] = [*runs["dsdpo eval accuracy"], "--temperature", "1"]
        print(f"LLaDA format, vocabulary {VOCAB}, d_model 64, 2 layers")
        print(f"{'command':<26} | {'peak RSS GiB':>12}")
        for name, args in runs.items():
            print(f"{name:<26} | {peak_rss_gib(args):>12.2f}", flush=True)


if __name__ == "__main__":
    main()
