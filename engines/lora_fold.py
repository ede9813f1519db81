"""LoRA adapters folded into their base weights for a generate, and the base weights put back
bit for bit after.

`lora_fused(w)` turns the decoder's Weights (engines/weights.py) with adapters into adapter-free
ones whose linears are W + scale * B @ A, in place: a long generate then runs one matmul per
linear instead of three. It pays once enough tokens share the fold (engines/hybrid.py decides).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .decoder import lins, map_lins
from .weights import Lin, UnsupportedModel, Weights

FOLD_BLOCK = 1 << 18  # elements of W per fold step: W, d and temporaries stay in cache


def has_lora(w: Weights) -> bool:
    return any(L is not None and L.a is not None for L in lins(w))


@contextlib.contextmanager
def lora_fused(w: Weights):
    """Fold each LoRA adapter into its base weight in place (W += scale * B @ A) for the
    duration, yielding adapter-free Weights; then put every base weight back bit for bit.

    W + d - d is not always W in floating point, so before fusing, the elements whose round
    trip is inexact are found and their original values kept (few: where |d| is not small
    next to |W|); unfusing subtracts the same d and writes those values back. Both run in
    row blocks through reused scratch buffers, so the extra memory is a few blocks plus the
    kept elements: no second copy.
    """
    folded = []   # (Lin, r0, r1, flat indices or None, original values), in fold order
    scratch = _Scratch()
    with torch.no_grad():
        try:
            for L in lins(w):
                if L is None or L.a is None:
                    continue
                if not L.w.is_contiguous():
                    raise UnsupportedModel("LoRA fusing needs contiguous base weights")
                for r0, r1 in _blocks(L):
                    folded.append((L, r0, r1) + _fold_(L, r0, r1, scratch))
            yield _strip_lora(w)
        finally:
            for L, r0, r1, bad, orig in reversed(folded):
                W = L.w[r0:r1]
                W.sub_(_delta(L, r0, r1, scratch))
                if bad is not None:
                    W.view(-1)[bad] = orig


class _Scratch:
    """Flat buffers reused by every fold step. Allocating a block's temporaries afresh each
    step, between the small tensors a fold keeps, fragmented the heap by ~1 MB a block
    (+410 MB RSS over opt-125m's 72 linears)."""

    def __init__(self):
        self.bufs = {}

    def __call__(self, name: str, shape, dtype, device) -> Tensor:
        n = math.prod(shape)
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype or b.device != device:
            b = self.bufs[name] = torch.empty(max(n, FOLD_BLOCK), dtype=dtype, device=device)
        return b[:n].view(shape)


def _blocks(L: Lin):
    rows = max(1, FOLD_BLOCK // L.w.shape[1])
    for r0 in range(0, L.w.shape[0], rows):
        yield r0, min(r0 + rows, L.w.shape[0])


def _delta(L: Lin, r0: int, r1: int, scratch: _Scratch) -> Tensor:
    """Rows r0:r1 of the adapter's full-rank update scale * B @ A, laid out like L.w and in
    its dtype (fold and check in W's dtype: PEFT keeps a bf16 model's adapters in fp32)."""
    a, bb, rows = L.a, L.bb, r1 - r0
    if L.t:  # GPT-2 Conv1D: w is (in, out), so W's rows are A's columns
        d = torch.mm(bb, a[:, r0:r1], out=scratch("mm", (bb.shape[0], rows), a.dtype,
                                                  a.device)).t()
    else:
        d = torch.mm(bb[r0:r1], a, out=scratch("mm", (rows, a.shape[1]), a.dtype, a.device))
    if L.scale != 1.0:
        d.mul_(L.scale)
    if d.dtype != L.w.dtype or not d.is_contiguous():
        d = scratch("d", d.shape, L.w.dtype, d.device).copy_(d)
    return d


def _fold_(L: Lin, r0: int, r1: int, scratch: _Scratch) -> tuple:
    """W[r0:r1] += d in place; returns (flat indices, original values) of the elements where
    W + d - d != W, or (None, None) where there are none."""
    W, d = L.w[r0:r1], _delta(L, r0, r1, scratch)
    fused = torch.add(W, d, out=scratch("fused", W.shape, W.dtype, W.device))
    back = torch.sub(fused, d, out=scratch("back", W.shape, W.dtype, W.device))
    bad = back.ne_(W).view(-1).nonzero().squeeze(1)
    kept = (bad.clone(), W.view(-1)[bad].clone()) if bad.numel() else (None, None)
    W.copy_(fused)
    return kept


def _strip_lora(w: Weights) -> Weights:
    return map_lins(w, lambda L: None if L is None else L._replace(a=None, bb=None, scale=1.0))
