"""Stencil: structured generation and constrained decoding for LLMs."""
