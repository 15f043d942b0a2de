import json
from pathlib import Path

import pytest

import sparkrun as v
from conftest import CORPUS
from test_recipes import corpus_recipe_files

GOLDEN_META = {"num_layers": 52, "num_kv_heads": 2, "head_dim": 128}

GOLDEN_TP1 = """\
VRAM Estimation:
  Model dtype:      nvfp4
  Model params:     30,000,000,000
  KV cache dtype:   bfloat16
  Architecture:     52 layers, 2 KV heads, 128 head_dim
  Model weights:    19.56 GB
  KV cache:         9.92 GB (max_model_len=200,000)
  Tensor parallel:  1
  Per-GPU total:    29.48 GB
  DGX Spark fit:    YES

  GPU Memory Budget:
    gpu_memory_utilization: 80%
    Usable GPU memory:     96.8 GB (121 GB x 80%)
    Available for KV:      77.2 GB
    Max context tokens:    1,557,583
    Context multiplier:    7.8x (vs max_model_len=200,000)"""

# By hand: weights 30e9 x 0.7 = 21e9 B (19.56 GB), KV 53,248 B/token x 200,000 = 9.92 GB.
# Per GPU (21e9 + 10,649,600,000) / 2 = 15,824,800,000 B = 14.74 GB.
# Available 96.8 x 2**30 - 21e9 / 2 = 93,438,208,563.2 B = 87.0 GB;
# / (53,248 / 2) = 3,509,548.1 tokens; / 200,000 = 17.5x.
GOLDEN_TP2 = """\
VRAM Estimation:
  Model dtype:      nvfp4
  Model params:     30,000,000,000
  KV cache dtype:   bfloat16
  Architecture:     52 layers, 2 KV heads, 128 head_dim
  Model weights:    19.56 GB
  KV cache:         9.92 GB (max_model_len=200,000)
  Tensor parallel:  2
  Per-GPU total:    14.74 GB
  DGX Spark fit:    YES

  GPU Memory Budget:
    gpu_memory_utilization: 80%
    Usable GPU memory:     96.8 GB (121 GB x 80%)
    Available for KV:      87.0 GB
    Max context tokens:    3,509,548
    Context multiplier:    17.5x (vs max_model_len=200,000)"""


def golden_estimate(tp=1, **overrides):
    args = dict(params="30B", model_dtype="nvfp4", kv_dtype=None, arch=v.arch_from_metadata(GOLDEN_META),
                max_model_len=200000, tp=tp, gpu_mem=0.8)
    return v.estimate_vram(**(args | overrides))


def test_golden_tp1():
    assert v.format_vram(golden_estimate()) == GOLDEN_TP1


def test_golden_tp2_halves_per_gpu_figures():
    assert v.format_vram(golden_estimate(tp=2)) == GOLDEN_TP2


def test_golden_json_figures():
    data = v.vram_to_json(golden_estimate())
    assert json.loads(json.dumps(data)) == data
    assert data["weights_bytes"] == 21e9
    assert data["kv_bytes"] == 53248 * 200000
    assert data["max_context_tokens"] == 1557583
    assert data["verdict"] == "YES"
    assert data["missing"] == []
    assert data["weights_source"] == "params×dtype"
    assert data["arch"]["num_layers"] == 52


def test_does_not_fit():
    est = golden_estimate(params="235B", model_dtype="bf16")
    assert (est.verdict, est.max_context_tokens, est.multiplier) == ("NO", 0, 0.0)
    assert "  DGX Spark fit:    NO\n" in v.format_vram(est)


@pytest.mark.parametrize("value, expected", [
    ("30B", 30_000_000_000), ("1.7B", 1_700_000_000), ("397B", 397_000_000_000),
    ("235M", 235_000_000), ("1.2T", 1_200_000_000_000), ("80b", 80_000_000_000),
    (" 7 B ", 7_000_000_000), ("12k", 12_000), ("8000000000", 8_000_000_000),
    ("30,000,000,000", 30_000_000_000), (7, 7), (3e10, 30_000_000_000),
    ("", None), (None, None), ("abc", None), ("30B-A3B", None), (0, None), (-5, None), (True, None),
])
def test_parse_param_count(value, expected):
    assert v.parse_param_count(value) == expected


