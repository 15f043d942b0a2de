"""Fake inference engines (vLLM, SGLang, llama.cpp, Ray) for simulated hosts."""
