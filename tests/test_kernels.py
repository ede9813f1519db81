"""The decode kernels against their slow twins (F.linear, the torch noise), and oneDNN's
linear (dense_linear) against F.linear."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from engines import kernels as K


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op threads at n inside the block (the suite runs on one, conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_kernel_builds_here():
    # CI's machines have a compiler and AVX2; if this fails the engines still run (on
    # F.linear), but hybrid decode loses its speed, so say so loudly
    assert K.available(), K.why_unavailable()


@pytest.fixture(params=["avx512", "avx2"])
def isa(request):
    """Run each case on both instruction sets (AVX-512 only where this CPU has it)."""
    wide = K.set_avx512(request.param == "avx512")
    if request.param == "avx512" and not wide:
        pytest.skip("this CPU has no AVX-512; the AVX2 case covers the kernel here")
    yield request.param
    K.set_avx512(True)


@pytest.fixture(params=["avx512_bf16", "avx512", "avx2"])
def bf16_isa(request):
    """bf16 linears: the dot-product instruction (AVX-512 BF16), or bf16 widened to fp32 with
    AVX-512 or AVX2, each where this CPU has it."""
    wide = K.set_avx512(request.param != "avx2")
    dp = K.set_bf16dp(request.param == "avx512_bf16")
    if request.param != "avx2" and not wide or request.param == "avx512_bf16" and not dp:
        pytest.skip(f"this CPU has no {request.param}; the other cases cover the kernel here")
    yield request.param
    K.set_avx512(True)
    K.set_bf16dp(True)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 9, 13, 16, 17, 40, 64, 65])
@pytest.mark.parametrize("k,n", [(64, 512), (768, 100), (100, 77), (7, 5), (3072, 768), (23, 9),
                                 (1541, 101), (2048, 50), (2600, 70), (1024, 130)])
def test_skinny_linear_equals_f_linear(m, k, n, isa):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    for bias in (None, b):
        want = F.linear(x, w, bias)
        got = K.skinny_linear(x, w, bias)
        assert got.shape == want.shape
        # different summation order only: float32 rounding, relative to the row's scale
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 33, 49, 96, 97])
@pytest.mark.parametrize("k,n", [(768, 100), (100, 77), (7, 5), (3072, 70), (33, 40)])
def test_bf16_skinny_linear_rounds_the_exact_result_once(m, k, n, bf16_isa):
    """In bf16 (rows past max_rows go to F.linear): the exact x @ W.T + b of the bf16 inputs,
    summed in fp32 and rounded to bf16 once, as oneDNN's bf16 linear does; ReLU fused."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w, b = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((m, k), (n, k), (n,)))
    exact = x.double() @ w.double().T + b.double()
    scale = x.double().abs() @ w.double().abs().T + b.double().abs()
    for relu in (False, True):
        got = K.skinny_linear(x, w, b, relu=relu)
        want = exact.clamp(min=0) if relu else exact
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        # half a bf16 spacing (2^-8 of the value) and fp32 summation error
        assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6 * scale).all()
    if m <= K.max_rows(torch.bfloat16):
        assert K.skinny_linear(x, w).dtype == torch.bfloat16  # no bias
    assert K.max_rows(torch.bfloat16) == (96 if bf16_isa == "avx512_bf16" else 16)


@pytest.mark.parametrize("m", [5, 8, 13])
def test_bf16_skinny_linear_rounds_as_torch_does(m, bf16_isa):
    """Sums that fp32 holds exactly (two small integers of x and a bias a row of W): y is their
    bf16 rounding, bit for bit as torch rounds, ties to even included, in the 8-column blocks
    of the vector store and in the columns after them (37 = 4 x 8 + 5); NaN stays NaN."""
    g = torch.Generator().manual_seed(m)
    k, n = 64, 37
    x = torch.randint(-255, 256, (m, k), generator=g).to(torch.bfloat16)
    w = torch.zeros(n, k)
    for j in range(n):
        w[j, torch.randperm(k, generator=g)[:2]] = 1.0
    w = w.to(torch.bfloat16)
    b = torch.randint(-255, 256, (n,), generator=g).to(torch.bfloat16)
    x[m - 1, :] = float("nan")
    exact = x.float() @ w.float().T + b.float()
    for relu in (False, True):
        want = (exact.clamp(min=0) if relu else exact).to(torch.bfloat16)
        got = K.skinny_linear(x, w, b, relu=relu)
        assert torch.equal(got[:-1], want[:-1])
        assert (got[-1].view(torch.int16) == 0x7FC0).all()  # NaN, as torch rounds one
    assert (exact[:-1].abs() > 256).any()  # sums that bf16 must round


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [100, 1024, 3100])
def test_skinny_linear_does_not_depend_on_batch_or_threads(dtype, k, isa):
    """Each output's sums are added in one order whatever tile its row and column fall in: a
    row of y is the same bits computed alone, in any group of rows (tiles of 4 rows, which
    read W row by row, one or two rows at a time, and of 8, which read it tile by tile of K;
    K in one tile and in several; x's rows 4 KB apart, which 8-row tiles read from a copy),
    and on 1 or 2 threads."""
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((13, k), (333, k), (333,)))
    whole = K.skinny_linear(x, w, b)
    parts = torch.cat([K.skinny_linear(x[i:j], w, b)
                       for i, j in ((0, 1), (1, 3), (3, 7), (7, 13))])
    assert torch.equal(parts, whole)
    for n in (1, 2):
        with threads(n):
            assert torch.equal(K.skinny_linear(x, w, b), whole)