@pytest.mark.parametrize("dtype, expected", [
    ("fp32", 4), ("float32", 4), ("bf16", 2), ("BF16", 2), ("bfloat16", 2), ("fp16", 2),
    ("float16", 2), ("F16", 2), ("fp8", 1), ("FP8", 1), ("fp8_e4m3", 1), ("int8", 1),
    ("int4", 0.5), ("awq", 0.5), ("gptq", 0.5), ("int4-autoround", 0.5), ("autoround", 0.5),
    ("nvfp4", 0.7), ("NVFP4", 0.7), ("mxfp4", 4.25 / 8), ("MXFP4_MOE", 4.25 / 8),
    ("Q8_0", 8.5 / 8), ("q6_k", 6.5625 / 8), ("Q5_K_M", 5.69 / 8), ("Q5_K_S", 5.54 / 8),
    ("Q4_K_M", 4.85 / 8), ("Q4_K_S", 4.58 / 8), ("Q4_K", 4.85 / 8), ("Q4_0", 4.5 / 8),
    ("q3_k_m", 3.91 / 8), ("Q2_K", 2.63 / 8), ("IQ4_XS", 4.25 / 8), ("IQ4_NL", 4.5 / 8),
    ("IQ3_XXS", 3.06 / 8), ("IQ2_XXS", 2.06 / 8), ("UD-Q4_K_XL", 4.85 / 8), ("UD-IQ2_XXS", 2.06 / 8),
    ("UD-Q8_K_XL", 8.5 / 8), ("mystery", None), ("", None), (None, None),
    ("awq4", 0.5), ("AWQ8", 1), ("Q5_K_L", 5.69 / 8), ("Q6_K_L", 6.5625 / 8), ("Q3_K_L", 4.27 / 8),
    ("TQ1_0", 1.6875 / 8), ("tq2_0", 2.0625 / 8),
])
def test_bytes_per_param(dtype, expected):
    assert v.bytes_per_param(dtype) == expected


@pytest.mark.parametrize("candidates, expected", [
    (("fp8", "auto"), "fp8"), ((None, "fp8_e4m3"), "fp8_e4m3"), ((None, "auto"), "bfloat16"),
    (("bf16",), "bfloat16"), (("AUTO", None), "bfloat16"), ((), "bfloat16"),
])
def test_resolve_kv_dtype(candidates, expected):
    assert v.resolve_kv_dtype(*candidates) == expected


NEMOTRON_H = {
    "model_type": "nemotron_h", "num_hidden_layers": 12, "hybrid_override_pattern": "M-M*-M-M*-M*",
    "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
}
QWEN3_NEXT = {
    "model_type": "qwen3_next", "num_hidden_layers": 8, "full_attention_interval": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
}
GEMMA3 = {
    "model_type": "gemma3",
    "vision_config": {"num_hidden_layers": 27, "hidden_size": 1152, "num_attention_heads": 16},
    "text_config": {
        "model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window": 1024,
        "sliding_window_pattern": 6, "hidden_size": 2560, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256,
    },
}
DEEPSEEK = {
    "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168, "num_attention_heads": 128,
    "num_key_value_heads": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
}


def test_hybrid_pattern_counts_only_attention_layers():
    arch = v.arch_from_config(NEMOTRON_H)
    assert (arch.num_layers, arch.kv_layers, arch.note) == (12, 3, "3 keep KV: hybrid")
    assert v.kv_bytes_per_token(arch, "bf16", 4096) == 12288  # 2 x 3 layers x 8 heads x 128 x 2 B
    est = v.estimate_vram(params="8B", model_dtype="bf16", kv_dtype="bf16", arch=arch, max_model_len=1000)
    assert "  Architecture:     12 layers (3 keep KV: hybrid), 8 KV heads, 128 head_dim\n" in v.format_vram(est)


def test_qwen3_next_layer_types_and_interval_agree():
    arch = v.arch_from_config(QWEN3_NEXT)
    assert (arch.num_layers, arch.kv_layers) == (8, 2)
    assert v.kv_bytes_per_token(arch, "bf16", 4096) == 4096  # 2 x 2 layers x 2 heads x 256 x 2 B
    assert v.kv_bytes_per_token(arch, "fp8", 4096) == 2048
    by_interval = {key: value for key, value in QWEN3_NEXT.items() if key != "layer_types"}
    assert v.arch_from_config(by_interval).as_dict() == arch.as_dict()


