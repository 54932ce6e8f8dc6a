"""Evaluation: sampling (sampler, block_sampler), answers and their judging (answers, accuracy),
preference reports and likelihood scores (reports), held-out evaluation during training (held_out),
on-policy pairs (on_policy), and lm-evaluation-harness (harness)."""
