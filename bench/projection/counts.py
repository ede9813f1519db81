"""Counts from an architecture (presets.Arch), checkable by hand: parameters, the FLOP shape the
harness's bench/flops.py prices, activations kept for backward, and collective bytes.
Units: parameters, bytes; bf16 = 2 bytes.
"""
from __future__ import annotations

from ..flops import Shape
from .presets import CRITIC_MODEL, MODELS, Arch

BF16 = 2              # bytes per bf16 value (weights, grads, activations, KV cache, logits)


def default_critic(actor: str) -> str:
    """DeepSpeed-Chat pairs every OPT actor with an OPT-350m critic and reward model; its Llama-2
    scripts, like most recipes for other families, start them from the actor's own shape (a
    critic reads the actor's tokens, so it shares its tokenizer)."""
    arch = MODELS.get(actor)
    return CRITIC_MODEL if arch is None or arch.family == "opt" else actor


def model_arch(name: str) -> Arch:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]


def layer_matmul_params(s: Arch) -> int:
    """One layer's linear weights: q and o (d x d), k and v (d x kv; kv = d without grouped-query
    attention), and the MLP's two matrices (d x ffn; three when gated)."""
    return 2 * s.d_model ** 2 + 2 * s.d_model * s.kv + (3 if s.gated else 2) * s.d_model * s.ffn


def param_count(s: Arch) -> int:
    """OPT: per layer the linears + 4 d (q,k,v,o biases) + ffn + d (fc1, fc2 biases) + 4 d (2
    layernorms); token embedding V e (tied with the LM head); positions (P_max + 2) d (OPT offsets
    them by 2); final layernorm 2 d; OPT-350m's projections 2 e d. Llama family: per layer the
    linears + 2 d (2 RMSNorms) + d + 2 kv (Qwen2's q,k,v biases); embedding V d, and as much
    again for an untied head; final RMSNorm d."""
    d, f, L = s.d_model, s.ffn, s.layers
    if s.family == "llama":
        per_layer = layer_matmul_params(s) + 2 * d + (d + 2 * s.kv) * s.qkv_bias
        return L * per_layer + s.vocab * d * (1 if s.tied else 2) + d
    n = L * (layer_matmul_params(s) + 9 * d + f) + s.vocab * s.e + (s.positions + 2) * d
    return n + 2 * d * s.final_norm + (2 * s.e * d if s.e != d else 0)


def matmul_params(s: Arch, lm_head: bool = True) -> int:
    """Weights each token multiplies through: every layer's linears, the projections, and the
    LM head (V e) or a value head (e) for critic and reward models."""
    proj = 2 * s.e * s.d_model if s.e != s.d_model else 0
    return s.layers * layer_matmul_params(s) + proj + (s.vocab * s.e if lm_head else s.e)


def lora_param_count(s: Arch, r: int) -> int:
    """LoRA on every decoder linear: q and o add r (d + d), k and v r (d + kv), each MLP matrix
    (two, or three when gated) r (d + ffn)."""
    d = s.d_model
    return s.layers * r * (2 * 2 * d + 2 * (d + s.kv) + (3 if s.gated else 2) * (d + s.ffn))


def flop_shape(s: Arch, lm_head: bool = True, adapters: int = 0) -> Shape:
    """The Shape bench/flops.py counts, of bf16 weights: the LM head (V e) or a value head (e)
    for critic and reward models; `adapters` unfused LoRA weights run beside the linears (as
    the harness counts a PEFT model's)."""
    linear = matmul_params(s, lm_head) + adapters
    return Shape(linear_params=linear, head_params=s.vocab * s.e if lm_head else 0,
                 n_layers=s.layers, attn_width=s.d_model, kv_width=s.kv,
                 weight_bytes=linear * BF16)


def layer_activation_bytes(s: Arch, batch: float, seq: int) -> float:
    """16-bit activations one layer keeps for backward (Korthikanti et al. 2022): s b d (34 +
    5 a s / d) bytes for an OPT layer. Their terms, written per width: attention 7 d + 4 kv
    (K and V are kv wide; one d is the output's dropout mask), 2 norms 4 d, MLP 3 d + 4 ffn,
    scores 5 a s (softmax output, dropout mask and output). The Llama family has no dropout:
    attention 6 d + 4 kv, scores 2 a s; its gated MLP keeps its input (2 d) and four ffn-wide
    tensors (gate, up, the activation, the product: 8 ffn)."""
    d, f, dropout = s.d_model, s.ffn, s.family == "opt"
    mlp = 2 * d + 8 * f if s.gated else 3 * d + 4 * f
    attn = (6 + dropout) * d + 4 * s.kv
    return batch * seq * (attn + 4 * d + mlp) + (5 if dropout else 2) * s.heads * seq * seq * batch


def train_activation_bytes(s: Arch, batch: float, seq: int, ckpt: bool,
                           lm_head: bool = True) -> float:
    """Checkpointing keeps each layer's input (2 s b d bytes) + the layer being recomputed;
    without it every layer's activations stay. Logits: bf16 logits, log-softmax, gradient."""
    layers = (s.layers * BF16 * batch * seq * s.d_model + layer_activation_bytes(s, batch, seq)
              if ckpt else s.layers * layer_activation_bytes(s, batch, seq))
    return layers + (3 * BF16 * s.vocab * batch * seq if lm_head else 0)


def zero3_fetches(s: Arch, lm_head: bool = True) -> list[tuple[int, int]]:
    """(values, count) of each weight ZeRO-3 all-gathers on its own in one forward, the token
    embedding first. DeepSpeed-Chat's config keeps tensors under 1e4 values whole
    (stage3_param_persistence_threshold), so norms and biases are never fetched and every weight
    matrix is: q and o (d x d), k and v (d x kv), the MLP's two or three (d x ffn); OPT's
    positions and, at OPT-350m, its two projections (e x d); an untied head."""
    d, L = s.d_model, s.layers
    out = [(s.vocab * s.e, 1), (d * d, 2 * L), (d * s.kv, 2 * L),
           (d * s.ffn, (3 if s.gated else 2) * L)]
    if s.family == "opt":
        out.append(((s.positions + 2) * d, 1))
    if s.e != d:
        out.append((s.e * d, 2))
    if lm_head and not s.tied:
        out.append((s.vocab * d, 1))
    return out


def all_gather_bytes(total_bytes: float, n: int) -> float:
    """Bytes each of n ranks receives in a ring all-gather of `total_bytes` ((n-1)/n of it);
    a reduce-scatter moves the same, an all-reduce twice that."""
    return total_bytes * (n - 1) / n


def zero3_gather_bytes(s: Arch, n: int) -> float:
    """Bytes per GPU to all-gather one full bf16 copy of a ZeRO-3-sharded model over n ranks."""
    return all_gather_bytes(param_count(s) * BF16, n)
