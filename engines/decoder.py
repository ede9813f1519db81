"""A decoder forward over the training module's own parameters, with a static KV cache.

`extract` (engines/weights.py) reads references (no copies) to an HF model's weights into
NamedTuples; `forward_` runs new tokens through them, writing K/V into the cache. Because the
tensors are the live parameters, an optimiser step is seen by the next call with nothing to
copy or recompile. LoRA adapters run unfused here (engines/lora_fold.py folds them in).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels as K
# the weights' types and their reading from a model, part of this module's interface
from .weights import Lin, Norm, UnsupportedModel, Weights, extract  # noqa: F401


SMALL_M = 64  # rows at or below which W @ x.T beats x @ W.T (measured: docs/performance.md)


def _cpu_generation(device: torch.device) -> bool:
    """Whether engines/kernels.py may run: on the CPU, eager, and under no_grad (its kernels
    carry no autograd: with gradients on, the ATen path)."""
    return (device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch.is_grad_enabled())


def _cpu_kernels_apply(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the project's own kernels may run: fp32 or bf16, and _cpu_generation."""
    return dtype in K.DTYPES and _cpu_generation(device)


def lin(x: Tensor, L: Lin, relu: bool = False) -> Tensor:
    """x (.., in) through L, then ReLU if relu (fused into the CPU generation path's linears)."""
    if L.packed is not None and x.shape[:-1].numel() == L.rows:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkl._mkl_linear(x2, L.packed, L.w, L.b, L.rows)
        y = y.reshape(*x.shape[:-1], L.w.shape[0])
    elif not L.t and _cpu_generation(x.device):
        # generation on the CPU, reading W as it lies: decode's few rows through the
        # project's kernel (bias added in it), more rows through oneDNN (engines/kernels.py)
        x2 = x.reshape(-1, x.shape[-1])
        fused = relu and L.a is None   # with LoRA, ReLU comes after the adapters' sum
        if x2.shape[0] <= K.max_rows(L.w.dtype):
            y = K.skinny_linear(x2, L.w, L.b, relu=fused)
        else:
            y = K.dense_linear(x2, L.w, L.b, relu=fused)
        relu = relu and not fused
        y = y.reshape(*x.shape[:-1], -1)
    else:
        if L.t:
            y = x @ L.w
        elif x.shape[:-1].numel() <= SMALL_M:
            # decode off the CPU generation path above (a GPU, or gradients on): stream W once
            # as the left operand, (N, K) @ (K, M), measured on the CPU before that path took
            # its rows; values and layout as F.linear's (a transposed result, q among others,
            # sent bf16 decode attention to SDPA's math fallback: generate 1.2x slower)
            x2 = x.reshape(-1, x.shape[-1])
            y = (L.w @ x2.t()).t().contiguous().reshape(*x.shape[:-1], L.w.shape[0])
        else:
            y = F.linear(x, L.w)
        if L.b is not None:
            y = y + L.b
    if L.a is not None:
        # LoRA unfused: two thin matmuls, exact, and the base weight is never modified
        y = y + _lora(x, L)
    return F.relu(y) if relu else y


def _lora(x: Tensor, L: Lin) -> Tensor:
    """scale * (x @ A.T) @ B.T in the adapters' dtype (PEFT keeps adapters of a bf16 model in
    fp32 by default), returned in x's."""
    return (((x.to(L.a.dtype) @ L.a.t()) @ L.bb.t()) * L.scale).to(x.dtype)


def lins(w: Weights):
    """Every Lin slot of w (None where a model has no such linear), in map_lins's order."""
    for l in w.layers:
        yield from l.qkv
        yield from (l.o, l.up, l.gate, l.down)
    yield from (w.proj_in, w.proj_out, w.head)


def map_lins(w: Weights, f) -> Weights:
    """w with every Lin slot (None included) replaced by f(slot)."""
    layers = tuple(l._replace(qkv=tuple(f(x) for x in l.qkv), o=f(l.o), up=f(l.up),
                              gate=f(l.gate), down=f(l.down)) for l in w.layers)
    return w._replace(layers=layers, proj_in=f(w.proj_in), proj_out=f(w.proj_out),
                      head=f(w.head))