def test_sliding_window_pattern_in_nested_text_config():
    arch = v.arch_from_config(GEMMA3)
    assert (arch.num_layers, arch.kv_layers, arch.sliding_layers, arch.sliding_window) == (12, 2, 10, 1024)
    assert (arch.num_kv_heads, arch.head_dim) == (4, 256)
    # Per layer per token 2 x 4 heads x 256 x 2 B = 4096; at 4096 tokens the 10 sliding layers
    # hold 1024 of them: (2 x 4096 x 4096 + 10 x 4096 x 1024) / 4096 = 18432.
    assert v.kv_bytes_per_token(arch, "bf16", 4096) == 18432
    assert v.kv_bytes_per_token(arch, "bf16", 512) == 49152  # inside the window all 12 layers count


def test_sliding_layer_types():
    config = {"num_hidden_layers": 4, "sliding_window": 128, "num_attention_heads": 64,
              "num_key_value_heads": 8, "head_dim": 64,
              "layer_types": ["sliding_attention", "full_attention"] * 2}
    arch = v.arch_from_config(config)
    assert (arch.kv_layers, arch.sliding_layers) == (2, 2)
    # Per layer per token 2 x 8 x 64 x 2 = 2048: 2 x 2048 + 2 x 2048 x 128 / 1024 = 4608.
    assert v.kv_bytes_per_token(arch, "bf16", 1024) == 4608


def test_sliding_window_variants():
    base = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64,
            "sliding_window": 4096}
    gemma2, qwen2 = base | {"model_type": "gemma2"}, base | {"max_window_layers": 3, "use_sliding_window": True}
    assert (v.arch_from_config(gemma2).kv_layers, v.arch_from_config(gemma2).sliding_layers) == (2, 2)
    assert (v.arch_from_config(qwen2).kv_layers, v.arch_from_config(qwen2).sliding_layers) == (3, 1)
    disabled = v.arch_from_config(qwen2 | {"use_sliding_window": False})
    assert (disabled.kv_layers, disabled.sliding_layers, disabled.note) == (4, 0, "")
    assert v.arch_from_config(base).kv_layers == 0  # Mistral style: every layer slides


def test_max_context_with_sliding_layers():
    arch = v.arch_from_config(GEMMA3)
    est = v.estimate_vram(params="1B", model_dtype="bf16", kv_dtype=None, arch=arch, max_model_len=4096,
                          gpu_mem=0.5)
    # Available 60.5 x 2**30 - 2e9 = 62,961,380,352 B. Past the window only the 2 full layers grow:
    # (62,961,380,352 - 10 x 4096 x 1024) / (2 x 4096) = 7,680,595.4
    assert est.max_context_tokens == 7680595


def test_all_sliding_context_is_unbounded():
    config = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 128, "sliding_window": 4096}
    est = v.estimate_vram(params="7B", model_dtype="bf16", kv_dtype=None,
                          arch=v.arch_from_config(config), max_model_len=32768)
    assert (est.verdict, est.max_context_tokens, est.multiplier) == ("YES", None, None)
    text = v.format_vram(est)
    assert "    Max context tokens:    unbounded\n" in text
    assert text.endswith("    Context multiplier:    unbounded")


def test_mla_compressed_kv():
    arch = v.arch_from_config(DEEPSEEK)
    assert (arch.mla_dim, arch.note) == (576, "MLA compressed KV: 576 dims")
    assert v.kv_bytes_per_token(arch, "bf16", 4096) == 70272  # 61 layers x (512 + 64) x 2 B
    assert v.kv_bytes_per_token(arch, "fp8", 4096) == 35136
    est = v.estimate_vram(params="671B", model_dtype="nvfp4", kv_dtype="fp8", arch=arch, max_model_len=1000)
    assert "  Architecture:     61 layers (MLA compressed KV: 576 dims)\n" in v.format_vram(est)


def test_nested_text_config_wins_and_head_dim_from_hidden_size():
    config = {"num_hidden_layers": 99, "llm_config": {"num_hidden_layers": 28, "hidden_size": 3584,
                                                      "num_attention_heads": 28, "num_key_value_heads": 4}}
    arch = v.arch_from_config(config)
    assert (arch.num_layers, arch.num_kv_heads, arch.head_dim) == (28, 4, 128)
    assert v.kv_bytes_per_token(arch, "bf16", 100) == 57344  # 2 x 28 x 4 x 128 x 2 B


