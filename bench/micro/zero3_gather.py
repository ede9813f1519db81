"""ZeRO-3 generation: gather per layer per token, or gather once per generate?

    torchrun --nproc_per_node 2 -m bench.micro.zero3_gather --preset opt-mini --batch 8 \\
        --prompt-len 32 --gen-len 32 --repeats 3 --out results/zero3_gather

The actor is one ZeRO-3 DeepSpeed engine over all ranks; each rank generates greedily for its
shard of the batch, the same tokens four ways:
  per-layer       HF generate on the ZeRO-3 module: its hooks all-gather every layer's
                  parameters on every forward, i.e. per layer per generated token (`hf`, ZeRO-3)
  gathered+hooks  the same inside one `GatheredParameters` over the whole model: the hooks
                  still release each layer after its forward, so later tokens gather again
  gather-once     `engines.zero.gathered` (DeepSpeed's `unwrap_model_for_generation`): gather
                  everything, remove the ZeRO hooks, generate, put the hooks back
  gather-copy     gather once, copy into a plain replica with no ZeRO hooks, generate there
                  (what an engine that gathers once and runs its own functions pays)
Times are the slowest rank's, median over the repeats after one warm-up; the tokens of all four
must be identical. Rank 0 prints the table and writes zero3_gather.{json,csv,png} to --out.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--preset", default="tiny-opt")
    a.add_argument("--batch", type=int, default=4, help="global batch (split over the ranks)")
    a.add_argument("--prompt-len", type=int, default=16)
    a.add_argument("--gen-len", type=int, default=16)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default="results/zero3_gather")
    args = a.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch.distributed as dist
    from deepspeed.runtime.zero import GatheredParameters

    from bench.results import atomic_write_csv, atomic_write_json
    from core.data import synthetic_prompts
    from core.models import build_bundle
    from core.types import GenerationConfig, RunConfig
    from engines import zero
    from engines.hf import hf_generate

    zero.init_dist()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")
    b = build_bundle(args.preset, seed=args.seed)
    replica = copy.deepcopy(b.actor)  # hook-free twin, filled from the gathered weights
    cfg = RunConfig(preset=args.preset, batch=args.batch // world, prompt_len=args.prompt_len,
                    zero_stage=3)
    engine = zero.initialize(b.actor, 1e-5, cfg)
    module, params = engine.module, list(engine.module.parameters())
    twin = dict(replica.named_parameters())
    full = synthetic_prompts(args.batch, args.prompt_len, b.config.vocab_size, b.pad_id,
                             seed=args.seed)
    n = args.batch // world
    prompts = type(full)(*(t[rank * n:(rank + 1) * n] for t in full))
    gen = GenerationConfig(gen_len=args.gen_len, greedy=True)

    def generate(model, **kw):
        return hf_generate(model, prompts, gen, seed=0, pad_id=b.pad_id, eos_id=b.eos_id, **kw)

    # Each returns (tokens, seconds spent gathering/copying before generation starts).
    def per_layer():
        return generate(module, synced_gpus=world > 1).seq, 0.0

    def gathered_hooks():
        t0 = time.perf_counter()
        with GatheredParameters(params):
            t = time.perf_counter() - t0
            return generate(module).seq, t

    def gather_once():
        t0 = time.perf_counter()
        with zero.gathered(engine):
            t = time.perf_counter() - t0
            return generate(module).seq, t

    @torch.no_grad()
    def gather_copy():
        t0 = time.perf_counter()
        with GatheredParameters(params):
            for name, p in module.named_parameters():
                twin[name].copy_(p)
        t = time.perf_counter() - t0
        return generate(replica).seq, t

    methods = {"per-layer": per_layer, "gathered+hooks": gathered_hooks,
               "gather-once": gather_once, "gather-copy": gather_copy}
    times = {k: [] for k in methods}
    gathers = {k: [] for k in methods}
    seqs = {}
    for rep in range(args.repeats + 1):  # repeat 0 is the warm-up
        for name, fn in methods.items():
            dist.barrier()
            t0 = time.perf_counter()
            seqs[name], g = fn()
            dt = torch.tensor([time.perf_counter() - t0, g], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank's times
            if rep:
                times[name].append(float(dt[0]))
                gathers[name].append(float(dt[1]))
    same = all(torch.equal(seqs["per-layer"], s) for s in seqs.values())
    ok = torch.tensor(int(same))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank != 0:
        return
    tokens = args.batch * args.gen_len
    base = statistics.median(times["per-layer"])
    rows = [dict(method=k, seconds=statistics.median(v), gather_s=statistics.median(gathers[k]),
                 tokens_per_s=tokens / statistics.median(v),
                 speedup_vs_per_layer=base / statistics.median(v)) for k, v in times.items()]
    meta = dict(preset=args.preset, ranks=world, batch=args.batch, prompt_len=args.prompt_len,
                gen_len=args.gen_len, repeats=args.repeats, threads=torch.get_num_threads(),
                identical_tokens=bool(ok))
    out = Path(args.out)
    atomic_write_json(out / "zero3_gather.json", dict(meta, rows=rows))
    import pandas as pd
    df = pd.DataFrame(rows)
    atomic_write_csv(out / "zero3_gather.csv", df)
    _plot(df, meta, out / "zero3_gather.png")
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if not ok:
        raise SystemExit("the methods generated different tokens")


def _plot(df, meta, path) -> None:
    from bench.results import atomic_write
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(df.method, df.seconds)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("seconds per generate (slowest rank)")
    ax.set_title(f"ZeRO-3 generation, {meta['preset']}, {meta['ranks']} ranks, "
                 f"B={meta['batch']} G={meta['gen_len']}", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
