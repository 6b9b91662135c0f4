"""Pico-size Hugging Face models and checkpoints made offline for the tests."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(**kw) -> LlamaConfig:
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
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


def train_lora(base, path: Path, seed: int, steps: int = 3, **lora_kw) -> Path:
    """A real (tiny) LoRA fine-tune: a few AdamW steps on seeded random tokens, saved with PEFT.

    Both factors end up non-zero (B starts at zero and moves on the first step)."""
    from peft import LoraConfig, get_peft_model

    cfg = dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["lm_head", "embed_tokens"],
    )
    cfg.update(lora_kw)
    model = type(base)(base.config).to(torch.float32)
    model.load_state_dict(base.state_dict())
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    vocab = base.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 16), generator=g)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(path)
    return Path(path)


def merged(base, adapter_dir) -> dict[str, torch.Tensor]:
    """PEFT's own merge of an adapter into a copy of `base` (the reference cws never needs)."""
    from peft import PeftModel

    model = type(base)(base.config).to(torch.float32)
    model.load_state_dict(base.state_dict())
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


def save_state(sd: dict[str, torch.Tensor], path: Path, like: Path | None = None) -> Path:
    """A state dict as a one-file HF model directory (model.safetensors), with the non-weight files
    (config.json, ...) of model directory `like` copied in."""
    import shutil

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if like is not None:
        for f in Path(like).iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".index.json")):
                shutil.copyfile(f, path / f.name)
    save_file({k: v.contiguous() for k, v in sd.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return path


def random_checkpoint(path: Path, seed: int = 0, dtype=torch.bfloat16, **kw) -> Path:
    """A Llama-shaped HF model directory of seeded random weights, made without building the model
    (fast even for a real-size vocabulary)."""
    cfg = tiny_config(**kw)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {n: (0.02 * torch.randn(s, generator=g)).to(dtype) for n, s in shapes.items()}
    cfg.torch_dtype = dtype
    Path(path).mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    return save_state(sd, path)


TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<s>"]


def tiny_chat_model(
    path: Path, texts: list[str], template: str | None = TEMPLATE, seed: int = 0, tie: bool = False
) -> Path:
    """A tiny random Llama with a word-level tokenizer over the words of `texts`, and a chat template
    (none for template=None: plain-text prompts, with bos/eos tokens)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in texts for w, _ in Whitespace().pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        bos_token=None if template else "<s>",
        additional_special_tokens=SPECIALS[2:5],
    )
    tok.chat_template = template
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=vocab["<|end|>"],
        bos_token_id=None if template else vocab["<s>"],
        tie_word_embeddings=tie,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fp64_entries(direction) -> dict:
    """Every entry of a direction as its dense delta in fp64 (low-rank factors multiplied in fp64)."""
    import cws

    d = cws.Direction.open(direction)
    read = d.checkpoint.read
    return {
        n: read(n).double() if e.kind == "dense" else read(e.B.name).double() @ read(e.A.name).double() * e.scale
        for n, e in d.entries.items()
    }