def norm(x: Tensor, n: Norm) -> Tensor:
    if n.rms:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + n.eps)
        return n.w * xf.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), n.w, n.b, n.eps)


_ACT = {"relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu": F.gelu, "silu": F.silu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, S, D); cos/sin (B, 1, S, D)."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, kernel: bool = True,
              first: Optional[Tensor] = None) -> Tensor:
    """q (B, H, S, D); k, v (B, KV, end, D) views of the cache; mask (B, 1, S, end) bool.
    first: (B,) int64 or None; given, the mask is causal over left-padded rows whose real
    tokens are slots first[b] onwards, and the chunk's queries are slots end - S onwards
    (outputs at padded queries are then zeros, and mean nothing: the caller drops them).
    kernel=False: SDPA for CPU decode and prefill too (A/B timing, tests)."""
    B, H, S, D = q.shape
    KV = k.shape[1]
    if first is not None and kernel and _cpu_kernels_apply(q.device, q.dtype):
        # a prefill chunk on the CPU: each row's causal pairs over its real tokens alone
        out = K.prefill_attention(q, k, v, first, k.shape[2] - S, 1.0 / math.sqrt(D))
        if out is not None:
            return out
    if S == 1 and kernel and _cpu_kernels_apply(q.device, q.dtype):
        # decode on the CPU: engines/kernels.py reads K and V once per KV head
        out = K.decode_attention(q, k, v, mask.reshape(B, -1), 1.0 / math.sqrt(D))
        if out is not None:
            return out
    if S > 1 or q.device.type == "cpu":
        # other CPU decode (fp16, or without the kernel) too: SDPA's flash kernel reads the
        # strided cache views as they are.
        # The matmuls below ran 6-8% slower there in fp32, and in bf16 they went through
        # oneDNN, which kept a primitive with a K-sized scratchpad for every new key length
        # (+659 MB over one 128-token generate at opt-125m, batch 8)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(D),
                                              enable_gqa=KV != H)
    # decode on a GPU, where it is compiled into one CUDA graph: two batched matmuls on the
    # cache views
    qg = q.reshape(B, KV, H // KV, D) * (1.0 / math.sqrt(D))        # (B, KV, H/KV, D)
    s = torch.matmul(qg, k.transpose(-1, -2))                       # (B, KV, H/KV, end)
    s = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.matmul(s, v).reshape(B, H, 1, D)


class KVCache(NamedTuple):
    """Static cache: k, v are tuples of one (B, KV, T_max, D) tensor per layer, preallocated
    once per (B, T_max). One tensor per layer, not one (L, ...) tensor: a compiled write into a
    slice of a graph input copies the whole input (inductor measured 50 ms against 0.2 ms for
    four 12 MB layers on CPU), while a write into a whole input stays in place."""
    k: tuple
    v: tuple


def check_window(w: Weights, length: int) -> None:
    """Refuse a sequence longer than the model's sliding window: hf would mask keys there that
    this decoder attends to. Up to the window the two are the same computation."""
    if w.window is not None and length > w.window:
        raise UnsupportedModel(f"{w.family}'s sliding window is {w.window} tokens and these "
                               f"sequences are {length}: the hybrid decoder attends to every "
                               f"key, so it serves sequences up to the window only")


def new_cache(w: Weights, batch: int, max_len: int, dtype, device) -> KVCache:
    shape = (batch, w.n_kv, max_len, w.head_dim)
    return KVCache(*(tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in w.layers)
                     for _ in "kv"))


