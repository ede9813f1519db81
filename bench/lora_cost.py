"""Cost of hybrid's unfused LoRA in generation: opt-125m, batch 8, 128+64 tokens, rank 0 vs 16.

Run: python bench/lora_cost.py (numbers in README, Performance notes)."""
import time, torch
torch.set_num_threads(2)
import engines
from core.models import build_bundle
from core.data import synthetic_prompts
from core.types import RunConfig, GenerationConfig
B, P, G = 8, 128, 64
res = {}
setups = {}
for lora in (0, 16):
    b = build_bundle("opt-125m", seed=0, lora_dim=lora)
    cfg = RunConfig(preset="opt-125m", batch=B, prompt_len=P, lora_dim=lora, gen=GenerationConfig(gen_len=G))
    e = engines.get("hybrid"); s = e.init(b, cfg, seed=0)
    pr = synthetic_prompts(B, P, b.config.vocab_size, b.pad_id, seed=0)
    e.generate(s, pr, cfg.gen, seed=0)
    setups[lora] = (e, s, pr, cfg)
for rep in range(3):
    for lora, (e, s, pr, cfg) in setups.items():
        t = time.perf_counter(); e.generate(s, pr, cfg.gen, seed=rep); res.setdefault(lora, []).append(time.perf_counter() - t)
for k, v in res.items():
    print("lora", k, "generate s (min of 3)", round(min(v), 3), [round(x, 3) for x in v])
