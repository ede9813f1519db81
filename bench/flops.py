"""FLOP and byte counts for a PPO step, from a model's shape.

Counts are matmul FLOPs (2 per multiply-add): the linear layers and the two attention products
(QK^T and AV). The vocabulary projection is counted only where logits are computed: the last
prompt position in prefill (generate keeps one), each decode step, and the G+1 positions that
scoring and training keep (core.models.answer_logits). Norms, softmax and elementwise work
are left out; they are a few percent at these sizes. The harness counts a live model's shape
(shape_of); the scale projection builds the same Shape from an architecture
(bench/projection/counts.flop_shape), so an efficiency measured here means the same there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from torch import nn


class Shape(NamedTuple):
    linear_params: int     # weights of every matmul in one forward, head included
    head_params: int       # the vocabulary projection's share of linear_params
    n_layers: int
    attn_width: int        # heads * head_dim (width of QK^T and AV)
    kv_width: int          # kv_heads * head_dim (width of one cached K or V row)
    weight_bytes: int      # bytes read by one decode step: every linear weight


def shape_of(model: nn.Module, config) -> Shape:
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    lin = head = nbytes = 0
    head_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for m in model.modules():
        if isinstance(m, (nn.Linear, Conv1D)):
            lin += m.weight.numel()
            nbytes += m.weight.numel() * m.weight.element_size()
            if m is head_mod:
                head = m.weight.numel()
    return Shape(lin, head, *attention_widths(config), nbytes)


def attention_widths(config) -> tuple[int, int, int]:
    """(layers, heads * head_dim, kv_heads * head_dim) of a transformers config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return layers, heads * head_dim, kv_heads * head_dim


def forward_flops(s: Shape, batch: int, new: int, past: int = 0, logits: int | None = None) -> int:
    """A causal forward of `new` tokens per row after `past` cached ones, with the vocabulary
    projection at `logits` of those positions (all of them by default; 0: no LM head)."""
    logits = new if logits is None else logits
    body = s.linear_params - s.head_params
    ctx_sum = new * past + new * (new + 1) // 2  # sum of context lengths seen by each new token
    return batch * (2 * body * new + 2 * s.head_params * logits
                    + 4 * s.n_layers * s.attn_width * ctx_sum)


def generate_flops(s: Shape, batch: int, prompt: int, gen: int) -> int:
    """Prefill of the prompt (logits at its last position: token 1), then gen-1 decode steps."""
    total = forward_flops(s, batch, prompt, logits=1)
    for t in range(gen - 1):
        total += forward_flops(s, batch, 1, past=prompt + t)
    return total


def score_flops(actor: Shape, critic: Shape, batch: int, prompt: int, gen: int,
                reference: Shape | None = None) -> int:
    """Actor and reference log-probs (logits at the G+1 answer-emitting positions), critic
    values and reward: four forwards of P+G tokens. The reference is the actor's shape unless
    given (an actor with LoRA adapters scores against its base)."""
    T = prompt + gen
    return (forward_flops(actor, batch, T, logits=gen + 1)
            + forward_flops(actor if reference is None else reference, batch, T, logits=gen + 1)
            + 2 * forward_flops(critic, batch, T, logits=0))


def train_flops(actor: Shape, critic: Shape, batch: int, prompt: int, gen: int, *,
                recompute: bool = False, trained: int | None = None) -> int:
    """Forward + backward of actor and critic over P+G tokens: the backward is a forward's worth
    of activation grads and one of weight grads (the 6N per token rule: ~3 forwards). `trained`:
    only that many of the actor's weights take weight grads (LoRA adapters on a frozen base,
    counted in actor.linear_params), 2 FLOPs each per token. `recompute`: activation
    checkpointing runs each forward once more."""
    T = prompt + gen
    fa = forward_flops(actor, batch, T, logits=gen + 1)
    fc = forward_flops(critic, batch, T, logits=0)
    weight_grads = fa if trained is None else 2 * trained * batch * T
    return (2 + recompute) * (fa + fc) + weight_grads + fc


def kv_bytes(s: Shape, batch: int, ctx: int, dtype_bytes: int) -> int:
    """Bytes of K and V cached for `ctx` positions, all layers."""
    return batch * ctx * 2 * s.n_layers * s.kv_width * dtype_bytes


def decode_step_bytes(s: Shape, batch: int, ctx: int, dtype_bytes: int) -> int:
    """Bytes one decode step reads: every weight once (shared by the batch) + each row's KV
    cache of `ctx` earlier positions."""
    return s.weight_bytes + kv_bytes(s, batch, ctx, dtype_bytes)


def decode_roofline_s(s: Shape, batch: int, prompt: int, gen: int, dtype_bytes: int,
                      peak_flops: float, mem_bw: float) -> float:
    """Least time the hardware allows for generate: prefill at peak FLOP/s, then every decode
    step bound by max(weight + KV bytes read / bandwidth, FLOPs / peak)."""
    total = forward_flops(s, batch, prompt, logits=1) / peak_flops
    for t in range(gen - 1):
        ctx = prompt + t
        step_bytes = decode_step_bytes(s, batch, ctx, dtype_bytes)
        total += max(step_bytes / mem_bw, forward_flops(s, batch, 1, past=ctx) / peak_flops)
    return total
