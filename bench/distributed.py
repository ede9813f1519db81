"""Multi-rank runs: data-parallel PPO under torchrun or the deepspeed launcher.

    torchrun --nproc_per_node N -m bench run --zero-stage 2 ...
    deepspeed --num_gpus N --no_local_rank --module bench run --zero-stage 2 ...

Every rank runs the whole harness with the same options, so the ranks start the same engines
in the same order; each engine's worker processes (one per rank) form their own process group
on MASTER_PORT + 1 + the engine's place in the run's engine list (the worker spec's
`engine_index`), so successive engines never share a rendezvous (and never the launcher's own
store). In a worker, each rank generates, scores and trains on its shard of every prompt batch
(rows r*B/N .. (r+1)*B/N) with its own sampling seed; DeepSpeed averages the gradients and ZeRO
shards the states. At the end of each step the ranks send their rows to rank 0, which writes
the slowest rank's figure under the usual metric (seconds, peak memory; metrics averaged) and
every rank's own as `<metric>_rank<r>`, so the summary reads the slowest rank's time as the step
time. Rank 0 writes results to --out; rank r to --out/rank<r> (its worker logs and its own
parity probe).
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from .options import BenchOptions, ConfigError

# the slowest / largest rank counts
_MAX = ("seconds", "peak_rss_mb", "peak_mem_mb", "peak_reserved_mb", "peak_device_mb")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def launch_info() -> dict:
    return dict(rank=rank(), world_size=world())


def run_dir(out: Path) -> Path:
    """Where this rank's harness writes: --out on rank 0, --out/rank<r> on the others."""
    return out if is_main() else out / f"rank{rank()}"


def check(o: BenchOptions) -> None:
    """Options a multi-rank run cannot take (one line each)."""
    n = world()
    if n > 1 and o.batch % n:
        raise ConfigError(f"--batch {o.batch} does not split over {n} ranks: use a multiple "
                          f"of {n}")
    if n > 1 and o.zero_stage < 0:
        raise ConfigError(f"{n} ranks train data-parallel through DeepSpeed: pass "
                          f"--zero-stage 0..3")
    if o.inference_tp > 1 and n % o.inference_tp:
        raise ConfigError(f"--inference-tp {o.inference_tp} needs a multiple of "
                          f"{o.inference_tp} ranks (launched: {n}); use torchrun "
                          f"--nproc_per_node {o.inference_tp}")


class Dist:
    """One rank of a multi-rank worker: shards inputs, gathers each step's rows to rank 0."""

    def __init__(self, o: BenchOptions):
        self.o, self.rank, self.world = o, rank(), world()

    def run_config(self, o: BenchOptions):
        return o.run_config().replace(batch=o.batch // self.world)

    def shard(self, batches: list, seed: int) -> tuple[list, int]:
        from core.rng import fold_in
        b = self.o.batch // self.world
        rows = slice(self.rank * b, (self.rank + 1) * b)
        return [type(p)(*(t[rows] for t in p)) for p in batches], fold_in(seed, 7, self.rank)

    def end_step(self, rec) -> None:
        """Send this step's held rows to rank 0, which writes the aggregate and per-rank rows."""
        import torch.distributed as dist
        from .results import append_jsonl
        mine, rec.held = rec.held, []
        every = [None] * self.world
        dist.all_gather_object(every, mine)
        if self.rank != 0:
            for r in mine:  # this rank's own view, in its own run directory
                append_jsonl(rec.path, r)
            return
        keys = [(r["phase"], r["metric"]) for r in every[0]]
        if any([(r["phase"], r["metric"]) for r in rows] != keys for rows in every):
            raise RuntimeError("ranks measured different phases in one step")
        for i, r in enumerate(every[0]):
            vals = [rows[i]["value"] for rows in every]
            if r["metric"] in _MAX:
                v = max(vals)
            elif r["metric"] == "tokens":  # each rank generated its own shard's
                v = sum(vals)
            elif r["phase"] == "metrics":
                v = sum(vals) / len(vals)
            else:
                v = r["value"]
            append_jsonl(rec.path, dict(r, value=v))
            for k, x in enumerate(vals):
                append_jsonl(rec.path, dict(r, metric=f"{r['metric']}_rank{k}", value=x))


def setup(o: BenchOptions, engine_index: int, rec):
    """In a worker: join this engine's process group when launched on several ranks
    (`engine_index`: the engine's place in the run's engine list).

    Returns a Dist, or None for a single-process run. Holds `rec`'s step rows from now on."""
    if world() == 1:
        return None
    import torch
    import torch.distributed as dist
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # our own store, not the launcher's
    base = int(os.environ.get("MASTER_PORT", "29500"))
    os.environ["MASTER_PORT"] = str(base + 1 + engine_index)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = o.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)  # "cuda" then means this rank's own device
    elif not o.threads and "OMP_NUM_THREADS" not in os.environ:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world()))  # the deepspeed launcher
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))  # sets no threads
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    rec.held = []
    return Dist(o)
