"""A tiny random-weight llama model as a GGUF file, with the byte-level BPE tokenizer it uses as
tokenizer.json, laid out in a Hugging Face cache the way a download would leave it."""

import json
from pathlib import Path

import numpy as np

VOCAB = 384
HIDDEN = 64
LAYERS = 2
HEADS = 4
FFN = 128
CONTEXT = 4096
SPECIALS = ["<s>", "</s>"]


def train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def write_gguf(path: Path, tokenizer) -> None:
    import gguf

    model = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda item: item[1])
    tokens = [token for token, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    rng = np.random.default_rng(0)

    def weights(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("sparkrun tiny test model")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_eos_token_id(tokens.index("</s>"))
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", weights(len(tokens), HIDDEN))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", weights(HIDDEN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.add_tensor("output.weight", weights(len(tokens), HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_cached_model(hf_home: Path, repo: str, quant: str, text: str, commit: str = "0" * 40) -> Path:
    """<hf_home>/hub/models--org--name/{refs/main, snapshots/<commit>/{tiny-<quant>.gguf,
    tokenizer.json}}; returns the snapshot folder."""
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    tokenizer = train_tokenizer(text)
    tokenizer.save(str(snapshot / "tokenizer.json"))
    write_gguf(snapshot / f"tiny-{quant}.gguf", tokenizer)
    return snapshot
