"""Evaluation through outside frameworks: lm-evaluation-harness (harness)."""
