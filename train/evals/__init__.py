"""Evaluation: scoring text with a model (scoring.py), perplexity on files (perplexity.py), and
the lm-evaluation-harness backend and task runner (harness.py, tasks.py; the `eval` extra)."""
