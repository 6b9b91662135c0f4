"""Pico-size Hugging Face models and checkpoints made offline for the tests."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(**kw) -> LlamaConfig:
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def tiny_model(seed: int = 0, dtype=torch.bfloat16, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**kw)).to(dtype).eval()


def perturbed(model: LlamaForCausalLM, seed: int, scale: float = 0.01) -> LlamaForCausalLM:
    """A copy of `model` with small seeded noise on every parameter (a stand-in fine-tune)."""
    out = LlamaForCausalLM(model.config).to(model.dtype).eval()
    out.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))
    return out


def save(model: LlamaForCausalLM, path: Path, shard: str = "20KB") -> Path:
    """save_pretrained with small shards, so the engine walks several files."""
    model.save_pretrained(path, max_shard_size=shard)
    return Path(path)


def state(path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model directory, read with safetensors' own reader."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out
