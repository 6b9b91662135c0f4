"""Where a tensor sits in a transformer: its layer index and module type, from its name.

Module types follow the method's words: q/k/v/o attention projections, gate/up/down MLP
projections, embed (token embeddings), head (lm_head), norm, bias, other.
"""

import re

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_MODULES = [
    ("qkv", re.compile(r"(qkv_proj|c_attn|query_key_value|Wqkv)\b")),
    ("q", re.compile(r"(q_proj|query|\.wq)\b")),
    ("k", re.compile(r"(k_proj|key|\.wk)\b")),
    ("v", re.compile(r"(v_proj|value|\.wv)\b")),
    ("o", re.compile(r"(o_proj|out_proj|dense\b|c_proj|\.wo)\b")),
    ("gate", re.compile(r"(gate_proj|w1|gate_up_proj)\b")),
    ("up", re.compile(r"(up_proj|w3|c_fc|fc1|dense_h_to_4h)\b")),
    ("down", re.compile(r"(down_proj|w2|fc2|dense_4h_to_h)\b")),
    ("embed", re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\b")),
    ("head", re.compile(r"(lm_head|embed_out|output)\.weight$")),
    ("norm", re.compile(r"(norm|ln_\w*|layernorm)\b", re.IGNORECASE)),
]
EMBEDDING_MODULES = ("embed", "head")
MLP_BIAS = re.compile(r"\.mlp\.(gate|up|down)_proj\.bias$")  # the biases a config's mlp_bias switch gives each layer


def layer_of(name: str) -> int | None:
    """The transformer block index in a tensor name, or None (embeddings, final norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str:
    """Module type of a tensor: q k v qkv o gate up down embed head norm bias other."""
    for kind, pattern in _MODULES:
        if pattern.search(name):
            return kind
    return "bias" if name.endswith(".bias") else "other"


def is_embedding(name: str) -> bool:
    """True for token embeddings and the LM head (they can dominate a global cosine)."""
    return module_of(name) in EMBEDDING_MODULES
