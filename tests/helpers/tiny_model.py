"""A tiny random-weight Llama-family model and a tokenizer, built without any download (seconds)."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Translate to French: hello world -> bonjour le monde.",
    "Classify the sentiment: I love this movie -> positive. I hate rain -> negative.",
    "def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9",
    'What is the answer? Yes, no, maybe. Summarize: short text, long text, JSON {"key": 1}.',
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a few sentences, with chat special tokens and a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in SmolLM2
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


ARCHITECTURES = ("llama", "qwen2", "mistral", "qwen3")

# Every decoder family the engine serves (server/model/family.py), each at the Llama fixture's sizes with
# the features that make it differ from Llama switched on at a size the tests reach: sliding windows
# (8 positions) shorter than the tests' sequences, soft-capping, alternating layer types, experts.
FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": {},
    "mistral": {"head_dim": 16, "sliding_window": 8},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {
        "head_dim": 16,
        "sliding_window": 8,
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 5.0,  # small enough that the cap really bends random-weight scores
        "final_logit_softcapping": 4.0,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 8,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {},
    "olmo2": {},
    "mixtral": {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_neox": {},
}
FAMILIES = tuple(FAMILY_OVERRIDES)
_NO_GQA = {"gpt_neox"}  # families whose config has no num_key_value_heads


def _tiny_config(arch: str, vocab_size: int, **overrides):
    """A tiny config of a decoder family (same sizes as the Llama fixture)."""
    if arch == "llama":
        return tiny_llama_config(vocab_size, **overrides)
    from transformers import AutoConfig

    base = tiny_llama_config(vocab_size).to_dict()
    keep = {
        k: base[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
        )
        if not (arch in _NO_GQA and k in ("num_key_value_heads", "rms_norm_eps"))
    }
    if arch == "qwen3":
        keep["head_dim"] = 16
    keep.update(overrides)
    return AutoConfig.for_model(arch, **keep)


def make_tiny_model_dir(path: Path, seed: int = 0, arch: str = "llama", **config_overrides) -> Path:
    """Save a tiny random model of a Llama-family architecture (fp32 safetensors) and its tokenizer
    to `path`; returns `path`. qwen2 has biased q/k/v projections, qwen3 per-head q/k norms."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = _tiny_config(arch, len(tokenizer), **config_overrides)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default init so that different inputs give clearly different greedy tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
