"""A decode step of an OPT-shaped model with all its layers in one C++ call
(engines/csrc/stack.cpp): the values of engines.decoder.forward_ bit for bit, without the
Python between the ~40 operations of each layer. Models it does not cover keep forward_.

`applies(w, rows)` says whether it covers w at this batch (checked once per generate),
`params(w)` lists the tensors the call takes, `step` replaces forward_ for one token a row.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import decoder as D
from . import kernels as K

_NONE = torch.empty(0)  # a missing bias or norm weight, as the C++ side reads it


def applies(w: D.Weights, rows: int) -> bool:
    """An OPT-shaped model (layer norms, ReLU MLP, learned positions, no RoPE, no LoRA, as
    many KV heads as heads), every tensor a layer reads in the weights' dtype, the CPU kernels
    applying (eager, no_grad, fp32 or bf16) and `rows` within the linear kernel's."""
    dtype = w.embed.dtype
    if (w.inv_freq is not None or w.act != "relu" or not w.layers or w.n_kv != w.n_heads
            or (w.pos is not None and w.pos.dtype != dtype)
            or not D._cpu_kernels_apply(w.embed.device, dtype)
            or not 1 <= rows <= K.max_rows(dtype) or not K.available()):
        return False
    l0 = w.layers[0]
    for l in w.layers:
        if (len(l.qkv) != 3 or l.gate is not None or l.ln1.rms or l.ln2.rms
                or l.ln1.eps != l0.ln1.eps or l.ln2.eps != l0.ln2.eps):
            return False
        for n in (l.ln1, l.ln2):
            if any(t is not None and t.dtype != dtype for t in (n.w, n.b)):
                return False
        for L in (*l.qkv, l.o, l.up, l.down):
            if (L.a is not None or L.t or L.packed is not None or L.w.dtype != dtype
                    or not L.w.is_contiguous()
                    or (L.b is not None and (L.b.dtype != dtype or not L.b.is_contiguous()))):
                return False
    return True


def params(w: D.Weights) -> list:
    """The 16 tensors a layer that K.decode_stack takes (an empty one for a missing bias or
    norm weight): references, so an optimiser step is seen with nothing to redo."""
    out = []
    for l in w.layers:
        for t in (l.ln1.w, l.ln1.b, l.qkv[0].w, l.qkv[0].b, l.qkv[1].w, l.qkv[1].b, l.qkv[2].w,
                  l.qkv[2].b, l.o.w, l.o.b, l.ln2.w, l.ln2.b, l.up.w, l.up.b, l.down.w,
                  l.down.b):
            out.append(_NONE if t is None else t)
    return out


def step(w: D.Weights, cache: D.KVCache, ids: Tensor, pos: Tensor, start: int,
         key_mask: Tensor, logits: bool = True, ps: list | None = None) -> Tensor | None:
    """forward_(w, cache, ids, pos, start, key_mask, logits) for ids (B, 1), where
    applies(w, B): embeddings, the layers in one call, then the head. ps: params(w), made
    once by a caller that steps many times."""
    x = D.embed(w, ids[:, 0], pos[:, 0])                                  # (B, E)
    keep = key_mask[:, :start + 1].clone()
    keep[:, start] = True  # a row's own new key, as forward_'s mask
    l0 = w.layers[0]
    x = K.decode_stack(x, params(w) if ps is None else ps, cache.k, cache.v, start, keep,
                       w.pre_norm, w.n_heads, l0.ln1.eps, l0.ln2.eps)
    return D.head(w, x) if logits else None
