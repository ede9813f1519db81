"""Time every linear of one decode step at opt-125m's shapes (12 layers' q, k, v, o, fc1, fc2 and
the vocabulary projection: 73 weights, random, as they lie) with x of M rows, through the
project's kernel and through oneDNN (dense_linear), in fp32 and bf16; bf16's kernel both with
AVX-512 BF16's dot-product instruction and widening to fp32, where the CPU has the first. The
cases alternate within each repeat, so a drift of the machine falls on all alike.

Run: python -m bench.micro.decode_linears [--rows 1,8,16,24,32,48,64] [--repeats 7]
(numbers in docs/performance.md). Prints the median ms of each case and W's read rate, and the
read rate of torch.sum over 512 MB in the same repeats (the harness's bandwidth probe)."""
import argparse
import statistics
import time

import torch

from engines import kernels as K

SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]   # (out, in) per layer
VOCAB = 50272


def weights(dtype):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) for _ in range(12) for n, k in SHAPES]
    return [w.to(dtype) for w in ws + [torch.randn(VOCAB, 768, generator=g)]]


def once(ws, rows: int, f) -> float:
    xs = [torch.randn(rows, w.shape[1]).to(w.dtype) for w in ws]
    t = time.perf_counter()
    for x, w in zip(xs, ws):
        f(x, w)
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.micro.decode_linears")
    ap.add_argument("--rows", default="1,8,16,24,32,48,64")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    try:
        rows = [int(r) for r in a.rows.split(",")]
        assert rows and min(rows) >= 1 and a.repeats >= 1
    except (ValueError, AssertionError):
        ap.error(f"--rows takes positive integers separated by commas, --repeats one >= 1 "
                 f"(got {a.rows!r}, {a.repeats})")
    if not K.available():
        raise SystemExit(f"decode_linears: the kernels are unavailable: {K.why_unavailable()}")
    torch.set_num_threads(2)
    K.MAX_ROWS = K.MAX_ROWS_AVX512 = K.MAX_ROWS_BF16DP = max(rows)  # the kernel at all rows asked
    ws = {torch.float32: weights(torch.float32), torch.bfloat16: weights(torch.bfloat16)}
    dp = K.set_bf16dp(True)

    def kernel(widen: bool):
        def f(x, w):
            K.set_bf16dp(not widen)
            return K.skinny_linear(x, w)
        return f
    cases = {"fp32 kernel": (torch.float32, kernel(False)),
             "fp32 oneDNN": (torch.float32, K.dense_linear),
             "bf16 kernel, vdpbf16ps": (torch.bfloat16, kernel(False)),
             "bf16 kernel, widening": (torch.bfloat16, kernel(True)),
             "bf16 oneDNN": (torch.bfloat16, K.dense_linear)}
    if not dp:
        del cases["bf16 kernel, vdpbf16ps"]
    big = torch.ones(2 ** 27)  # 512 MB: the machine's read rate beside the kernel's, each repeat
    for m in rows:
        times = {name: [] for name in cases}
        reads = []
        for _ in range(a.repeats):
            for name, (dtype, f) in cases.items():
                times[name].append(once(ws[dtype], m, f))
            t = time.perf_counter()
            big.sum()
            reads.append(big.numel() * 4 / 1e9 / (time.perf_counter() - t))
        K.set_bf16dp(True)
        cells = []
        for name, ts in times.items():
            t = statistics.median(ts)
            gb = sum(w.numel() * w.element_size() for w in ws[cases[name][0]]) / 1e9
            cells.append(f"{name} {t * 1e3:.1f} ms ({gb / t:.0f} GB/s)")
        print(f"rows {m}: " + "; ".join(cells) + f"; torch.sum of 512 MB read "
              f"{statistics.median(reads):.0f} GB/s (max {max(reads):.0f})", flush=True)


if __name__ == "__main__":
    from bench.machine import respawn_with_huge_pages
    respawn_with_huge_pages("bench.micro.decode_linears")  # the workers' memory, as in `run`
    main()
