"""Fixtures of the external tier: the real vLLM and its tiny model (tests/vllms.py)."""

from vllms import model, vllm

__all__ = ["model", "vllm"]
