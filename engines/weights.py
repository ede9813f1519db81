"""The weights `hybrid`'s decoder (engines/decoder.py) runs on: references (no copies) to an HF
model's parameters in NamedTuples, read once by `extract`. Supported: OPT, Llama, Qwen2 (Llama
with q/k/v biases), Mistral, GPT-2 families; anything else raises UnsupportedModel.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor, nn


class UnsupportedModel(ValueError):
    pass


class Lin(NamedTuple):
    """y = x @ w.T + b (+ LoRA: ((x @ a.T) @ bb.T) * scale). `t`: w is stored (in, out)."""
    w: Tensor
    b: Optional[Tensor]
    a: Optional[Tensor] = None
    bb: Optional[Tensor] = None
    scale: float = 1.0
    t: bool = False
    packed: Optional[Tensor] = None  # MKL-packed copy of w for `rows`-row inputs (a 2nd copy!)
    rows: int = 0


class Norm(NamedTuple):
    w: Tensor
    b: Optional[Tensor]
    eps: float
    rms: bool


class Layer(NamedTuple):
    ln1: Norm
    qkv: tuple          # (q, k, v) Lins, or one fused Lin (GPT-2's c_attn)
    o: Lin
    ln2: Norm
    up: Lin             # fc1 / c_fc / up_proj
    gate: Optional[Lin]  # Llama's gate_proj
    down: Lin


class Weights(NamedTuple):
    family: str
    embed: Tensor            # (V, E)
    pos: Optional[Tensor]    # learned positions (OPT: offset 2), or None
    pos_offset: int
    proj_in: Optional[Lin]
    layers: tuple
    final: Optional[Norm]
    proj_out: Optional[Lin]
    head: Lin                # vocabulary projection
    n_heads: int
    n_kv: int
    head_dim: int
    pre_norm: bool
    act: str
    inv_freq: Optional[Tensor]
    rope_scale: float
    # sliding-window attention's span (HF lets a query see keys fewer than `window` slots
    # back): this decoder attends to every key, so it serves only sequences that fit in it
    window: Optional[int] = None


# RoPE types whose frequencies HF fixes when it builds the model (Llama 3's and YaRN's scaling
# included): the decoder reads them, and YaRN's attention scale, from the rotary module. Types
# that recompute them from the sequence length in every forward (dynamic, longrope) are refused.
FIXED_ROPE = ("default", "linear", "llama3", "yarn")


def _lin(m: nn.Module, t: bool = False) -> Lin:
    """A Linear (or GPT-2 Conv1D), unwrapping a PEFT LoRA layer into base + adapters."""
    if hasattr(m, "base_layer") and hasattr(m, "lora_A"):
        if len(m.active_adapters) != 1:
            raise UnsupportedModel("exactly one active LoRA adapter is supported")
        name = m.active_adapters[0]
        base = _lin(m.base_layer, t)
        return base._replace(a=m.lora_A[name].weight, bb=m.lora_B[name].weight,
                             scale=float(m.scaling[name]))
    return Lin(m.weight, m.bias, t=t)


def _norm(m: nn.Module, rms: bool = False) -> Norm:
    eps = getattr(m, "eps", None) or getattr(m, "variance_epsilon", 1e-6)
    return Norm(m.weight, getattr(m, "bias", None), float(eps), rms)


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def extract(model: nn.Module) -> Weights:
    m = _base(model)
    cfg = m.config
    kind = cfg.model_type
    if kind == "opt":
        d = m.model.decoder
        if getattr(cfg, "_remove_final_layer_norm", False):
            raise UnsupportedModel("OPT with _remove_final_layer_norm is not supported")
        H = cfg.num_attention_heads
        layers = tuple(Layer(_norm(l.self_attn_layer_norm),
                             (_lin(l.self_attn.q_proj), _lin(l.self_attn.k_proj),
                              _lin(l.self_attn.v_proj)), _lin(l.self_attn.out_proj),
                             _norm(l.final_layer_norm), _lin(l.fc1), None, _lin(l.fc2))
                       for l in d.layers)
        return Weights("opt", d.embed_tokens.weight, d.embed_positions.weight, 2,
                       _lin(d.project_in) if d.project_in is not None else None, layers,
                       _norm(d.final_layer_norm) if d.final_layer_norm is not None else None,
                       _lin(d.project_out) if d.project_out is not None else None,
                       _lin(m.lm_head), H, H, cfg.hidden_size // H, cfg.do_layer_norm_before,
                       cfg.activation_function, None, 1.0)
    if kind in ("llama", "qwen2", "mistral"):  # Qwen2's q/k/v biases are the Lins' own
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") not in FIXED_ROPE:
            raise UnsupportedModel(f"{kind} rope type {rope.get('rope_type')!r} is not supported "
                                   f"(supported: {', '.join(FIXED_ROPE)})")
        if cfg.hidden_act != "silu":
            raise UnsupportedModel(f"{kind} activation {cfg.hidden_act!r} is not supported")
        window = getattr(cfg, "sliding_window", None) if kind == "mistral" else None
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):  # Qwen2's layers
            window = cfg.sliding_window
        b = m.model
        layers = tuple(Layer(_norm(l.input_layernorm, True),
                             (_lin(l.self_attn.q_proj), _lin(l.self_attn.k_proj),
                              _lin(l.self_attn.v_proj)), _lin(l.self_attn.o_proj),
                             _norm(l.post_attention_layernorm, True), _lin(l.mlp.up_proj),
                             _lin(l.mlp.gate_proj), _lin(l.mlp.down_proj))
                       for l in b.layers)
        H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        rot = b.rotary_emb
        return Weights(kind, b.embed_tokens.weight, None, 0, None, layers,
                       _norm(b.norm, True), None, _lin(m.lm_head), H, KV, hd, True, "silu",
                       rot.inv_freq, float(getattr(rot, "attention_scaling", 1.0)), window)
    if kind == "gpt2":
        if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn:
            raise UnsupportedModel("GPT-2 with scale_attn_by_inverse_layer_idx or "
                                   "reorder_and_upcast_attn is not supported")
        t = m.transformer
        layers = tuple(Layer(_norm(l.ln_1), (_lin(l.attn.c_attn, True),),
                             _lin(l.attn.c_proj, True), _norm(l.ln_2), _lin(l.mlp.c_fc, True),
                             None, _lin(l.mlp.c_proj, True)) for l in t.h)
        H = cfg.n_head
        return Weights("gpt2", t.wte.weight, t.wpe.weight, 0, None, layers, _norm(t.ln_f),
                       None, _lin(m.lm_head), H, H, cfg.n_embd // H, True,
                       cfg.activation_function, None, 1.0)
    raise UnsupportedModel(f"the hybrid engine has no decoder for model type {kind!r} "
                           f"(supported: opt, llama, qwen2, mistral, gpt2)")
