"""Evaluation helpers: greedy generation and answer checking."""
