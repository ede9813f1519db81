"""Time one `hybrid` decode step (engines.decoder.forward_ on one token per row) after a prefill,
and print where its ATen time goes. opt-125m shape, batch 8, 192 cached positions, 2 threads.

Run: python bench/decode_step.py [--profile] (numbers in README, Performance notes)."""
import sys
import time

import torch

from core.data import synthetic_prompts
from core.models import build_bundle, position_ids
from engines import decoder as D

torch.set_num_threads(2)
B, P = 8, 192
b = build_bundle("opt-125m", seed=0)
w = D.extract(b.actor)
prompts = synthetic_prompts(B, P, b.config.vocab_size, b.pad_id, seed=0)
cache = D.new_cache(w, B, P + 1, torch.float32, "cpu")
key_mask = torch.ones(B, P + 1, dtype=torch.bool)
key_mask[:, :P] = prompts.attention_mask.bool()
pos = position_ids(prompts.attention_mask)
tok = torch.zeros(B, 1, dtype=torch.long)
with torch.no_grad():
    D.forward_(w, cache, prompts.input_ids, pos, 0, key_mask)

    def step():
        return D.forward_(w, cache, tok, pos[:, -1:] + 1, P, key_mask)

    for _ in range(3):
        step()
    times = []
    for _ in range(20):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"decode step at {P} cached positions: min {times[0] * 1e3:.1f} ms, "
          f"median {times[10] * 1e3:.1f} ms")
    if "--profile" in sys.argv:
        from torch.profiler import profile
        with profile(record_shapes=True) as prof:
            for _ in range(10):
                step()
        print("ATen ops over 10 steps (the linears' kernel is not an ATen op, so not listed):")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=15))
