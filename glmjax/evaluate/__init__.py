"""Evaluation: GLM-style scoring on token ids, text metrics, task runs and the CLI."""
