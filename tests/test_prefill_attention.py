"""The prefill attention kernel (engines/csrc/prefill.cpp) against exact attention and SDPA,
and the decoder's prefill taking it: causal over each row's real tokens, chunks that start
past slot 0, GQA, and what it declines."""
import math

import pytest
import torch
import torch.nn.functional as F

from engines import kernels as K


def _exact(q, k, v, first, start):
    """float64 causal attention over slots first[b]..t for the query at slot t; (B, H, S, D),
    zeros on padded queries."""
    B, H, S, D = q.shape
    KV, end = k.shape[1], start + S
    k64, v64 = (t.double().repeat_interleave(H // KV, dim=1) for t in (k, v))
    slot, key = torch.arange(start, end)[:, None], torch.arange(end)[None, :]
    see = (key <= slot)[None] & (key >= first[:, None, None])                   # (B, S, end)
    s = (q.double() @ k64.transpose(-1, -2) / math.sqrt(D)).masked_fill(~see[:, None],
                                                                       float("-inf"))
    out = s.softmax(-1).nan_to_num() @ v64
    real = (torch.arange(start, end)[None] >= first[:, None])                   # (B, S)
    return out * real[:, None, :, None], see, real


@pytest.mark.parametrize("B,H,KV,S,start,Dh", [(3, 4, 4, 17, 0, 64), (2, 8, 2, 5, 11, 128),
                                               (4, 2, 1, 33, 7, 8), (1, 3, 3, 2, 0, 24),
                                               (5, 16, 16, 40, 88, 64)])
@pytest.mark.parametrize("sharp", [1.0, 40.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_equals_exact(B, H, KV, S, start, Dh, sharp, dtype):
    """Against float64 as accurate as SDPA under the decoder's mask (in bf16 both errors are the
    output's rounding); rows that start after the chunk, inside it and at slot 0; q strided as
    the decoder's, k and v views of a longer cache; sharp scores underflow most weights."""
    g = torch.Generator().manual_seed(B * 100 + S + start)
    end = start + S
    k = torch.randn(B, KV, end + 5, Dh, generator=g).to(dtype)[:, :, :end]
    v = torch.randn(B, KV, end + 5, Dh, generator=g).to(dtype)[:, :, :end]
    q = (sharp * torch.randn(B, S, H, Dh, generator=g)).to(dtype).transpose(1, 2)
    first = torch.randint(0, end + 1, (B,), generator=g)
    first[0] = 0
    if B > 2:
        first[1], first[2] = end, start + S // 2   # a row all padding; one real mid-chunk
    got = K.prefill_attention(q, k, v, first, start, 1 / math.sqrt(Dh))
    exact, see, real = _exact(q, k, v, first, start)
    own = torch.eye(S, end, dtype=torch.bool).roll(start, dims=1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=(see | own)[:, None],
                                          scale=1 / math.sqrt(Dh), enable_gqa=KV != H)
    want = want * real[:, None, :, None]
    assert got.shape == (B, H, S, Dh) and got.dtype == dtype
    assert got.transpose(1, 2).is_contiguous()  # the (B, S, H * D) rows the o projection takes
    assert (got[~real[:, None, :, None].expand_as(got)] == 0).all()
    err, err_sdpa = ((x.double() - exact).abs().max().item() for x in (got, want))
    slack = 2e-6 if dtype == torch.float32 else 2 ** -8 * exact.abs().max().item()
    assert err <= 4 * err_sdpa + slack, (err, err_sdpa)


def test_prefill_attention_declines_what_it_does_not_take():
    B, H, S, D = 2, 4, 6, 16
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    first = torch.tensor([0, 2])
    assert K.prefill_attention(q, k, v, first, 0, 1.0) is not None
    assert K.prefill_attention(q[..., :12], k[..., :12], v[..., :12], first, 0, 1.0) is None
    assert K.prefill_attention(q.double(), k.double(), v.double(), first, 0, 1.0) is None
    assert K.prefill_attention(q.half(), k.half(), v.half(), first, 0, 1.0) is None
    assert K.prefill_attention(q, k.bfloat16(), v, first, 0, 1.0) is None   # mixed dtypes
    assert K.prefill_attention(q, k, v, first.int(), 0, 1.0) is None
    assert K.prefill_attention(q, k, v, first[:1], 0, 1.0) is None
    assert K.prefill_attention(q, k, v, first, 1, 1.0) is None               # keys != start + S
    assert K.prefill_attention(q, k[:, :3], v[:, :3], first, 0, 1.0) is None  # 4 heads, 3 KV


def test_prefill_attention_is_causal_and_propagates_nan():
    """A NaN key reaches every query at or after its slot, and no query before it."""
    B, H, S, D = 1, 2, 20, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    k[0, 0, 9] = float("nan")
    got = K.prefill_attention(q, k, v, torch.tensor([3]), 0, 0.25)
    assert got[0, 0, 9:].isnan().all() and not got[0, 0, :9].isnan().any()
    assert not got[0, 1].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_prefill_takes_the_kernel_and_keeps_its_logits(monkeypatch, dtype):
    """A chunked CPU prefill of left-padded prompts calls no SDPA, gives SDPA's logits within
    the dtype's rounding, and hands oneDNN's linears whole row blocks (no padding copy); a key
    mask with a hole in it (not left padding) goes to SDPA."""
    from torch.profiler import profile

    from core.data import synthetic_prompts
    from core.models import build_bundle, position_ids
    from engines import decoder as D
    assert K.available(), K.why_unavailable()
    b = build_bundle("tiny-llama", seed=0, dtype=dtype, actor_only=True)  # GQA, RoPE
    w = D.extract(b.actor)
    B, P = 5, 24
    p = synthetic_prompts(B, P, b.config.vocab_size, b.pad_id, seed=2)
    pos = position_ids(p.attention_mask)
    rows = []
    dense = K.dense_linear
    monkeypatch.setattr(K, "max_rows", lambda dtype: 0)  # every linear through dense_linear
    monkeypatch.setattr(K, "dense_linear", lambda x, *a, **kw: rows.append(x.shape[0])
                        or dense(x, *a, **kw))

    def prefill(key_mask, kernel):
        cache = D.new_cache(w, B, P, dtype, "cpu")
        with torch.no_grad(), profile() as prof:
            for s0 in range(0, P, 8):
                out = D.forward_(w, cache, p.input_ids[:, s0:s0 + 8], pos[:, s0:s0 + 8], s0,
                                 key_mask, s0 + 8 >= P, attn_kernel=kernel)
        return out.float(), {e.name for e in prof.events() if "scaled_dot_product" in e.name}

    left = p.attention_mask.bool()
    got, sdpa = prefill(left, True)
    assert not sdpa, sdpa
    assert rows[-1] == B    # the head, on each row's last position
    assert all(r % K.DENSE_ROWS == 0 for r in rows[:-1]), rows
    want, sdpa = prefill(left, False)
    assert sdpa
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (got - want).abs().max() <= tol * want.abs().max()
    holed = left.clone()
    holed[0, P // 2] = False
    _, sdpa = prefill(holed, True)
    assert sdpa
