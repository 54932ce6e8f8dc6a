"""VRPO variance and scoring cost of the Monte Carlo ELBO estimators (issue 2).

Part 1, variance. A tiny Gemma denoiser is the policy; the reference is a perturbed copy of it
(every weight multiplied by 1 + σ·N(0,1), σ = --perturb). For a small fixed set of preference pairs
and a budget n, one estimate of the DPO logit of a pair is

    h = (B̂θ(yw) − B̂ref(yw)) − (B̂θ(yl) − B̂ref(yl))

with B̂ the mean of n keyed draws. The estimate is repeated --repeats times with different draw
seeds; the table reports the standard deviation of h across repeats (averaged over the pairs) for
four settings:

    anti    the reference scores the same (mask count / timestep, mask) draws as the policy
            (antithetic: same DrawKey seed)
    indep   the reference draws with a different seed (no shared noise)
    strat   draw k takes its mask count / timestep from the k-th of n strata (VRPO)
    plain   every draw takes it from the whole range

One table per estimator (l_over_L and one_over_t). The "÷ indep,plain" columns divide each
setting's std by the std of the indep,plain setting at the same n: below 1 is a variance reduction.
"mean h" (anti,strat) against "exact h" (enumeration of every mask set, when responses are short
enough) checks that nothing is biased. Reading: std should fall like 1/sqrt(n) down a column, and
antithetic should sit well below independent because the policy and the reference are close.

Part 2, cost. Per-draw terms of all 2P responses for budget n, computed (a) by elbo_terms with
every row of every draw in one forward call (within --max-tokens) and (b) by the naive loop of the
open implementations: one forward per draw (that draw's row of every response). Calls and median
seconds per estimate over --timing-repeats interleaved runs; "loop ÷ batched" is the speed-up.
Both give the same terms (checked).

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/vrpo_variance.py [--repeats 40] [--hidden 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from dsdpo.models.loading import load_model, load_tokenizer
from dsdpo.models.tiny import init_tiny
from dsdpo.objective.draws import DrawKey, sample_draws
from dsdpo.objective.elbo import ScoringBatch, draw_terms, elbo_terms, exact_elbo, forward_rows
from dsdpo.objective.logprobs import MaskedTokenScorer

PAIRS = [
    ("What is 2+3? ", "It is 5.", "It is 6!"),
    ("Name a colour. ", "Blue, sky", "A dog"),
    ("7 - 4 = ", "3 exactly", "11"),
    ("Say hi: ", "hi there", "bye now!"),
]
SETTINGS = [("anti", True), ("anti", False), ("indep", True), ("indep", False)]


def pair_batch(tokenizer, pairs):
    """Rows 0..P-1 prompt+chosen, P..2P-1 prompt+rejected (right padded), and their ids."""
    sequences, responses, ids = [], [], []
    for side, column in (("chosen", 1), ("rejected", 2)):
        for i, pair in enumerate(pairs):
            prompt, response = tokenizer(pair[0]).input_ids, tokenizer(pair[column]).input_ids
            sequences.append(prompt + response)
            responses.append([0] * len(prompt) + [1] * len(response))
            ids.append(f"{i}:{side}")
    width = max(map(len, sequences))
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    response = torch.tensor([r + [0] * (width - len(r)) for r in responses]).bool()
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ScoringBatch.build(input_ids, response, attention), ids


def perturbed_copy(model, sigma: float, seed: int):
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in reference.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.mul_(1 + sigma * noise)
    return reference


def logit_h(scores: torch.Tensor, pairs: int) -> torch.Tensor:
    return scores[:pairs] - scores[pairs:]


def terms(model, batch, draws, mask, max_tokens):
    return elbo_terms(
        model,
        batch.input_ids,
        batch.response_mask,
        attention_mask=batch.attention_mask,
        mask_token_id=mask,
        draws=draws,
        max_tokens_per_forward=max_tokens,
    )


@torch.no_grad()
def variance_table(policy, reference, batch, ids, mask, args, estimator, exact_h):
    pairs = len(ids) // 2
    lengths = batch.response_lengths
    rows = []
    for n in args.budgets:
        h = {setting: [] for setting in SETTINGS}
        for stratified in (True, False):
            for r in range(args.repeats):
                keys = [DrawKey(r, i) for i in ids]
                indep_keys = [DrawKey(10_000 + r, i) for i in ids]
                draws = sample_draws(len(ids), lengths, n, estimator, keys=keys, stratified=stratified)
                indep = sample_draws(len(ids), lengths, n, estimator, keys=indep_keys, stratified=stratified)
                policy_scores = terms(policy, batch, draws, mask, args.max_tokens).mean(1)
                anti_ref = terms(reference, batch, draws, mask, args.max_tokens).mean(1)
                indep_ref = terms(reference, batch, indep, mask, args.max_tokens).mean(1)
                h["anti", stratified].append(logit_h(policy_scores - anti_ref, pairs))
                h["indep", stratified].append(logit_h(policy_scores - indep_ref, pairs))
        std = {s: float(torch.stack(v).std(0).mean()) for s, v in h.items()}
        mean = float(torch.stack(h["anti", True]).mean(0).mean())
        rows.append((n, std, mean))
    title = f"estimator {estimator}: std of h across {args.repeats} seeds (mean over {pairs} pairs)"
    head = ["n"] + [f"{a},{'strat' if s else 'plain'}" for a, s in SETTINGS]
    head += [f"÷ {a},{'strat' if s else 'plain'}" for a, s in SETTINGS[:3]] + ["mean h", "exact h"]
    print(f"\n{title}", flush=True)
    print(" | ".join(f"{c:>13}" for c in head), flush=True)
    for n, std, mean in rows:
        base = std["indep", False]
        cells = [f"{n:>13d}"] + [f"{std[s]:>13.4f}" for s in SETTINGS]
        cells += [f"{std[s] / base:>13.3f}" for s in SETTINGS[:3]]
        cells += [f"{mean:>13.4f}", f"{exact_h:>13.4f}" if exact_h is not None else f"{'-':>13}"]
        print(" | ".join(cells), flush=True)


def count_calls(module):
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


@torch.no_grad()
def naive_loop_terms(scorer, batch, draws, mask):
    """The baseline: one forward call per draw index k (that draw's row of every response)."""
    sums = torch.zeros(draws.num_rows)
    for k in range(draws.budget):
        rows = (draws.draw == k).nonzero().flatten()
        sums[rows] = scorer(**forward_rows(batch, draws, rows, mask))
    return draw_terms(sums, draws)


@torch.no_grad()
def cost_table(policy, batch, ids, mask, args):
    scorer = MaskedTokenScorer(policy)
    calls, handle = count_calls(scorer)
    title = f"cost of one estimate of all {len(ids)} responses' terms (median of {args.timing_repeats})"
    print(f"\n{title}", flush=True)
    head = ["n", "rows", "batched calls", "loop calls", "batched s", "loop s", "loop ÷ batched"]
    print(" | ".join(f"{c:>14}" for c in head), flush=True)
    for n in args.budgets:
        draws = sample_draws(len(ids), batch.response_lengths, n, keys=[DrawKey(0, i) for i in ids])
        times = {"batched": [], "loop": []}
        counted = {}
        for _ in range(args.timing_repeats):  # interleaved: both see the same machine load
            for name in ("batched", "loop"):
                calls[0] = 0
                start = time.perf_counter()
                if name == "batched":
                    out = terms(scorer, batch, draws, mask, args.max_tokens)
                else:
                    out_loop = naive_loop_terms(scorer, batch, draws, mask)
                times[name].append(time.perf_counter() - start)
                counted[name] = calls[0]
        torch.testing.assert_close(out, out_loop, atol=1e-3, rtol=1e-4)
        batched, loop = (statistics.median(times[k]) for k in ("batched", "loop"))
        cells = [n, draws.num_rows, counted["batched"], counted["loop"]]
        print(
            " | ".join(f"{c:>14d}" for c in cells)
            + f" | {batched:>14.4f} | {loop:>14.4f} | {loop / batched:>14.2f}"
        )
    handle.remove()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=40, help="independent estimates per setting")
    parser.add_argument("--timing-repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--perturb", type=float, default=0.05, help="σ of the reference's weight noise")
    parser.add_argument("--max-tokens", type=int, default=1 << 16, help="max_tokens_per_forward")
    parser.add_argument("--estimators", nargs="+", default=["l_over_L", "one_over_t"])
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        init_tiny(folder, hidden_size=args.hidden, num_layers=args.layers, intermediate_size=2 * args.hidden)
        policy = load_model(folder).eval()
        tokenizer = load_tokenizer(folder)
    reference = perturbed_copy(policy, args.perturb, seed=1)
    mask = tokenizer.mask_token_id
    batch, ids = pair_batch(tokenizer, PAIRS)
    print(
        f"tiny gemma hidden {args.hidden}, {args.layers} layers; {len(PAIRS)} pairs, response lengths "
        f"{batch.response_lengths.tolist()}; reference = policy × (1 + {args.perturb}·N(0,1))"
    )
    exact_h = None
    if int(batch.response_lengths.max()) <= 10:

        def exact(model):
            return exact_elbo(
                model,
                batch.input_ids,
                batch.response_mask,
                attention_mask=batch.attention_mask,
                mask_token_id=mask,
            )

        exact_h = float(logit_h(exact(policy) - exact(reference), len(PAIRS)).mean())
    for estimator in args.estimators:
        start = time.perf_counter()
        variance_table(policy, reference, batch, ids, mask, args, estimator, exact_h)
        print(f"({time.perf_counter() - start:.1f} s)", flush=True)
    if not args.skip_cost:
        cost_table(policy, batch, ids, mask, args)


if __name__ == "__main__":
    main()
