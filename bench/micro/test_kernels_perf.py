"""pytest-benchmark timings of the CPU decode kernels against their ATen twins (run by
`make perf`): linears with 8 and 16 rows of x (opt-125m's widest K and its head's shape) and
one decode step's attention (opt-125m, batch 8, 220 cached keys, read from memory as in a
step); one prefill's attention (opt-350m, bf16, batches 1-64). Each pair shares a group, so
pytest-benchmark's table puts the kernel and its twin side by side; nothing here asserts a
time.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from engines import kernels as K

pytestmark = pytest.mark.skipif(not K.available(), reason=f"kernels unavailable: "
                                f"{K.why_unavailable()}")


@pytest.mark.parametrize("impl", ["kernel", "F.linear"])
@pytest.mark.parametrize("n,k", [(768, 3072), (3072, 768)])
@pytest.mark.parametrize("m", [8, 16])
def test_decode_linear(benchmark, impl, n, k, m):
    g = torch.Generator().manual_seed(0)
    # a set of weights larger than the L3 cache, one used per call, as a decode step reads them
    ws = [torch.randn(n, k, generator=g) for _ in range(max(1, 400_000_000 // (n * k * 4)))]
    x = torch.randn(m, k, generator=g)
    f = K.skinny_linear if impl == "kernel" else F.linear
    each = itertools.cycle(ws)
    benchmark.group = f"linear x ({m}, {k}) @ W ({n}, {k}).T"
    benchmark.pedantic(lambda: f(x, next(each)), rounds=60, iterations=1,
                       warmup_rounds=len(ws))


@pytest.mark.parametrize("impl", ["kernel", "sdpa"])
def test_decode_attention(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    B, H, T, D, E, L = 8, 12, 256, 64, 220, 12
    ks, vs = ([torch.randn(B, H, T, D, generator=g) for _ in range(L)] for _ in range(2))
    q = torch.randn(B, H, 1, D, generator=g)
    keep = torch.ones(B, E, dtype=torch.bool)
    keep[0, :5] = False

    def step():  # the 12 layers of one step
        for k, v in zip(ks, vs):
            if impl == "kernel":
                K.decode_attention(q, k[:, :, :E], v[:, :, :E], keep, 1 / math.sqrt(D))
            else:
                F.scaled_dot_product_attention(q, k[:, :, :E], v[:, :, :E],
                                               attn_mask=keep[:, None, None],
                                               scale=1 / math.sqrt(D))
    # in a decode step the weights pass between two reads of a layer's cache: 600 MB read
    # before each round takes the cache out of L3 (300 MB here) as they do
    flush = torch.ones(150_000_000)

    def evict():
        flush.sum()
    benchmark.group = f"decode attention, 12 layers, B{B} H{H} {E} keys"
    benchmark.pedantic(step, setup=evict, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["kernel", "sdpa"])
@pytest.mark.parametrize("batch", [1, 8, 32, 64])
def test_prefill_attention(benchmark, impl, batch):
    """One prefill's attention at opt-350m's shapes (24 layers, 16 heads of 64) in bf16, over
    the sweep's left-padded prompts in hybrid's chunks (1024 tokens over the batch): the kernel
    over each row's real causal pairs, or SDPA under the decoder's mask."""
    from core.data import synthetic_prompts
    g = torch.Generator().manual_seed(0)
    H, D, P, L = 16, 64, 128, 24
    keys = synthetic_prompts(batch, P, 50000, 1, seed=0).attention_mask.bool()
    first = (~keys).sum(1)
    q = torch.randn(batch, P, H, D, generator=g).bfloat16().transpose(1, 2)
    k, v = (torch.randn(batch, H, P, D, generator=g).bfloat16() for _ in range(2))
    step = max(16, 1024 // batch)
    chunks = []
    for s in range(0, P, step):
        e = min(P, s + step)
        causal = torch.ones(e - s, e, dtype=torch.bool).tril(diagonal=s)
        own = torch.eye(e - s, e, dtype=torch.bool).roll(s, dims=1)
        chunks.append((s, e, (causal[None, None] & keys[:, None, None, :e]) | own[None, None]))

    def prefill():
        for _ in range(L):
            for s, e, mask in chunks:
                if impl == "kernel":
                    K.prefill_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], first, s, 0.125)
                else:
                    F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e],
                                                   attn_mask=mask, scale=0.125)
    benchmark.group = f"prefill attention, 24 layers, B{batch} H{H} {len(chunks)} chunks"
    benchmark.pedantic(prefill, rounds=10, iterations=1, warmup_rounds=1)
