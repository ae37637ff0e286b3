"""A tiny, randomly initialised model pair of the real architecture, built offline in seconds.

Used by tests and smoke runs. The draft is the target with its weights perturbed, so drafts are
accepted often but not always, which exercises every verification path. The tokenizer is a small
byte-level BPE trained on a few lines of text, so text in and text out work like the real pair.
"""

from __future__ import annotations

from pathlib import Path

import torch

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "SELECT name, count(*) FROM users GROUP BY name;\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_pair(vocab_size: int = 384, noise: float = 0.02, seed: int = 0, layers: int = 2):
    """(target, draft) Qwen2 models in float32; the draft is the target plus Gaussian noise."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.2, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(seed)
    target = Qwen2ForCausalLM(config).eval()
    draft = Qwen2ForCausalLM(config).eval()
    draft.load_state_dict(target.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp_min(1e-3))
    return target, draft


def save_pair(root: Path, noise: float = 0.02, seed: int = 0) -> tuple[Path, Path]:
    """Write target and draft folders (weights, config, tokenizer) under root; reuse them if there."""
    target_dir, draft_dir = root / "tiny-target", root / "tiny-draft"
    if not (target_dir / "config.json").exists() or not (draft_dir / "config.json").exists():
        tokenizer = build_tokenizer()
        target, draft = build_pair(len(tokenizer), noise, seed)
        for model, path in ((target, target_dir), (draft, draft_dir)):
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            save_gguf(model, tokenizer, path / "model.gguf")
    return target_dir, draft_dir


def save_gguf(model, tokenizer, path: Path) -> Path:
    """Write a Qwen2 causal LM and its byte-level BPE tokenizer as an F32 GGUF file that llama.cpp
    loads: the same weights, so the llama.cpp runtime is tested on the same tiny models as torch."""
    import json

    import gguf

    config = model.config
    arch = gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.eos_token_id)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
