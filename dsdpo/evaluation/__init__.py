"""Evaluation: sampling (sampler; its canvas and forward, canvas; text in and out, text_generation;
the block families' own, block_sampler), answers and their judging (answers, accuracy), preference
reports and likelihood scores (reports), held-out evaluation during training (held_out), on-policy
pairs (on_policy), and lm-evaluation-harness (harness)."""
