"""What chunked prefill buys `hybrid`: generation's peak memory above the process's baseline,
and prefill time, with the prompt prefilled whole or in chunks (hybrid's prefill_tokens, 1024
tokens by default, and 256), beside `hf`.
opt-125m, fp32, batch 16, 128 + 128 tokens, 2 threads; each case in its own process, since
peak RSS only grows.

Run: python -m bench.micro.prefill_chunks (numbers in docs/performance.md)."""
import resource
import subprocess
import sys
import time

B, P, G = 16, 128, 128
REPEATS = 7
CASES = {"hf": ("hf", None), "hybrid, chunked": ("hybrid", None),
         "hybrid, 256-token chunks": ("hybrid", 256),
         "hybrid, whole prompt": ("hybrid", 10 ** 9)}


def measure(engine: str, chunk) -> str:
    import psutil
    import torch

    import engines
    from core.data import synthetic_prompts
    from core.models import build_bundle
    from core.types import GenerationConfig, RunConfig
    torch.set_num_threads(2)
    b = build_bundle("opt-125m", seed=0)
    cfg = RunConfig(preset="opt-125m", batch=B, prompt_len=P, gen=GenerationConfig(gen_len=G))
    e = engines.get(engine, **({"prefill_tokens": chunk} if chunk else {}))
    s = e.init(b, cfg, seed=0)
    p = synthetic_prompts(B, P, b.config.vocab_size, b.pad_id, seed=0)
    small = synthetic_prompts(1, 4, b.config.vocab_size, b.pad_id, seed=0)
    e.generate(s, small, GenerationConfig(gen_len=2), seed=0)  # lazy set-up, tiny shapes
    e.release()
    base = psutil.Process().memory_info().rss  # memory first: ru_maxrss never comes down
    e.generate(s, p, cfg.gen, seed=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prefill = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        e.generate(s, p, GenerationConfig(gen_len=1), seed=0)
        prefill.append(time.perf_counter() - t)
    return f"{(peak - base) / 2 ** 20:.0f} {min(prefill):.3f}"


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(measure(sys.argv[1], int(sys.argv[2]) or None))
        sys.exit()
    print(f"opt-125m fp32, batch {B}, {P} + {G} tokens: generation peak RSS above baseline, "
          f"prefill (min of {REPEATS})")
    for name, (engine, chunk) in CASES.items():
        out = subprocess.run([sys.executable, __file__, engine, str(chunk or 0)],
                             capture_output=True, text=True, check=True).stdout.split()
        print(f"{name:22s} {out[-2]:>5s} MB  {out[-1]} s")
