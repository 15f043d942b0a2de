"""Fake vllm package (see fakeengine.vllm)."""
