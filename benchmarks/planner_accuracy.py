"""The planner's activation and model-state estimates against what a run measures (issue 14).

Three sizes of dsdpo's LLaDA (random weights, the published config with other widths), on the CPU:

activations: one chunk of --rows rows of --width tokens, the last --masked positions of each
    masked, scored by MaskedTokenScorer with a backward (with and without gradient checkpointing)
    and without gradients. Measured: the peak of live tensor bytes beyond parameters and their
    gradients (dsdpo/planner/measure.py, a dispatch mode that follows every storage an operation
    creates). Predicted: dsdpo/planner/memory.py's formulas.
model states: a ZeRO-3 policy engine (ds_configs/cpu.json: parameters and optimizer offloaded)
    and a reference engine built as training builds them, after one optimizer step. Measured: the
    bytes of the engines' own tensors (parameter partitions ds_tensor, fp32 master partitions,
    Adam's state, the fp32 gradient buffer, the reference's partitions). Predicted: the planner's
    CPU RAM items.

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/planner_accuracy.py [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch

from dsdpo.families.llada import LLaDAConfig, LLaDAModelLM
from dsdpo.planner.measure import measured_activation_bytes, scored_inputs
from dsdpo.planner.memory import (
    activation_bytes,
    model_state_plan,
    no_grad_activation_bytes,
)
from dsdpo.planner.shapes import model_shape

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # name: (hidden, layers, heads, MLP width, vocabulary)
    "small": (128, 2, 4, 384, 2048),
    "medium": (256, 4, 4, 768, 8192),
    "large": (512, 4, 8, 1536, 16384),
}


def llada_config(hidden, layers, heads, mlp, vocab) -> LLaDAConfig:
    published = json.loads((REPO / "tests/fixtures/planner/llada-8b.json").read_text())
    published.pop("model_type")
    published.update(
        d_model=hidden,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=heads,
        mlp_hidden_size=mlp,
        vocab_size=vocab,
        embedding_size=vocab,
        mask_token_id=vocab - 1,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LLaDAConfig(**published)


def activation_rows(name, config, dtype, rows, width, masked):
    torch.manual_seed(0)
    model = LLaDAModelLM(config).to(dtype).train()
    shape = model_shape(config)
    b = torch.finfo(dtype).bits // 8
    inputs = scored_inputs(config.vocab_size, rows, width, masked, mask_token_id=config.mask_token_id)
    tokens, positions = rows * width, rows * masked
    out = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        measured = measured_activation_bytes(model, inputs)
        predicted = activation_bytes(shape, tokens, positions, b, checkpointing=checkpointing)
        out.append((name, f"grad, checkpointing {'on' if checkpointing else 'off'}", predicted, measured))
    measured = measured_activation_bytes(model, inputs, grad=False)
    out.append((name, "no grad", no_grad_activation_bytes(shape, tokens, positions, b), measured))
    return out


def state_rows(name, config, dtype, folder: Path):
    from dsdpo.config import ModelConfig
    from dsdpo.diffusion import ScoringBatch
    from dsdpo.ds_config import read_ds_config, resolve_ds_config
    from dsdpo.engine import build_engines, init_distributed

    torch.manual_seed(0)
    LLaDAModelLM(config).to(dtype).save_pretrained(folder)
    ds = read_ds_config(REPO / "ds_configs/cpu.json")
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    init_distributed()
    resolved = resolve_ds_config(ds, world_size=1, total_steps=10)
    engines = build_engines(ModelConfig(path=str(folder)), resolved)
    policy, reference = engines.policy, engines.reference
    # One step, so that Adam's state exists.
    batch = ScoringBatch.build(*(torch.ones(1, 8, dtype=torch.long),) * 3)
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "scored": batch.response_mask,
        "targets": batch.input_ids,
    }
    policy.backward(policy(**inputs).sum())
    policy.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    optimizer = policy.optimizer
    params = nbytes(p.ds_tensor for p in policy.module.parameters())
    master = nbytes(optimizer.fp32_partitioned_groups_flat)
    adam = nbytes(v for state in optimizer.optimizer.state.values() for v in state.values() if v.dim())
    grads = nbytes([getattr(optimizer, "grad_partitions_flat_buffer", None)])
    ref = nbytes(p.ds_tensor for p in reference.module.parameters())
    measured = params + master + adam + grads + ref
    plan = model_state_plan(model_shape(config), resolved, reference="engine")
    predicted = sum(item.bytes for item in plan.cpu)
    del engines, policy, reference
    detail = f"params {params}, master {master}, adam {adam}, grads {grads}, reference {ref}"
    return [(name, "model states (CPU RAM)", predicted, measured)], detail


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--masked", type=int, default=128)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--no-states", action="store_true", help="skip the DeepSpeed engines")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    table, details = [], []
    for name in args.sizes:
        config = llada_config(*SIZES[name])
        table += activation_rows(name, config, dtype, args.rows, args.width, args.masked)
        if not args.no_states:
            with tempfile.TemporaryDirectory() as folder:
                rows, detail = state_rows(name, config, dtype, Path(folder))
            table += rows
            details.append(f"{name}: measured {detail}")
    print(
        f"LLaDA, {args.dtype}, chunk of {args.rows} rows x {args.width} tokens, {args.masked} masked a row; "
        "sizes (hidden, layers, heads, MLP, vocabulary): " + ", ".join(f"{n} {SIZES[n]}" for n in args.sizes)
    )
    print(f"{'size':<8} {'what':<28} {'predicted MiB':>14} {'measured MiB':>14} {'ratio':>7}")
    for name, what, predicted, measured in table:
        mib = f"{predicted / 2**20:14.2f} {measured / 2**20:14.2f}"
        print(f"{name:<8} {what:<28} {mib} {predicted / measured:7.3f}")
    for line in details:
        print(line)


if __name__ == "__main__":
    main()