def test_kv_heads_default_to_attention_heads():
    arch = v.arch_from_config({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256})
    assert (arch.num_kv_heads, arch.head_dim) == (4, 64)


def test_metadata_wins_over_config():
    config_arch = v.arch_from_config(NEMOTRON_H)
    merged = v.arch_from_metadata({"num_kv_heads": 2}, config_arch)
    assert (merged.num_kv_heads, merged.head_dim, merged.kv_layers) == (2, 128, 3)
    relayered = v.arch_from_metadata({"num_layers": 52}, config_arch)
    assert (relayered.num_layers, relayered.kv_layers, relayered.note) == (52, 52, "")
    assert v.arch_from_metadata({}, config_arch).as_dict() == config_arch.as_dict()
    assert v.arch_from_metadata({}) is None
    assert v.arch_from_config({"vocab_size": 32000}) is None


def test_missing_architecture_still_gives_weights():
    est = golden_estimate(arch=v.arch_from_metadata({"num_layers": 52}))
    assert est.verdict == "UNKNOWN"
    assert est.missing == ("num_kv_heads", "head_dim")
    assert est.weights_bytes == 21e9
    text = v.format_vram(est)
    for line in ["  Architecture:     52 layers, unknown KV heads, unknown head_dim",
                 "  Model weights:    19.56 GB",
                 "  KV cache:         unknown (max_model_len=200,000)",
                 "  DGX Spark fit:    UNKNOWN (missing: num_kv_heads, head_dim)",
                 "    Available for KV:      77.2 GB",
                 "    Max context tokens:    unknown"]:
        assert line in text.splitlines()
    assert text.endswith("\n  Missing:          num_kv_heads, head_dim")


def test_everything_missing_never_crashes():
    est = v.estimate_vram(params=None, model_dtype=None, kv_dtype=None, arch=None, max_model_len=None)
    assert est.verdict == "UNKNOWN"
    assert est.missing == ("model_params", "model_dtype", "num_layers", "num_kv_heads", "head_dim",
                           "max_model_len")
    assert est.weights_bytes is est.kv_bytes is est.max_context_tokens is None
    assert "  Model weights:    unknown\n" in v.format_vram(est)
    with pytest.raises(ValueError):
        v.kv_bytes_per_token(None, "bf16", 100)


def test_unknown_dtypes_are_missing():
    est = golden_estimate(model_dtype="weird", kv_dtype="turbo3")
    assert est.missing == ("model_dtype", "kv_dtype")


# ---- local Hugging Face cache ---------------------------------------------------------------

def cached_file(snapshot: Path, name: str, size: int) -> None:
    """A snapshot entry linked to a sparse blob, as huggingface_hub lays them out."""
    blobs = snapshot.parent.parent / "blobs"
    blobs.mkdir(exist_ok=True)
    blob = blobs / f"blob{len(list(blobs.iterdir()))}"
    with blob.open("wb") as handle:
        handle.truncate(size)
    link = snapshot / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(blob)


def cached_repo(hf_home: Path, repo_id: str, commit: str = "abc123") -> Path:
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    return repo_dir / "snapshots" / commit


def test_gguf_sizes_from_files(tmp_path):
    repo = "unsloth/Qwen3.5-397B-A17B-GGUF"
    snapshot = cached_repo(tmp_path, repo)
    for shard, size in enumerate([49_000_000_000, 49_000_000_000, 35_000_000_000], start=1):
        cached_file(snapshot, f"Q3_K_M/Qwen3.5-397B-A17B-Q3_K_M-0000{shard}-of-00003.gguf", size)
    cached_file(snapshot, "Qwen3.5-397B-A17B-Q4_K_M.gguf", 240_000_000_000)
    cached_file(snapshot, "UD-Q4_K_XL/Qwen3.5-397B-A17B-UD-Q4_K_XL-00001-of-00002.gguf", 100_000_000_000)
    cached_file(snapshot, "UD-Q4_K_XL/Qwen3.5-397B-A17B-UD-Q4_K_XL-00002-of-00002.gguf", 50_000_000_000)
    cached_file(snapshot, "mmproj-F16.gguf", 900_000_000)

    assert v.cached_weights_bytes(tmp_path, repo, None, "Q3_K_M") == 133_000_000_000
    assert v.cached_weights_bytes(tmp_path, repo, None, "q4_k_m") == 240_000_000_000
    assert v.cached_weights_bytes(tmp_path, repo, None, "UD-Q4_K_XL") == 150_000_000_000
    assert v.cached_weights_bytes(tmp_path, repo, None, "Q4_K") is None  # no standalone Q4_K files
    assert v.cached_weights_bytes(tmp_path, repo, None, "Q8_0") is None

    est = v.estimate_vram(params="397B", model_dtype="q3_k_m", kv_dtype=None, arch=None, max_model_len=262144,
                          tp=2, weights_bytes=v.cached_weights_bytes(tmp_path, repo, None, "Q3_K_M"))
    assert (est.weights_source, est.weights_bytes) == ("on-disk size", 133_000_000_000)
    assert "  Model weights:    123.87 GB (on-disk size)\n" in v.format_vram(est)


