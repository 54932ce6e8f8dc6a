"""Cost and memory of the exact chunked preference step through real ZeRO-3 engines (issue 3).

A tiny Gemma denoiser (default hidden 256, 4 layers, FFN 1024) is wrapped in a ZeRO-3 policy engine
with CPU offload of parameters and optimizer (ds_configs/cpu.json, the CPU accelerator, gloo) and
a frozen ZeRO-3 reference engine, built as tests/ds_helpers.py builds them. One optimizer step is
one micro-batch of --pairs preference pairs (sequences of about --seq-len tokens) scored with a
budget of n draws: dsdpo.objective.gradient.preference_micro_step, then policy.step().

Modes, measured on the same engines, interleaved (mode A, B, C, A, B, C, ...) so that they share
the machine's load:

    unchunked   max_tokens_per_forward = max_tokens_no_grad = ∞: every row in one forward (the
                single-pass path: reference forward, policy forward, policy backward)
    chunked     max_tokens_per_forward = --rows-per-chunk rows (forces the two-pass path);
                pass 1 (no grad, policy and reference) in one forward each
    chunked-ng  like chunked, but pass 1 is also chunked to --rows-per-chunk rows
    per-draw    the per-draw objective (loss.objective "per_draw"): chunks of whole (pair, draw)
                units of about --rows-per-chunk rows, one pass with grad, no policy pass 1

Columns: s/step is the median wall time of --steps optimizer steps (after one warm-up step);
"÷ unch" divides by the unchunked step at the same n (the issue's target: chunked ≤ 1.4×).
sweeps is MicroStep.sweeps: forward and backward calls of both engines, each of which streams every
parameter under offload. peak MiB is the peak of live tensor bytes allocated during the step above
what was live when it started: the CPU allocator's allocation and free events recorded by
torch.profiler(profile_memory=True) in a separate, untimed step, summed in time order, from the
start of preference_micro_step to its end (the optimizer step, the same in every mode, is left
out). It counts every tensor allocated in the forwards and backwards (activations, gradients,
ZeRO's gathered parameters and buffers), not RSS, so the part that grows with n is the
activations (target: flat in n for the chunked modes).

With --breakdown, one more untimed step per mode and n records where the time goes: the reference
forwards, the policy's pass-1 no-grad forwards, the policy's forwards with grad, its backwards and
the optimizer step (wall time of each engine call, summed).

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/chunked_step.py [--budgets 1 2 4 8 16] [--breakdown]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import string
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dsdpo.config import ModelConfig
from dsdpo.models.loading import load_tokenizer
from dsdpo.models.tiny import init_tiny
from dsdpo.objective.draws import DrawKey, sample_draws
from dsdpo.objective.elbo import ScoringBatch
from dsdpo.objective.gradient import preference_micro_step
from dsdpo.objective.losses import LossConfig
from dsdpo.reference.interface import as_reference
from dsdpo.runtime.ds_config import resolve_ds_config
from dsdpo.runtime.engine import build_engines, init_distributed

CPU_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "cpu.json"
INFINITE = 1 << 40


def ds_config(pairs: int) -> dict:
    config = json.loads(CPU_CONFIG.read_text())
    config.update(train_micro_batch_size_per_gpu=pairs, gradient_accumulation_steps=1)
    config.pop("scheduler")
    return config


def pair_batch(tokenizer, pairs: int, seq_len: int, seed: int = 0):
    """P pairs of random text: a prompt of seq_len/4 characters, responses of about 3·seq_len/4."""
    rng = random.Random(seed)
    letters = string.ascii_letters + string.digits + " "

    def text(length):
        return "".join(rng.choice(letters) for _ in range(length))

    prompts = [text(seq_len // 4) for _ in range(pairs)]
    sequences, responses, keys = [], [], []
    for side in ("chosen", "rejected"):
        for i, prompt in enumerate(prompts):
            p, r = tokenizer(prompt).input_ids, tokenizer(text(seq_len - seq_len // 4 - i)).input_ids
            sequences.append(p + r)
            responses.append([0] * len(p) + [1] * len(r))
            keys.append(DrawKey(0, f"{i}:{side}"))
    width = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    response = torch.tensor([r + [0] * (width - len(r)) for r in responses]).bool()
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ScoringBatch.build(ids, response, attention), keys


def peak_bytes(prof) -> int:
    """Peak of the running sum of CPU allocations and frees recorded by the profiler."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


class Timer:
    """Wall time of every engine call during a step, by kind (installed only for --breakdown)."""

    def __init__(self, engines):
        self.engines = engines
        self.seconds = defaultdict(float)
        self.originals = {}

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            key = name
            if name == "policy forward":
                key += " (grad)" if torch.is_grad_enabled() else " (no grad)"
            self.seconds[key] += time.perf_counter() - start
            return out

        return timed

    def __enter__(self):
        targets = [
            (self.engines.reference, "forward", "reference forward"),
            (self.engines.policy, "forward", "policy forward"),
            (self.engines.policy, "backward", "policy backward"),
            (self.engines.policy, "step", "optimizer step"),
        ]
        for engine, attr, name in targets:
            # An engine's __call__ goes through nn.Module, which looks `forward` up on the instance.
            self.originals[engine, attr] = getattr(engine, attr)
            setattr(engine, attr, self._wrap(name, getattr(engine, attr)))
        return self

    def __exit__(self, *exc):
        for (engine, attr), _ in self.originals.items():
            delattr(engine, attr)


