"""Tiny, seeded, randomly initialised causal LMs of each supported family, and a byte-level tokenizer.

They run in milliseconds, so the calibration runner is tested on the real transformers code of every
family (attention masks, rotary embeddings, Gemma's embedding scale, OPT's learned positions, Qwen2's
and Gemma 3's sliding-window layers) without any download.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gemma", "gemma3")
VOCAB = 260  # 256 byte-level symbols + 4 specials


def tiny_config(family: str, hidden: int = 64, layers: int = 3, vocab: int = VOCAB):
    """A small config of ``family``: ``hidden`` wide, MLP 2x wider, 4 heads (GQA where supported)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return tf.LlamaConfig(intermediate_size=2 * hidden, num_key_value_heads=2, **common)
    if family == "mistral":
        return tf.MistralConfig(intermediate_size=2 * hidden, num_key_value_heads=2, sliding_window=None, **common)
    if family == "qwen2":
        # Sliding-window attention on the upper layers: each layer gets its own mask kind.
        return tf.Qwen2Config(
            intermediate_size=2 * hidden,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=1,
            **common,
        )
    if family == "qwen3":  # q/k norms, tied embeddings
        common["tie_word_embeddings"] = True
        return tf.Qwen3Config(intermediate_size=2 * hidden, num_key_value_heads=2, head_dim=hidden // 4, **common)
    if family == "opt":
        common.pop("max_position_embeddings")
        return tf.OPTConfig(
            ffn_dim=2 * hidden,
            word_embed_proj_dim=hidden,
            max_position_embeddings=256,
            do_layer_norm_before=True,
            **common,
        )
    if family == "gemma":
        return tf.GemmaConfig(intermediate_size=2 * hidden, num_key_value_heads=1, head_dim=hidden // 4, **common)
    if family == "gemma3":
        # Gemma 3's text decoder: sliding-window layers (window 16) alternating with full-attention ones, each
        # kind with its own RoPE base, sandwich norms, q/k norms, a query scale that is not head_dim^-0.5 and
        # a tied lm_head, as in the real 270M model (5 sliding : 1 full, window 512)
        common["tie_word_embeddings"] = True
        return tf.Gemma3TextConfig(
            intermediate_size=2 * hidden,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            query_pre_attn_scalar=24,
            sliding_window=16,
            layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(layers)],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
            **common,
        )
    raise ValueError(f"unknown family {family!r}")


def tiny_model(family: str, seed: int = 0, hidden: int = 64, layers: int = 3):
    """A randomly initialised model of ``family`` in eval mode (same seed -> same weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, hidden, layers))
    if family == "gemma3":
        # its RMSNorms scale by (1 + w) and initialise w to 0: random w makes the graph, SmoothQuant's folds and
        # the calibration runner see the (1 + w) form rather than an identity
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
    model.eval()
    return model


def tiny_tokenizer():
    """A byte-level tokenizer with no merges: any text maps to ~1 token per byte, vocab 260."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny(family: str, out: Path, seed: int = 0, hidden: int = 64, layers: int = 3) -> Path:
    """Write a Hugging Face folder (safetensors + tokenizer) of a tiny model; returns ``out``."""
    model = tiny_model(family, seed, hidden, layers)
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out)
    return Path(out)


#: a 4x8 layer and its input norms^2 s = [1,4,9,16,1,4,9,16] (so sqrt(s) = [1,2,3,4,1,2,3,4] exactly): pure
#: maths is checked on it by hand
W48 = torch.tensor(
    [
        [1.0, -2, 3, -4, 5, -6, 7, -8],
        [8, 7, -6, 5, -4, 3, -2, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [-3, 0, 2, -1, 4, -2, 1, 3],
    ]
)
S48 = torch.tensor([1.0, 4, 9, 16, 1, 4, 9, 16], dtype=torch.float64)


def calib_ids(nsamples: int = 8, seqlen: int = 32, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Random calibration windows ``[nsamples, seqlen]`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (nsamples, seqlen), generator=gen)
