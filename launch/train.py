"""Train a masked diffusion LM on preference pairs with DeepSpeed ZeRO-3.

    deepspeed launch/train.py --ds_config ds_configs/rtx4080.json --model DIR --data FILE --output DIR
    deepspeed --num_gpus 8 launch/train.py ...          # several GPUs: the same command
    python launch/train.py --demo                        # tiny model, built-in data, CPU, a minute

Options come from --config (YAML or JSON with sections model, data, score, loss, train), then the
flags below, then --set section.field=value; later wins. DeepSpeed settings (ZeRO, offload,
precision, batch sizes, optimizer) live only in the --ds_config JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# flag -> config field; None means "not given" and leaves the file's value alone.
FLAG_FIELDS = {
    "model": "model.path",
    "ref_model": "model.reference_path",
    "reference_scores": "model.reference_scores",
    "mask_token_id": "model.mask_token_id",
    "trust_remote_code": "model.trust_remote_code",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "lora_rank": "model.lora_rank",
    "lora_alpha": "model.lora_alpha",
    "lora_target_modules": "model.lora_target_modules",
    "freeze": "model.freeze",
    "data": "data.path",
    "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    "skip_invalid": "data.skip_invalid",
    "refuse_long_prompts": "data.refuse_long_prompts",
    "estimator": "score.estimator",
    "budget": "score.budget",
    "trajectory_steps": "score.steps",
    "max_tokens_per_forward": "score.max_tokens_per_forward",
    "max_tokens_no_grad": "score.max_tokens_no_grad",
    "antithetic": "score.antithetic",
    "loss": "loss.type",
    "beta": "loss.beta",
    "label_smoothing": "loss.label_smoothing",
    "reference_free": "loss.reference_free",
    "loss_weights": "loss.weights",
    "f_divergence": "loss.f_divergence",
    "f_alpha": "loss.f_alpha",
    "discopop_tau": "loss.discopop_tau",
    "wpo": "loss.wpo",
    "sft_weight": "loss.sft_weight",
    "chosen_floor": "loss.chosen_floor",
    "chosen_floor_per_token": "loss.chosen_floor_per_token",
    "objective": "loss.objective",
    "output": "train.output",
    "overwrite": "train.overwrite",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "log_every": "train.log_every",
    "save_every": "train.save_every",
    "keep_last": "train.keep_last",
    "max_bad_steps": "train.max_bad_steps",
    "ref_sync_steps": "train.ref_sync_steps",
    "ref_sync_alpha": "train.ref_sync_alpha",
    "eval_data": "train.eval_data",
    "eval_every": "train.eval_every",
    # issue 12: held-out generation accuracy and the best checkpoint
    "eval_problems": "train.eval_problems",
    "eval_num_problems": "train.eval_num_problems",
    "eval_samples": "train.eval_samples",
    "eval_gen_length": "train.eval_gen_length",
    "eval_block_length": "train.eval_block_length",
    "eval_gen_steps": "train.eval_gen_steps",
    "eval_temperature": "train.eval_temperature",
    "eval_chat": "train.eval_chat",
    "keep_best": "train.keep_best",
}


def parser() -> argparse.ArgumentParser:
    from dsdpo.loss import F_DIVERGENCES, LOSS_TYPES, OBJECTIVES, SMOOTHED_LOSSES

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument(
        "--ds_config",
        "--deepspeed_config",
        dest="ds_config",
        help="DeepSpeed JSON (ds_configs/rtx4080.json, rtx4080_nvme.json, cpu.json, multi_gpu.json)",
    )
    p.add_argument(
        "--config", help="training config file, YAML or JSON, with sections model/data/score/loss/train"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set score.budget=4 (repeatable)",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="auto: continue from the newest complete checkpoint in --output (fresh start if none); "
        "PATH: from that checkpoint folder",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="let the --resume checkpoint hold pickled code, not only weights (it could run anything): "
        "only for checkpoints from someone you trust",
    )
    p.add_argument("--nvme-path", help='folder on a fast NVMe drive, for configs that offload to "nvme"')
    p.add_argument(
        "--demo",
        action="store_true",
        help="train a tiny model on built-in addition pairs (CPU, about a minute)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the launcher

    g = p.add_argument_group("model")
    g.add_argument("--model", help="local Hugging Face folder of the model to train")
    g.add_argument("--ref-model", help="reference model folder (default: the starting policy)")
    g.add_argument(
        "--reference-scores",
        help="reference terms from `dsdpo precompute-reference`: no reference model in memory",
    )
    g.add_argument("--mask-token-id", type=int, help="mask token id (default: from config or tokenizer)")
    g.add_argument(
        "--trust-remote-code", action="store_true", default=None, help="allow the model's own code (LLaDA)"
    )
    g.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        default=None,
        help="keep activations instead of recomputing them (faster, more memory)",
    )
    g.add_argument(
        "--lora-rank",
        type=int,
        help="train LoRA adapters of this rank instead of every weight; "
        "the reference is then the same model with the adapters off",
    )
    g.add_argument(
        "--lora-alpha", type=float, help="LoRA scaling numerator (default 16; scale = alpha / rank)"
    )
    g.add_argument(
        "--lora-target-modules",
        help='comma-separated module names, "all-linear", or "auto" (default: every linear layer of the '
        "blocks for LLaDA and Dream, all-linear for other models)",
    )
    g.add_argument(
        "--freeze",
        help='parameters that do not train, comma-separated: "embeddings", "head", "layers:K" (the first K '
        "blocks) or name regexes; they get no optimizer state (the saving is printed at start)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", help="preference pairs (prompt/chosen/rejected): JSONL, JSON, Parquet, datasets folder"
    )
    g.add_argument("--max-length", type=int, help="prompt + response tokens (default 1024)")
    g.add_argument("--max-prompt-length", type=int, help="prompt tokens kept (its end)")
    g.add_argument(
        "--skip-invalid", action="store_true", default=None, help="skip bad rows instead of stopping"
    )
    g.add_argument(
        "--refuse-long-prompts",
        action="store_true",
        default=None,
        help="a prompt that fills --max-length is an error (skipped with --skip-invalid); default: its "
        "start is cut so the response fits, and counted",
    )
    g = p.add_argument_group("score (VRPO)")
    g.add_argument("--estimator", choices=["l_over_L", "one_over_t", "trajectory"], help="ELBO estimator")
    g.add_argument("--budget", type=int, help="Monte Carlo draws per response (default 8)")
    g.add_argument("--trajectory-steps", type=int, help="unmasking steps T of the trajectory estimator")
    g.add_argument(
        "--max-tokens-per-forward",
        type=int,
        help="rows x tokens per forward with gradients: the activation-memory knob (default 4096)",
    )
    g.add_argument("--max-tokens-no-grad", type=int, help="rows x tokens per forward without gradients")
    g.add_argument(
        "--no-antithetic",
        dest="antithetic",
        action="store_false",
        default=None,
        help="give the reference its own draws instead of the policy's (an ablation of VRPO)",
    )
    g = p.add_argument_group("loss")
    g.add_argument(
        "--loss",
        help=f"one of {', '.join(LOSS_TYPES)}, or several comma-separated (with --loss-weights); "
        "default sigmoid (DPO); formulas in dsdpo/loss.py",
    )
    g.add_argument("--loss-weights", help="comma-separated weight of each --loss type (default 1 each)")
    g.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="sequence (default): the loss of the Monte Carlo scores; per_draw: Diffusion-DPO's mean of "
        "the per-draw losses (an upper bound, one pass with gradients)",
    )
    g.add_argument("--beta", type=float, help="DPO beta (default 0.1)")
    g.add_argument(
        "--label-smoothing", type=float, help=f"epsilon of {', '.join(SMOOTHED_LOSSES)} (default 0)"
    )
    g.add_argument("--reference-free", action="store_true", default=None, help="no reference model")
    g.add_argument(
        "--f-divergence", choices=F_DIVERGENCES, help="divergence of f-DPO (default reverse_kl: DPO)"
    )
    g.add_argument("--f-alpha", type=float, help="alpha of --f-divergence alpha (default 1)")
    g.add_argument("--discopop-tau", type=float, help="tau of the discopop loss (default 0.05)")
    g.add_argument(
        "--wpo", action="store_true", default=None, help="weight pairs by WPO's policy-probability weight"
    )
    g.add_argument("--sft-weight", type=float, help="RPO: add this times the chosen NLL per token")
    g.add_argument(
        "--chosen-floor",
        type=float,
        help="add lambda * max(0, B_ref(chosen) - B_policy(chosen)): keeps the chosen likelihood up",
    )
    g.add_argument(
        "--chosen-floor-per-token", action="store_true", default=None, help="the floor's gap per token"
    )
    g.add_argument(
        "--ref-sync-steps",
        type=int,
        help="TR-DPO: every this many steps move the reference engine towards the policy (default 0: never)",
    )
    g.add_argument(
        "--ref-sync-alpha", type=float, help="TR-DPO: ref <- alpha * policy + (1 - alpha) * ref (default 0.6)"
    )
    g = p.add_argument_group("held-out evaluation")
    g.add_argument(
        "--eval-data",
        help="held-out pairs (completions with --loss sft), scored with the same draws at every evaluation; "
        "eval/* metrics in metrics.jsonl and TensorBoard",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        help="steps between evaluations (default 0: before the first step and at the end)",
    )
    # issue 12: held-out generation accuracy (dsdpo.held_out.HeldOutAccuracy) and --keep-best
    g.add_argument(
        "--eval-problems",
        help="held-out problems (question/answer JSONL, as `dsdpo eval accuracy --data`): at every "
        "evaluation the policy answers them with LLaDA's sampler, seeded with --seed; eval/accuracy and "
        "its 95%% Wilson bounds, the answers in eval_generations/step_N.jsonl",
    )
    g.add_argument(
        "--eval-num-problems",
        type=int,
        help="the first N problems (default 64; --set train.eval_num_problems=null: all)",
    )
    g.add_argument(
        "--eval-samples", type=int, help="answers per problem (default 1; > 1 needs --eval-temperature)"
    )
    g.add_argument("--eval-gen-length", type=int, help="answer tokens of the sampler (default 64)")
    g.add_argument("--eval-block-length", type=int, help="sampler block length (default: gen length)")
    g.add_argument("--eval-gen-steps", type=int, help="sampler denoising steps (default: gen length)")
    g.add_argument("--eval-temperature", type=float, help="sampling temperature (default 0: greedy)")
    g.add_argument(
        "--no-eval-chat",
        dest="eval_chat",
        action="store_false",
        default=None,
        help="give the plain question, not a user turn of the chat template (as eval accuracy --no-chat)",
    )
    g.add_argument(
        "--keep-best",
        metavar="METRIC",
        help="keep the checkpoint of the best evaluation after step 0 by METRIC (eval/loss: lower is "
        "better; eval/accuracy, eval/rewards/accuracies, eval/rewards/margins: higher), named by the file "
        "`best` in --output and never pruned by --keep-last",
    )
    g = p.add_argument_group("run")
    g.add_argument("--output", help="folder for metrics, configs, TensorBoard and checkpoints")
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start afresh in an --output folder that holds a run: its checkpoints and metrics are removed",
    )
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--seed", type=int, help="data order and Monte Carlo draws")
    g.add_argument("--log-every", type=int)
    g.add_argument("--save-every", type=int, help="optimizer steps between checkpoints (always at the end)")
    g.add_argument("--keep-last", type=int, help="checkpoints to keep (default 2)")
    g.add_argument(
        "--max-bad-steps", type=int, help="consecutive non-finite steps before stopping (default 3)"
    )
    return p


def build_config(args):
    from dsdpo.config import apply_overrides, config_from_dict, load_config_file, parse_assignments

    data = load_config_file(args.config) if args.config else {}
    source = args.config or "command line"
    if args.demo:
        from dsdpo.demo import prepare_demo

        output = Path(args.output or "runs/demo")
        model_dir, data_file = prepare_demo(output / "inputs")
        demo = {
            "model.path": str(model_dir),
            "data.path": str(data_file),
            "train.output": str(output),
            "train.overwrite": True,  # the demo starts afresh each time
            "train.epochs": 3,
            "loss.beta": 0.5,
            "score.budget": 4,
        }
        data = apply_overrides(data, demo)
        args.ds_config = args.ds_config or str(REPO / "ds_configs" / "cpu.json")
    data = apply_overrides(data, {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items()})
    data = apply_overrides(data, parse_assignments(args.set))
    return config_from_dict(data, source).validate()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's collective deprecations
    from dsdpo.errors import DsdpoError

    try:
        config = build_config(args)
        if not args.ds_config:
            raise DsdpoError("--ds_config is required (e.g. ds_configs/rtx4080.json), or use --demo")
        from dsdpo.train import TrainingStopped, train

        try:
            metrics = train(
                config,
                args.ds_config,
                nvme_path=args.nvme_path,
                resume=args.resume,
                trust_checkpoint=args.trust_checkpoint,
            )
        except TrainingStopped as stopped:
            print(str(stopped), file=sys.stderr)
            return 130  # the shell's code for "interrupted"
    except DsdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if metrics and int(os.environ.get("RANK", "0")) == 0:
        shown = ("loss", "rewards/accuracies", "rewards/margins")
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)
        print(f"done: {summary}; output in {config.train.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