def forward_(w: Weights, cache: KVCache, ids: Tensor, pos: Tensor, start: int, key_mask: Tensor,
             logits: bool = True, *, attn_kernel: bool = True) -> Tensor | None:
    """Run `ids` (B, S) at cache slots start..start+S-1; returns last-position logits (B, V),
    or None with logits=False (a prefill chunk that only fills the cache).

    pos: (B, S) position ids (padding skipped). key_mask: (B, >= start+S) bool, True on real
    keys. Attention reads only the filled part of the cache (shapes change every step).
    attn_kernel=False: CPU decode and prefill attend through SDPA, not engines/kernels.py.
    """
    B, S = ids.shape
    end = start + S
    # (B, 1, S, end): causal within the new tokens, and no padded keys
    causal = torch.ones(S, end, dtype=torch.bool, device=ids.device).tril(diagonal=start)
    own = torch.eye(S, end, dtype=torch.bool, device=ids.device).roll(start, dims=1)
    # every query sees itself: a padded query must not see an empty row (SDPA would give NaN,
    # which reaches the cache); real queries never look at padded keys, so this is harmless
    mask = (causal[None, None] & key_mask[:, None, None, :end]) | own[None, None]

    def kv(i, k, v):
        cache.k[i][:, :, start:end] = k
        cache.v[i][:, :, start:end] = v
        return cache.k[i][:, :, :end], cache.v[i][:, :, :end]

    # a prefill chunk on the CPU with padding in it: the per-token work runs on its real tokens
    # only (left-padded prompts are mostly padding in their first chunks)
    real = key_mask[:, start:end] if S > 1 and ids.device.type == "cpu" else None
    first = None
    if real is not None:
        # each row's first real slot, where its keys are all real from there on (left padding)
        keys = key_mask[:, :end].bool()
        first = (~keys).sum(1)
        if not bool((keys == (torch.arange(end, device=ids.device) >= first[:, None])).all()):
            first = None
        if bool(real.all()) and not _ragged(B * S, w.embed.dtype):
            real = None   # nothing to pack (else _run's row copies make the count whole)
    return _run(w, ids, pos, mask, kv, logits, attn_kernel, real, first)


def decode_static_(w: Weights, cache: KVCache, ids: Tensor, pos: Tensor, slot: Tensor,
                   key_mask: Tensor, *, attn_kernel: bool = True) -> Tensor:
    """One token per row (ids (B, 1)) written at cache slot `slot` (a 0-d int64 tensor);
    key_mask (B, T_max) covers the whole cache.

    Attention spans the whole cache under a mask, so every shape is fixed from step to step:
    the form CUDA graphs (torch.compile mode="reduce-overhead") need. Same values as `forward_`.
    """
    T = cache.k[0].shape[2]
    idx = torch.arange(T, device=ids.device)
    mask = ((key_mask & (idx <= slot)) | (idx == slot))[:, None, None, :]   # (B, 1, 1, T)
    where = slot.reshape(1)

    def kv(i, k, v):
        cache.k[i].index_copy_(2, where, k)
        cache.v[i].index_copy_(2, where, v)
        return cache.k[i], cache.v[i]

    return _run(w, ids, pos, mask, kv, True, attn_kernel)