def one_step(engines, batch, draws, mask, grad_tokens, no_grad_tokens, loss_config, memory=False):
    """One optimizer step; with memory=True, the peak MiB allocated in the micro-step (not the step)."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if memory else None
    if prof is not None:
        prof.start()
    result = preference_micro_step(
        engines.policy,
        as_reference(engines.reference),
        batch,
        draws,
        mask_token_id=mask,
        loss_config=loss_config,
        max_tokens_per_forward=grad_tokens,
        max_tokens_no_grad=no_grad_tokens,
        loss_scale=1.0,
    )
    if prof is not None:
        prof.stop()  # memory of the forwards and backwards only: the optimizer step is the same for all
    engines.policy.step()
    if not result.finite:
        raise RuntimeError("non-finite loss: the step skipped its backward, timings would be wrong")
    return peak_bytes(prof) / 2**20 if prof is not None else result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch (= per step)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--rows-per-chunk", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and n (median)")
    parser.add_argument("--modes", nargs="+", default=["unchunked", "chunked", "chunked-ng", "per-draw"])
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled memory step")
    parser.add_argument("--breakdown", action="store_true", help="time each kind of engine call")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    folder = tempfile.mkdtemp(prefix="dsdpo-bench-")
    init_tiny(
        folder,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.ffn,
    )
    tokenizer = load_tokenizer(folder)
    init_distributed()
    config = resolve_ds_config(copy.deepcopy(ds_config(args.pairs)), world_size=1, total_steps=10_000)
    engines = build_engines(ModelConfig(path=folder), config)
    parameters = sum(p.ds_numel for p in engines.policy.module.parameters())
    batch, keys = pair_batch(tokenizer, args.pairs, args.seq_len)
    width = int(batch.sequence_ends.max())
    chunk = args.rows_per_chunk * width
    # mode -> (max tokens with grad, max tokens without, loss settings)
    sequence, per_draw = LossConfig(beta=0.1), LossConfig(beta=0.1, objective="per_draw")
    modes = {
        "unchunked": (INFINITE, INFINITE, sequence),
        "chunked": (chunk, INFINITE, sequence),
        "chunked-ng": (chunk, chunk, sequence),
        "per-draw": (chunk, INFINITE, per_draw),
    }
    modes = {m: modes[m] for m in args.modes}
    mask = tokenizer.mask_token_id
    print(
        f"gemma hidden {args.hidden}, {args.layers} layers, FFN {args.ffn}: {parameters / 1e6:.2f}M "
        f"parameters; ZeRO-3, CPU offload of parameters and optimizer; {args.pairs} pair(s) per step, "
        f"sequences {width} tokens; chunk = {args.rows_per_chunk} rows ({chunk} tokens); "
        f"{torch.get_num_threads()} threads"
    )

    rows = []
    breakdowns = []
    for n in args.budgets:
        draws = sample_draws(len(keys), batch.response_lengths, n, keys=keys)
        times, sweeps, peaks = defaultdict(list), {}, {}
        for tokens in modes.values():  # warm-up
            one_step(engines, batch, draws, mask, *tokens)
        for _ in range(args.steps):
            for name, tokens in modes.items():
                start = time.perf_counter()
                result = one_step(engines, batch, draws, mask, *tokens)
                times[name].append(time.perf_counter() - start)
                sweeps[name] = result.sweeps
        if not args.no_memory:
            for name, tokens in modes.items():
                peaks[name] = one_step(engines, batch, draws, mask, *tokens, memory=True)
        if args.breakdown:
            for name, tokens in modes.items():
                with Timer(engines) as timer:
                    start = time.perf_counter()
                    one_step(engines, batch, draws, mask, *tokens)
                    total = time.perf_counter() - start
                breakdowns.append((n, name, total, dict(timer.seconds)))
        base = statistics.median(times["unchunked"]) if "unchunked" in times else None
        for name in modes:
            seconds = statistics.median(times[name])
            rows.append((n, draws.num_rows, name, seconds, base, sweeps[name], peaks.get(name)))
        print(f"  n={n} done", flush=True)

    print("\n    n | rows | mode        |  s/step | ÷ unch | sweeps | peak MiB")
    for n, num_rows, name, seconds, base, sweep, peak in rows:
        ratio = f"{seconds / base:6.2f}" if base else "     -"
        peak_cell = f"{peak:8.1f}" if peak is not None else "       -"
        print(f"{n:5d} | {num_rows:4d} | {name:<11} | {seconds:7.3f} | {ratio} | {sweep:6d} | {peak_cell}")
    if breakdowns:
        kinds = [
            "reference forward",
            "policy forward (no grad)",
            "policy forward (grad)",
            "policy backward",
            "optimizer step",
        ]
        print("\nwhere the time goes (one untimed step each; seconds)")
        print("    n | mode        |  total | " + " | ".join(kinds) + " | other")
        for n, name, total, seconds in breakdowns:
            parts = [seconds.get(k, 0.0) for k in kinds]
            cells = " | ".join(f"{p:{len(k)}.3f}" for p, k in zip(parts, kinds, strict=True))
            print(f"{n:5d} | {name:<11} | {total:6.3f} | {cells} | {total - sum(parts):5.3f}")


if __name__ == "__main__":
    main()
