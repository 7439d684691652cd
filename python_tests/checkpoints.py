"""Tiny random Hugging Face checkpoints for the tests, saved by transformers.

Each of the supported architectures gets a small config with odd sizes; the
weights are random (seeded) with a large init scale so that logits are peaked
and greedy decoding is far from ties. A byte-level BPE tokenizer with a chat
template is trained on a paragraph and saved beside the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = (
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
    "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name.\n"
    "HAMLET: To be, or not to be, that is the question. Café naïve 日本語 — 🙂 ✓\n"
) * 4

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ARCHS = ("llama", "llama3", "mistral", "qwen2", "mixtral", "qwen3", "qwen3_moe", "qwen2_moe")
VOCAB = 384


def _config(arch: str, **overrides):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(**{**common, "num_key_value_heads": 4, "tie_word_embeddings": False})
    elif arch == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        cfg = tf.LlamaConfig(**{**common, "num_key_value_heads": 1, "tie_word_embeddings": True}, rope_scaling=rope)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "qwen3":  # head_dim is not hidden / heads
        cfg = tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)
    elif arch == "qwen3_moe":  # layer 0 routes (top-2 of 5, not renormalised), layer 1 is dense
        cfg = tf.Qwen3MoeConfig(**common, head_dim=24, num_experts=5, num_experts_per_tok=2,
                                moe_intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False)
    elif arch == "qwen2_moe":  # layer 0 routes (top-3 of 6, not renormalised) beside the gated shared expert,
        # layer 1 is dense (intermediate_size); q/k/v biases
        cfg = tf.Qwen2MoeConfig(**common, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
                                shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tokenizer(out: Path) -> None:
    """A byte-level BPE with BOS/EOS and chat tokens, saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(str(out))


def make_checkpoint(out: Path, arch: str, dtype: torch.dtype = torch.float32, tokenizer: bool = True, **overrides):
    """Save a random ``arch`` model (and tokenizer) to ``out``; return the HF model."""
    import transformers as tf

    cls = {
        "llama": tf.LlamaForCausalLM,
        "llama3": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "mixtral": tf.MixtralForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
        "qwen3_moe": tf.Qwen3MoeForCausalLM,
        "qwen2_moe": tf.Qwen2MoeForCausalLM,
    }[arch]
    torch.manual_seed(1234)
    model = cls(_config(arch, **overrides)).to(dtype).eval()
    if arch in ("qwen2", "qwen2_moe"):  # biases are zero-initialised; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if arch.startswith("qwen3"):  # the q/k norms start at ones; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(str(out))
    if tokenizer:
        make_tokenizer(out)
    return model


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save a tiny random checkpoint with a tokenizer.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", choices=ARCHS, default="llama3")
    ns = parser.parse_args()
    make_checkpoint(ns.out, ns.arch)
    print(f"saved a random {ns.arch} checkpoint to {ns.out}")