@pytest.mark.parametrize("m", [1, 4, 13])
def test_skinny_linear_covers_every_unit_of_rows_once(m, isa):
    """W's rows go in units (16 rows in one group of x, 48 past it) that two threads share out
    and take from each other's end (balance.h): around every boundary of units and threads'
    shares, each column of y is computed once, the same bits as on one thread, over calls
    where either thread may finish first."""
    g = torch.Generator().manual_seed(m)
    for n in (1, 15, 16, 17, 47, 49, 255, 256, 257, 511, 513, 1000):
        x, w = torch.randn(m, 64, generator=g), torch.randn(n, 64, generator=g)
        with threads(1):
            alone = K.skinny_linear(x, w)
        assert torch.allclose(alone, F.linear(x, w), rtol=1e-5, atol=1e-5)
        with threads(2):
            for _ in range(20):
                assert torch.equal(K.skinny_linear(x, w), alone)


def test_fp32_rows_limit_follows_the_instruction_set(isa):
    assert K.max_rows(torch.float32) == (K.MAX_ROWS_AVX512 if isa == "avx512" else K.MAX_ROWS)


def test_fp32_skinny_linear_fuses_relu(isa):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 40, generator=g), torch.randn(33, 40, generator=g), torch.randn(33)
    got = K.skinny_linear(x, w, b, relu=True)
    assert (got >= 0).all() and (got == 0).any()
    assert torch.allclose(got, F.relu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", [0, 1, 2**62 + 17, 2**63 - 1, 2**63, -1, 2**65 + 3])
def test_counter_uniform_equals_its_torch_twin(key, isa):
    from core.rng import counter_uniform
    for n in (0, 1, 17, 100_003):
        assert torch.equal(K.counter_uniform(key, n), counter_uniform(key, n))


@pytest.mark.parametrize("m,k,n", [(17, 768, 300), (64, 100, 77), (300, 64, 512), (5, 3, 2)])
@pytest.mark.parametrize("relu", [False, True])
def test_dense_linear_equals_f_linear(m, k, n, relu):
    g = torch.Generator().manual_seed(m + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n)
    for bias in (None, b):
        want = F.linear(x, w, bias)
        want = F.relu(want) if relu else want
        got = K.dense_linear(x, w, bias, relu=relu)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6
        xb, wb = x.bfloat16(), w.bfloat16()
        bb = None if bias is None else bias.bfloat16()
        got16 = K.dense_linear(xb, wb, bb, relu=relu)
        want16 = F.linear(xb.double(), wb.double(), None if bb is None else bb.double())
        want16 = F.relu(want16) if relu else want16
        assert got16.dtype == torch.bfloat16
        assert ((got16.double() - want16).abs() <= 2 ** -7 * want16.abs() + 1e-2 * k ** .5).all()


def test_dense_linear_pads_ragged_rows_out_of_sight():
    """Rows short of a multiple of K.DENSE_ROWS go through oneDNN padded with zero rows: the
    result has x's leading shape, every row as F.linear gives it, and no padding row."""
    g = torch.Generator().manual_seed(3)
    for shape in ((3, 7, 64), (K.DENSE_ROWS + 1, 64), (K.DENSE_ROWS, 64)):
        x, w = torch.randn(*shape, generator=g), torch.randn(40, 64, generator=g)
        b = torch.randn(40, generator=g)
        got = K.dense_linear(x, w, b)
        assert got.shape == (*shape[:-1], 40) and got.is_contiguous()
        assert (got - F.linear(x, w, b)).abs().max() <= 1e-5 * got.abs().max()


def test_dense_linear_without_onednn_is_f_linear(monkeypatch):
    monkeypatch.setattr(K, "_DNN", False)
    x, w, b = torch.randn(20, 8), torch.randn(6, 8), torch.randn(6)
    assert not K.dnn_ok(x, w)
    assert torch.equal(K.dense_linear(x, w, b, relu=True), F.relu(F.linear(x, w, b)))
    xd, wd = x.double(), w.double()
    monkeypatch.setattr(K, "_DNN", True)
    assert not K.dnn_ok(xd, wd)
    assert torch.equal(K.dense_linear(xd, wd), F.linear(xd, wd))


def test_mismatched_linear_shapes_raise_as_f_linear_does():
    x, w = torch.randn(2, 10), torch.randn(3, 12)
    with pytest.raises(RuntimeError):
        K.skinny_linear(x, w)
    with pytest.raises(RuntimeError):
        K.skinny_linear(torch.randn(2, 12), w, torch.randn(4))


def test_too_many_rows_or_other_dtypes_use_the_twin():
    x, w = torch.randn(K.max_rows(torch.float32) + 1, 32), torch.randn(16, 32)
    assert torch.equal(K.skinny_linear(x, w), F.linear(x, w))
    xd, wd = x[:4].double(), w.double()
    assert torch.equal(K.skinny_linear(xd, wd), F.linear(xd, wd))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_linears_take_the_kernel_up_to_its_rows(monkeypatch, dtype):
    """Generation's linears on the CPU (no_grad): up to max_rows rows through the kernel, ReLU
    fused, more through oneDNN (dense_linear); fp16 never reaches the kernel. The values are
    F.linear's within the dtype's rounding either way."""
    from engines import decoder as D
    calls = []
    for name in ("skinny_linear", "dense_linear"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=real, _n=name, **k: calls.append(
            (_n, a[0].shape[0], k.get("relu"))) or _f(*a, **k))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g).to(dtype)
    L = D.Lin(w, torch.randn(48, generator=g).to(dtype))
    top = K.max_rows(dtype)
    assert top == 0 if dtype == torch.float16 or not K.available() else top >= K.MAX_ROWS
    for rows in (1, max(top, 1), max(top, 1) + 1):
        x = torch.randn(rows, 1, 32, generator=g).to(dtype)
        calls.clear()
        with torch.no_grad():
            y = D.lin(x, L, relu=True)
        assert calls == [("skinny_linear" if rows <= top else "dense_linear", rows, True)]
        want = F.relu(F.linear(x.double(), w.double(), L.b.double()))
        assert y.shape == (rows, 1, 48) and y.dtype == dtype and y.is_contiguous()
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        assert ((y.double() - want).abs() <= tol * (want.abs() + 1)).all()