def test_safetensors_index_total_size_then_file_sum(tmp_path):
    indexed = cached_repo(tmp_path, "org/indexed")
    (indexed / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 21_500_000_000}}))
    cached_file(indexed, "model-00001-of-00002.safetensors", 1000)
    plain = cached_repo(tmp_path, "org/plain")
    cached_file(plain, "model-00001-of-00002.safetensors", 3_000_000_000)
    cached_file(plain, "model-00002-of-00002.safetensors", 1_000_000_000)
    (plain / "config.json").write_text(json.dumps(QWEN3_NEXT))

    assert v.cached_weights_bytes(tmp_path, "org/indexed", None, None) == 21_500_000_000
    assert v.cached_weights_bytes(tmp_path, "org/plain", None, None) == 4_000_000_000
    assert v.read_cached_config(tmp_path, "org/plain", None) == QWEN3_NEXT
    assert v.read_cached_config(tmp_path, "org/indexed", None) is None


def test_snapshot_lookup(tmp_path):
    snapshot = cached_repo(tmp_path, "org/model", commit="deadbeef")
    assert v.cached_snapshot_dir(tmp_path, "org/model", None) == snapshot
    assert v.cached_snapshot_dir(tmp_path, "org/model", "main") == snapshot
    assert v.cached_snapshot_dir(tmp_path, "org/model", "deadbeef") == snapshot
    assert v.cached_snapshot_dir(tmp_path, "org/model", "v2") is None
    assert v.cached_snapshot_dir(tmp_path, "org/other", None) is None
    assert v.cached_weights_bytes(tmp_path, "org/other", None, None) is None


def test_blob_not_downloaded(tmp_path):
    snapshot = cached_repo(tmp_path, "org/partial")
    (snapshot / "model.safetensors").symlink_to(tmp_path / "missing-blob")
    assert v.cached_weights_bytes(tmp_path, "org/partial", None, None) is None


# -- through the CLI and on real recipes


def test_show_ends_with_vram_golden(cli):
    out = cli("show", "nemotron3-nano-30b-nvfp4-vllm", check=0).stdout
    assert out.endswith("\n\n" + GOLDEN_TP1 + "\n")


def test_recipe_vram_tp2_and_json(cli):
    assert cli("recipe", "vram", "nemotron3-nano-30b-nvfp4-vllm", "--tp", "2", check=0).stdout == GOLDEN_TP2 + "\n"
    figures = json.loads(cli("recipe", "vram", "nemotron3-nano-30b-nvfp4-vllm", "--json", check=0).stdout)
    assert figures["max_context_tokens"] == 1557583 and figures["verdict"] == "YES"