def _run(w: Weights, ids: Tensor, pos: Tensor, mask: Tensor, kv, logits: bool = True,
         attn_kernel: bool = True, real: Optional[Tensor] = None,
         first: Optional[Tensor] = None) -> Tensor | None:
    """The decoder stack; `kv(layer, k, v)` stores the new keys/values and returns the keys and
    values to attend over.

    real: (B, S) bool or None. Given, the per-token work (linears, norms, residuals) runs on
    the real tokens alone, packed as (T, E) rows (and copies of the first up to a multiple of
    K.DENSE_ROWS where dense_linear takes them); only attention sees the (B, S) layout, with
    zeros at the padded positions (their keys are masked, their outputs dropped).
    first: (B,) or None, as attention() takes it."""
    B, S = ids.shape
    sel = rows = None if real is None else real.reshape(-1).nonzero().squeeze(1)   # (T,)
    if sel is not None and _ragged(sel.numel(), w.embed.dtype):
        # copies of the first real token's row up to a multiple of dense_linear's row block,
        # computed and dropped: no linear then pads (copies) its input to that multiple
        extra = K.DENSE_ROWS - sel.numel() % K.DENSE_ROWS
        rows = torch.cat((sel, sel[:1].expand(extra)))

    def spread(t):  # (T', C) rows -> (B, S, C): the real tokens' in place, zeros at padding
        if sel is None:
            return t
        out = t.new_zeros(B * S, t.shape[-1])
        out[sel] = t[:sel.numel()]
        return out.view(B, S, -1)

    def pick(t):    # (B, S, C) -> (T', C): the real tokens' rows, and the copies after them
        return t if sel is None else t.reshape(B * S, -1)[rows]

    x = embed(w, ids, pos, pick)
    cos = sin = None
    if w.inv_freq is not None:
        f = pos[:, :, None].float() * w.inv_freq[None, None, :]   # (B, S, D/2)
        emb = torch.cat((f, f), dim=-1)
        cos = (emb.cos() * w.rope_scale).to(x.dtype)[:, None]
        sin = (emb.sin() * w.rope_scale).to(x.dtype)[:, None]
    act = _ACT[w.act]
    H, KV, D = w.n_heads, w.n_kv, w.head_dim
    for i, L in enumerate(w.layers):
        h = norm(x, L.ln1) if w.pre_norm else x
        if len(L.qkv) == 1:
            q, k, v = spread(lin(h, L.qkv[0])).split(H * D, dim=-1)
        else:
            q, k, v = (spread(lin(h, p)) for p in L.qkv)
        q = q.view(B, S, H, D).transpose(1, 2)
        k = k.view(B, S, KV, D).transpose(1, 2)
        v = v.view(B, S, KV, D).transpose(1, 2)
        if cos is not None:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        keys, values = kv(i, k, v)
        a = attention(q, keys, values, mask, attn_kernel, first)
        a = lin(pick(a.transpose(1, 2).reshape(B, S, H * D)), L.o)
        x = x + a if w.pre_norm else norm(x + a, L.ln1)
        h = norm(x, L.ln2) if w.pre_norm else x
        if L.gate is not None:
            h = act(lin(h, L.gate)) * lin(h, L.up)
        elif w.act == "relu":
            h = lin(h, L.up, relu=True)
        else:
            h = act(lin(h, L.up))
        h = lin(h, L.down)
        x = x + h if w.pre_norm else norm(x + h, L.ln2)
    return head(w, spread(x)[:, -1]) if logits else None


def _ragged(rows: int, dtype: torch.dtype) -> bool:
    """Whether `rows` rows go to dense_linear (lin's path above the kernel's rows) short of a
    whole number of its row blocks."""
    return rows % K.DENSE_ROWS != 0 and rows > K.max_rows(dtype)


def embed(w: Weights, ids: Tensor, pos: Tensor, pick=lambda t: t) -> Tensor:
    """Token embeddings (projected in where the model does) plus learned positions: ids and
    pos of one shape -> that shape + (E,); pick keeps the rows the per-token work runs on
    (_run's real tokens) before the projection."""
    x = pick(F.embedding(ids, w.embed))
    if w.proj_in is not None:
        x = lin(x, w.proj_in)
    if w.pos is not None:
        x = x + pick(F.embedding(pos + w.pos_offset, w.pos))
    return x


def head(w: Weights, x: Tensor) -> Tensor:
    """The last positions' hidden states x (B, E) -> logits (B, V): final norm, projection
    out, vocabulary."""
    if w.final is not None:
        x = norm(x, w.final)
    if w.proj_out is not None:
        x = lin(x, w.proj_out)
    return lin(x, w.head)


def can_pack(w: Weights) -> bool:
    return w.embed.device.type == "cpu" and w.embed.dtype == torch.float32 and hasattr(
        torch.ops.mkl, "_mkl_reorder_linear_weight") and torch.backends.mkl.is_available()


def pack(w: Weights, rows: int) -> tuple[Weights, int]:
    """Weights whose (out, in) linears carry an MKL-packed copy for `rows`-row inputs (decode),
    and the bytes those copies take. Packed copies go stale at every optimiser step: re-pack."""
    nbytes = 0

    def p(L):
        nonlocal nbytes
        if L is None or L.t:
            return L
        packed = torch.ops.mkl._mkl_reorder_linear_weight(L.w.detach(), rows)
        nbytes += packed.numel() * packed.element_size()
        return L._replace(packed=packed, rows=rows)

    return map_lins(w, p), nbytes