def test_low_precision_decode_attention_keeps_no_memory_per_key_length():
    """bf16 decode attention on the CPU off the kernel's path (gradients on here; or no
    kernel): the two batched matmuls over the cache views ran through oneDNN, which kept a
    primitive with a K-sized scratchpad for every new key length (+55 MB over these 40 lengths,
    +659 MB over one 128-token opt-125m generate at batch 8). SDPA keeps nothing, and its values
    are those of fp32 attention within bf16 rounding."""
    import math

    import psutil

    from engines import decoder as D
    g = torch.Generator().manual_seed(0)
    B, H, T, Dh = 4, 12, 256, 64
    k, v = (torch.randn(B, H, T, Dh, generator=g).to(torch.bfloat16) for _ in range(2))
    q = torch.randn(B, H, 1, Dh, generator=g).to(torch.bfloat16)
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[0, ..., :5] = False  # a padded row
    D.attention(q, k[:, :, :100], v[:, :, :100], mask[..., :100])  # warm-up
    rss0 = psutil.Process().memory_info().rss
    for end in range(150, 190):
        out = D.attention(q, k[:, :, :end], v[:, :, :end], mask[..., :end])
    grown_mb = (psutil.Process().memory_info().rss - rss0) / 2 ** 20
    assert grown_mb < 16, grown_mb
    kf, vf, m = k[:, :, :189].float(), v[:, :, :189].float(), mask[..., :189]
    s = (q.float() @ kf.transpose(-1, -2) / math.sqrt(Dh)).masked_fill(~m, float("-inf"))
    assert out.shape == (B, H, 1, Dh) and out.dtype == torch.bfloat16
    assert (out.float() - s.softmax(-1) @ vf).abs().max() < 1e-2


