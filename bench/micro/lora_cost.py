"""Cost of LoRA in hybrid's generation: opt-125m, batch 8, 128+64 tokens; no adapters, rank-16
adapters run unfused, and the same adapters folded into the weights for the generate.
Also times one fold + exact restore alone.

Run: python -m bench.micro.lora_cost (numbers in docs/performance.md)."""
import time

import torch

import engines
from core.data import synthetic_prompts
from core.models import build_bundle
from core.types import GenerationConfig, RunConfig
from engines import decoder as D
from engines import lora_fold

torch.set_num_threads(2)
B, P, G, R = 8, 128, 64, 16
setups = {}
for name, lora, mode in (("no adapters", 0, "auto"), ("unfused", R, "unfused"),
                         ("fused", R, "fused")):
    b = build_bundle("opt-125m", seed=0, lora_dim=lora)
    cfg = RunConfig(preset="opt-125m", batch=B, prompt_len=P, lora_dim=lora,
                    gen=GenerationConfig(gen_len=G))
    e = engines.get("hybrid", lora_mode=mode)
    s = e.init(b, cfg, seed=0)
    pr = synthetic_prompts(B, P, b.config.vocab_size, b.pad_id, seed=0)
    e.generate(s, pr, cfg.gen, seed=0)
    setups[name] = (e, s, pr, cfg, b)
res = {}
for rep in range(3):
    for name, (e, s, pr, cfg, _) in setups.items():
        t = time.perf_counter()
        e.generate(s, pr, cfg.gen, seed=rep)
        res.setdefault(name, []).append(time.perf_counter() - t)
for k, v in res.items():
    print(f"{k:12s} generate s (min of 3) {min(v):.3f}", [round(x, 3) for x in v])
w = D.extract(setups["fused"][4].actor)
fold = []
for _ in range(3):
    t = time.perf_counter()
    with lora_fold.lora_fused(w):
        pass
    fold.append(time.perf_counter() - t)
per_tok = (min(res["unfused"]) - min(res["fused"])) / G
print(f"fold + restore s (min of 3) {min(fold):.3f}; unfused costs {per_tok * 1e3:.1f} ms more "
      f"per token step; break-even at {min(fold) / max(per_tok, 1e-9):.1f} tokens")
