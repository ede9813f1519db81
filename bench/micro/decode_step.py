"""Time one `hybrid` decode step (engines.decoder.forward_ on one token per row) after a prefill,
and print where its ATen time goes. opt-125m shape, batch 8 (or --batch N), 192 cached positions,
2 threads.
Each step attends over one more key than the last, as in generation: a step repeated at one
length would hide any cost paid per new length (oneDNN built a primitive for each in bf16).

Run: python -m bench.micro.decode_step [--profile] [--bf16] [--sdpa] [--loop | --vs-loop]
[--batch N] (numbers in docs/performance.md); --sdpa: fp32 attention through SDPA instead of
engines/kernels.py's kernel; --loop: the decoder's Python layer loop instead of the one-call
step of engines/stack.py; --vs-loop: the two alternated step by step, both medians printed."""
import sys
import time

import torch

from bench.machine import respawn_with_huge_pages
from core.data import synthetic_prompts
from core.models import build_bundle, position_ids
from engines import decoder as D
from engines import stack as DS

respawn_with_huge_pages("bench.micro.decode_step")  # the workers' memory, as in `run`
torch.set_num_threads(2)
B = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 8
P, WARM, TIMED, PROFILED = 192, 3, 20, 10
dtype = torch.bfloat16 if "--bf16" in sys.argv else torch.float32
ATTN_KERNEL = "--sdpa" not in sys.argv
VS_LOOP = "--vs-loop" in sys.argv
b = build_bundle("opt-125m", seed=0, dtype=dtype, actor_only=True)
w = D.extract(b.actor)
prompts = synthetic_prompts(B, P, b.config.vocab_size, b.pad_id, seed=0)
if VS_LOOP:
    TIMED *= 2
T = P + WARM + TIMED + PROFILED
cache = D.new_cache(w, B, T, dtype, "cpu")
key_mask = torch.ones(B, T, dtype=torch.bool)
key_mask[:, :P] = prompts.attention_mask.bool()
pos = position_ids(prompts.attention_mask)
tok = torch.zeros(B, 1, dtype=torch.long)
with torch.no_grad():
    D.forward_(w, cache, prompts.input_ids, pos, 0, key_mask)
    steps = iter(range(WARM + TIMED + PROFILED))
    stacked = ATTN_KERNEL and "--loop" not in sys.argv and DS.applies(w, B)
    ps = DS.params(w)

    def step(fused: bool = stacked):
        i = next(steps)
        if fused:
            return DS.step(w, cache, tok, pos[:, -1:] + 1 + i, P + i, key_mask, ps=ps)
        return D.forward_(w, cache, tok, pos[:, -1:] + 1 + i, P + i, key_mask,
                          attn_kernel=ATTN_KERNEL)

    for _ in range(WARM):
        step()
    times, loop = [], []
    for i in range(TIMED):
        t = time.perf_counter()
        step(stacked and not (VS_LOOP and i % 2))
        (loop if VS_LOOP and i % 2 else times).append(time.perf_counter() - t)
    last = P + WARM + TIMED - 1
    if VS_LOOP:
        TIMED //= 2
        loop.sort()
        print(f"layer loop (alternated with decode_stack): min {loop[0] * 1e3:.1f} ms, median "
              f"{loop[TIMED // 2] * 1e3:.1f} ms")
    times.sort()
    print(f"{str(dtype)[6:]} decode step, batch {B}, at {P + WARM}-{last} cached "
          "positions: "
          f"min {times[0] * 1e3:.1f} ms, median {times[TIMED // 2] * 1e3:.1f} ms")
    if "--profile" in sys.argv:
        from torch.profiler import profile
        with profile(record_shapes=True) as prof:
            for _ in range(PROFILED):
                step()
        print(f"ATen ops over {PROFILED} steps (the linears' kernel is not an ATen op, so not "
              "listed):")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=15))
