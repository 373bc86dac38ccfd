"""Evaluation: metrics on a held-out set and an optional LLM judge."""
