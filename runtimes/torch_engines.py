"""What vLLM and SGLang share as PyTorch engines: the allocator setting and the compile caches.

ENV: `expandable_segments:True` lets PyTorch's CUDA allocator grow segments instead of reserving
fixed blocks, which wastes less of a Spark's unified memory
(https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf).

Caches: variable -> subfolder of the host's per-engine compile cache. Inside a container these
folders die with it, so every launch would compile its kernels again:
    VLLM_CACHE_ROOT            vLLM's root; torch.compile artifacts go to torch_compile_cache/ (vllm/envs.py)
    SGLANG_DG_CACHE_DIR        SGLang's DeepGEMM JIT kernels (python/sglang/srt/environ.py)
    TRITON_CACHE_DIR           Triton's compiled kernels (triton/runtime/cache.py; default ~/.triton/cache)
    FLASHINFER_WORKSPACE_BASE  FlashInfer's JIT cache lives under <base>/.cache/flashinfer (flashinfer/jit/env.py)
    TORCHINDUCTOR_CACHE_DIR    TorchInductor's generated code (torch/_inductor/runtime/cache_dir_utils.py)
"""

ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
SHARED_CACHES = {"TRITON_CACHE_DIR": "triton", "FLASHINFER_WORKSPACE_BASE": "flashinfer",
                 "TORCHINDUCTOR_CACHE_DIR": "inductor"}
VLLM_CACHES = {"VLLM_CACHE_ROOT": "vllm", **SHARED_CACHES}
SGLANG_CACHES = {"SGLANG_DG_CACHE_DIR": "deep_gemm", **SHARED_CACHES}


def splits_heads(heads: int, kv_heads: int, tensor_parallel: int) -> bool:
    """Whether tensor parallel shards the attention evenly, as vLLM and SGLang require at start:
    every rank takes heads / tp query heads (vLLM refuses otherwise in ModelConfig.
    verify_with_parallel_config: "Total number of attention heads (X) must be divisible by tensor
    parallel size (Y)"), and key/value heads are split when there are more of them than ranks, else
    replicated, tp / kv_heads times (QKVParallelLinear in vllm/model_executor/layers/linear.py and
    sglang/srt/layers/linear.py: `divide` asserts "X is not divisible by Y")."""
    if heads % tensor_parallel:
        return False
    return (tensor_parallel % kv_heads if tensor_parallel >= kv_heads else kv_heads % tensor_parallel) == 0