@pytest.mark.parametrize("B,H,KV,T,E,Dh", [(8, 12, 12, 256, 220, 64), (3, 8, 2, 40, 17, 128),
                                             (2, 4, 4, 10, 5, 7), (1, 6, 3, 9, 9, 80),
                                             (2, 14, 2, 33, 1, 64), (2, 4, 2, 20, 16, 9)])
@pytest.mark.parametrize("sharp", [1.0, 40.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa(B, H, KV, T, E, Dh, sharp, dtype):
    """The decode attention kernel against SDPA on cache views (GQA, head sizes that are not a
    multiple of 8, padded keys, a single key, q strided as the decoder's; sharp: scores spread
    over hundreds, so that most weights underflow the kernel's exp), in fp32 and bf16."""
    import math
    g = torch.Generator().manual_seed(B * 100 + E)
    k = torch.randn(B, KV, T, Dh, generator=g).to(dtype)
    v = torch.randn(B + 1, KV + 1, T + 3, Dh + 5, generator=g)[1:, 1:, 3:, :Dh].to(dtype)
    q = (sharp * torch.randn(B, 1, H * Dh, generator=g)).to(dtype).view(B, 1, H, Dh).transpose(
        1, 2)
    keep = torch.rand(B, E, generator=g) > 0.4
    keep[:, -1] = True  # the decoder's own slot: every row attends to one key at least
    got = K.decode_attention(q, k[:, :, :E], v[:, :, :E], keep, 1 / math.sqrt(Dh))
    want = F.scaled_dot_product_attention(q, k[:, :, :E], v[:, :, :E],
                                          attn_mask=keep[:, None, None],
                                          scale=1 / math.sqrt(Dh), enable_gqa=KV != H)
    assert got.shape == want.shape == (B, H, 1, Dh) and got.dtype == dtype
    # against float64: as accurate as SDPA, whose scores alone round by ~1e-7 of their size
    # (in bf16 both errors are the output's rounding, at most half a spacing: 2^-9 of ~1)
    k64, v64 = (t[:, :, :E].double().repeat_interleave(H // KV, dim=1) for t in (k, v))
    s64 = (q.double() @ k64.transpose(-1, -2) / math.sqrt(Dh)).masked_fill(~keep[:, None, None],
                                                                          float("-inf"))
    exact = s64.softmax(-1) @ v64
    err, err_sdpa = ((x.double() - exact).abs().max().item() for x in (got, want))
    slack = 2e-6 if dtype == torch.float32 else 2 ** -8 * exact.abs().max().item()
    assert err <= 4 * err_sdpa + slack, (err, err_sdpa)
    # two threads sharing the (row, KV head) tasks out (balance.h): the same bits, each task
    # computed whole by one thread
    with threads(2):
        for _ in range(5):
            again = K.decode_attention(q, k[:, :, :E], v[:, :, :E], keep, 1 / math.sqrt(Dh))
            assert torch.equal(again, got)
    # what it does not take, it declines (the caller then uses SDPA, which raises or broadcasts)
    ke, ve = k[:, :, :E], v[:, :, :E]
    assert K.decode_attention(q.double(), ke.double(), ve.double(), keep, 1.0) is None
    assert K.decode_attention(q.half(), ke.half(), ve.half(), keep, 1.0) is None
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    assert K.decode_attention(q, ke.to(other), ve, keep, 1.0) is None  # mixed dtypes
    assert K.decode_attention(q.expand(B, H, 2, Dh), ke, ve, keep, 1.0) is None
    assert K.decode_attention(q, ke[:1], ve[:1], keep, 1.0) is None or B == 1  # batch of 1
    assert K.decode_attention(q, ke[..., :1], ve[..., :1], keep, 1.0) is None or Dh == 1
    assert K.decode_attention(q, ke[:, :0], ve[:, :0], keep, 1.0) is None  # no KV heads
    assert K.decode_attention(q, ke, ve, keep[:, :-1], 1.0) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_propagates_nan_and_inf_like_sdpa(dtype):
    """A NaN or +inf score anywhere in a row (in a full group of 8 keys or in the tail) gives
    NaN for that row, as SDPA does; other rows are untouched."""
    g = torch.Generator().manual_seed(0)
    B, H, E, Dh = 2, 2, 14, 16
    k, v = (torch.randn(B, H, E, Dh, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, H, 1, Dh, generator=g).to(dtype)
    keep = torch.ones(B, E, dtype=torch.bool)
    for bad in (float("nan"), float("inf")):
        for key in (3, 12):  # in the first group of 8, in the tail
            kb = k.clone()
            kb[0, 0, key] = bad
            got = K.decode_attention(q, kb, v, keep, 0.25)
            want = F.scaled_dot_product_attention(q, kb, v, attn_mask=keep[:, None, None],
                                                  scale=0.25)
            assert got[0, 0].isnan().all() and want[0, 0].isnan().all(), (bad, key)
            assert torch.allclose(got[1].float(), want[1].float(),
                                  atol=1e-6 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_step_runs_sdpa_flash_kernel(dtype):
    """A decode step on the CPU reaches SDPA's flash kernel, not its math fallback, which
    copies K and V every layer: in bf16 it took the fallback while the decode linears returned
    a transposed layout (q's last dimension strided), and generate ran 1.2x slower. fp32 decode
    runs engines/kernels.py's attention (checked below), SDPA's when that is switched off."""
    from torch.profiler import profile

    from core.data import synthetic_prompts
    from core.models import build_bundle, position_ids
    from engines import decoder as D
    b = build_bundle("tiny-opt", seed=0, dtype=dtype, actor_only=True)
    w = D.extract(b.actor)
    B, P = 2, 6
    p = synthetic_prompts(B, P, b.config.vocab_size, b.pad_id, seed=0)
    cache = D.new_cache(w, B, P + 1, dtype, "cpu")
    key_mask = torch.ones(B, P + 1, dtype=torch.bool)
    key_mask[:, :P] = p.attention_mask.bool()
    pos = position_ids(p.attention_mask)
    with torch.no_grad():
        D.forward_(w, cache, p.input_ids, pos, 0, key_mask)
        with profile() as prof:
            D.forward_(w, cache, torch.zeros(B, 1, dtype=torch.long), pos[:, -1:] + 1, P,
                       key_mask, attn_kernel=False)
    ran = {e.name for e in prof.events() if "attention" in e.name}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ran, ran
    assert "aten::_scaled_dot_product_attention_math" not in ran, ran


def test_fp32_decode_step_runs_the_attention_kernel():
    """fp32 decode attention on the CPU goes to engines/kernels.py (no SDPA call at all), and the
    step's logits are SDPA's within float32 rounding."""
    from torch.profiler import profile

    from core.data import synthetic_prompts
    from core.models import build_bundle, position_ids
    from engines import decoder as D
    assert K.available(), K.why_unavailable()
    b = build_bundle("tiny-llama", seed=0, actor_only=True)  # GQA
    w = D.extract(b.actor)
    B, P = 3, 7
    p = synthetic_prompts(B, P, b.config.vocab_size, b.pad_id, seed=1)
    key_mask = torch.ones(B, P + 1, dtype=torch.bool)
    key_mask[:, :P] = p.attention_mask.bool()
    pos = position_ids(p.attention_mask)
    out = {}
    for use in (True, False):
        cache = D.new_cache(w, B, P + 1, torch.float32, "cpu")
        with torch.no_grad():
            D.forward_(w, cache, p.input_ids, pos, 0, key_mask)
            with profile() as prof:
                out[use] = D.forward_(w, cache, torch.full((B, 1), 5), pos[:, -1:] + 1, P,
                                      key_mask, attn_kernel=use)
        sdpa = {e.name for e in prof.events() if "scaled_dot_product" in e.name}
        assert bool(sdpa) != use, sdpa
    assert (out[True] - out[False]).abs().max() < 1e-4 * out[False].abs().max()


def test_decode_with_gradients_on_stays_differentiable():
    """The kernels carry no autograd: with gradients on, a CPU fp32 decode step takes the ATen
    path, so its logits reach the weights' gradients (the engines decode under no_grad)."""
    from core.models import build_bundle
    from engines import decoder as D
    b = build_bundle("tiny-opt", seed=0, actor_only=True)
    w = D.extract(b.actor)
    B, P = 2, 5
    cache = D.new_cache(w, B, P + 1, torch.float32, "cpu")
    key_mask = torch.ones(B, P + 1, dtype=torch.bool)
    pos = torch.arange(P + 1).expand(B, -1)
    with torch.no_grad():
        D.forward_(w, cache, torch.full((B, P), 7), pos[:, :P], 0, key_mask)
    logits = D.forward_(w, cache, torch.full((B, 1), 9), pos[:, P:], P, key_mask)
    logits.sum().backward()
    L = w.layers[0]
    # q's weights reach the logits only through attention, the others through the linears
    for p in (*L.qkv, L.o, L.up, L.down):
        assert p.w.grad is not None and p.w.grad.abs().sum() > 0
