"""Tiny random-weight models of every supported family, for structure tests."""
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False)

CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**COMMON, **kw}),
    "llama-mha": lambda **kw: LlamaConfig(**{**COMMON, "num_key_value_heads": 4, "attention_bias": True, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**COMMON, "sliding_window": None, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**COMMON, "use_sliding_window": False, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**COMMON, "head_dim": 16, "use_sliding_window": False, **kw}),
}
FAMILIES = list(CONFIGS)


def tiny_model(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = CONFIGS[family](**kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init leaves norms at 1 and biases at 0: perturb them so a test
    # sees whether they are carried over correctly
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(5.0)  # larger weights: layers that change the residual stream visibly
    return model.eval()


def tokens(n=6, T=16, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, T), generator=g)


def bpe_tokenizer(corpus, vocab_size: int = 400):
    """A small byte-level BPE tokenizer trained on ``corpus`` (byte-level like
    SmolLM2's, so " yes" is one token with its space, and any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(list(corpus) * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