@pytest.mark.parametrize("path", corpus_recipe_files(), ids=lambda p: str(p.relative_to(CORPUS)))
def test_every_corpus_recipe_gets_an_estimate_or_clear_unknown_offline(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = v.load_recipe(path)
    est = v.recipe_vram(recipe, hf_home=tmp_path)
    text = v.format_vram(est)
    if est.verdict == v.UNKNOWN:
        assert est.missing and f"UNKNOWN (missing: {', '.join(est.missing)})" in text
    else:
        assert est.per_gpu_bytes > 0 and est.verdict in (v.YES, v.NO)


def test_pipeline_parallel_divides_like_tensor_parallel():
    pp2, tp2 = golden_estimate(pp=2), golden_estimate(tp=2)
    assert (pp2.per_gpu_bytes, pp2.max_context_tokens) == (tp2.per_gpu_bytes, tp2.max_context_tokens)
    assert golden_estimate(tp=2, pp=2).per_gpu_bytes == golden_estimate().per_gpu_bytes / 4
    assert "  Tensor parallel:  1\n  Pipeline parallel: 2\n  Per-GPU total:    14.74 GB\n" in v.format_vram(pp2)


@pytest.mark.parametrize("config, dtype", [
    ({"torch_dtype": "bfloat16"}, "bfloat16"),
    ({"dtype": "float16"}, "float16"),  # transformers >= 4.56 writes `dtype`
    ({"text_config": {"torch_dtype": "bfloat16"}}, "bfloat16"),
    ({"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "fp8"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "awq4"),
    ({"quantization_config": {"quant_method": "awq", "bits": 8}}, "awq8"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "int4"),
    ({"quantization_config": {"quant_method": "auto-round", "bits": 4}}, "int4"),
    ({"quantization_config": {"quant_method": "mxfp4"}}, "mxfp4"),
    ({"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}}, "nvfp4"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}}, "nvfp4"),
    ({"quantization_config": {"quant_method": "compressed-tensors",
                              "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}}}}, "fp8"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, "int4"),
    ({"num_hidden_layers": 2}, None),
])
def test_weight_dtype_from_config(config, dtype):
    assert v.config_weight_dtype(config) == dtype
    assert dtype is None or v.bytes_per_param(dtype)


def write_recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text("model: org/plain\ncontainer: img\ncommand: vllm serve {model}\n" + text)
    return v.load_recipe(path)


def test_config_dtype_fills_metadata_gaps_and_online_fp8_halves_weights(tmp_path):
    hf = tmp_path / "hf"
    snapshot = cached_repo(hf, "org/plain")
    (snapshot / "config.json").write_text(json.dumps(dict(QWEN3_NEXT, torch_dtype="bfloat16")))
    plain = write_recipe(tmp_path, "metadata: {model_params: 10B}\ndefaults: {max_model_len: 4096}\n")
    est = v.recipe_vram(plain, hf_home=hf)
    assert (est.model_dtype, est.weights_bytes) == ("bfloat16", 20e9)
    assert "  Model dtype:      bfloat16 (from config.json)\n" in v.format_vram(est)
    online = v.recipe_vram(write_recipe(tmp_path, "metadata: {model_params: 10B}\ndefaults: {quantization: fp8}\n"),
                           hf_home=hf)
    assert (online.model_dtype, online.weights_bytes) == ("fp8", 10e9)
    assert "  Model dtype:      fp8 (online quantization of bfloat16)\n" in v.format_vram(online)
    cached_file(snapshot, "model.safetensors", 4_000_000_000)  # on-disk bf16 weights are halved as well
    assert v.recipe_vram(write_recipe(tmp_path, "defaults: {quantization: fp8}\n"), hf_home=hf).weights_bytes == 2e9
    said = write_recipe(tmp_path, "metadata: {model_dtype: nvfp4, model_params: 10B}\ndefaults: {quantization: fp8}\n")
    assert v.recipe_vram(said, hf_home=hf).model_dtype == "nvfp4"  # narrower than fp8: left alone


def test_recipe_pipeline_parallel_splits_the_estimate(tmp_path):
    meta = "metadata: {model_params: 30B, model_dtype: nvfp4, num_layers: 52, num_kv_heads: 2, head_dim: 128}\n"
    one = v.recipe_vram(write_recipe(tmp_path, meta + "defaults: {max_model_len: 200000}\n"), hf_home=tmp_path)
    two = v.recipe_vram(write_recipe(tmp_path, meta + "defaults: {max_model_len: 200000, pipeline_parallel: 2}\n"),
                        hf_home=tmp_path)
    assert two.pp == 2 and two.per_gpu_bytes == one.per_gpu_bytes / 2


def test_show_prints_the_dtype_from_config(cli, tmp_path):
    snapshot = cached_repo(cli.home / "hf", "org/plain")
    (snapshot / "config.json").write_text(json.dumps(dict(QWEN3_NEXT, torch_dtype="bfloat16")))
    path = tmp_path / "r.yaml"
    path.write_text("model: org/plain\ncontainer: img\ncommand: vllm serve {model}\nmetadata: {model_params: 1B}\n")
    assert "  Model dtype:      bfloat16 (from config.json)\n" in cli("show", path, check=0).stdout
