"""Scale projection: predict RLHF PPO step time on GPU clusters from first principles.

One PPO step = generate (prefill + G-1 decode steps) -> sync -> score -> train, on a global batch of
B prompts (prompt P tokens, answer G tokens), split over `gpus` data-parallel ranks. Each phase is
priced as FLOPs / (peak * efficiency) or bytes / (bandwidth * efficiency), whichever is larger
(a roofline); collectives are priced by bytes each GPU receives over its slowest link. The numbers
this starts from (hardware, shapes, efficiencies) and the calibration rows are in
project_presets.py. Units: FLOPs, bytes, seconds; "bf16" = 2 bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .project_presets import (CRITIC_MODEL, DEFAULT_EFFICIENCY, ENGINES, GPUS, MAX_GLOBAL_BATCH,
                              MODELS, SWEEP_GPUS, SWEEP_MODELS, Efficiency, Gpu, Shape)

BF16 = 2                 # bytes per bf16/fp16 value (weights, grads, activations, KV cache)
ADAM_BYTES = 12          # fp32 master copy + Adam m + v, bytes per trainable parameter
ADAM_STEP_BYTES = 36     # bytes moved per trainable param by one Adam step (read p,m,v,g; write p,m,v,p16)
USABLE_MEMORY = 0.90     # of HBM: CUDA context, NCCL buffers and allocator fragmentation take the rest
PHASES = ("generate", "sync", "score", "train", "comm")


@dataclass(frozen=True)
class Config:
    """One configuration to project. `batch` is the global batch in prompts (None: largest fit)."""
    model: str = "opt-1.3b"
    gpus: int = 1
    gpu: str = "a100-80g"
    engine: str = "ds-hybrid"
    zero_stage: int = 3
    inference_tp: int = 1
    lora_dim: int = 0           # > 0: LoRA-only actor training (base weights frozen)
    tokens: float = 135e6
    prompt_len: int = 256
    gen_len: int = 256
    batch: int | None = None
    grad_ckpt: bool = True      # activation checkpointing for actor and critic
    offload_ref: bool = False   # reference model in host memory, streamed over PCIe per step
    critic: str = CRITIC_MODEL
    eff: Efficiency | None = None  # None: the engine's documented defaults
    eff_source: str = "defaults"

    @property
    def efficiency(self) -> Efficiency:
        return self.eff or DEFAULT_EFFICIENCY[self.engine]


# ---------------------------------------------------------------- counts (pure, hand-checkable)

def model_shape(name: str) -> Shape:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]


def param_count(s: Shape) -> int:
    """All parameters: per layer 12 d^2 + 13 d (q,k,v,o + fc1,fc2 weights and biases, 2 layernorms),
    token embedding V e (tied with the LM head), positions (P_max + 2) d (OPT offsets by 2), the
    final layernorm 2 d, and OPT-350m's in/out projections 2 e d when e != d."""
    d = s.d_model
    n = s.layers * (12 * d * d + 13 * d) + s.vocab * s.e + (s.positions + 2) * d + 2 * d
    return n + (2 * s.e * d if s.e != d else 0)


def matmul_params(s: Shape, lm_head: bool = True) -> int:
    """Weights one token multiplies through: the layers' 12 d^2, the projections, and the LM head
    (V e) or a value head (e) for critic and reward models."""
    proj = 2 * s.e * s.d_model if s.e != s.d_model else 0
    return s.layers * 12 * s.d_model ** 2 + proj + (s.vocab * s.e if lm_head else s.e)


def lora_param_count(s: Shape, r: int) -> int:
    """LoRA on every decoder linear: q,k,v,o (d->d) add r(d+d) each, fc1/fc2 (d<->4d) r(d+4d) each."""
    return s.layers * r * (4 * 2 * s.d_model + 2 * (s.d_model + s.ffn))


def flops_per_token_forward(s: Shape, ctx: int, lm_head: bool = True) -> float:
    """Forward FLOPs for one token attending to `ctx` positions: 2 per multiply-add through the
    weights, plus per layer 2 d ctx for q.k and 2 d ctx for the weighted sum of values."""
    return 2 * matmul_params(s, lm_head) + 4 * s.layers * s.d_model * ctx


def sequence_forward_flops(s: Shape, seq: int, lm_head: bool = True) -> float:
    """Forward FLOPs for a causal pass over `seq` tokens: token t attends to t positions."""
    return 2 * matmul_params(s, lm_head) * seq + 4 * s.layers * s.d_model * seq * (seq + 1) / 2


def train_flops(s: Shape, seq: int, lora_dim: int = 0, ckpt: bool = True,
                lm_head: bool = True) -> float:
    """Forward + backward FLOPs for one sequence. Backward = 2x forward (activation grads +
    weight grads) = the classic 6N per token; LoRA-only training skips the frozen weights' grads
    (4N) but pays the adapters' own 6 r-sized matmuls; checkpointing recomputes the forward (+2N)."""
    fwd = sequence_forward_flops(s, seq, lm_head)
    total = fwd * (2 if lora_dim else 3) + (fwd if ckpt else 0)
    return total + 6 * lora_param_count(s, lora_dim) * seq


def kv_cache_bytes(s: Shape, batch: int, seq: int, dtype_bytes: int = BF16) -> float:
    """Keys and values of every layer for `batch` sequences of `seq` tokens."""
    return batch * seq * 2 * s.layers * s.d_model * dtype_bytes


def decode_bytes_per_step(s: Shape, batch: int, ctx: int, dtype_bytes: int = BF16) -> float:
    """HBM bytes one decode step reads: every weight once (shared by the batch) + the KV cache of
    `ctx` earlier positions for each sequence."""
    return matmul_params(s) * dtype_bytes + kv_cache_bytes(s, batch, ctx, dtype_bytes)


def all_gather_bytes(total_bytes: float, n: int) -> float:
    """Bytes each of n ranks receives to assemble `total_bytes` (ring: (n-1)/n of it).
    ZeRO-3 parameter gathers and reduce-scatters of gradients move the same amount."""
    return total_bytes * (n - 1) / n


def zero3_gather_bytes(s: Shape, n: int) -> float:
    """Bytes per GPU to all-gather one full bf16 copy of a ZeRO-3-sharded model over n ranks."""
    return all_gather_bytes(param_count(s) * BF16, n)


def link_bw(gpu: Gpu, ranks: int) -> float:
    """Bandwidth of the slowest link a ring over `ranks` GPUs crosses: NVLink inside a node,
    InfiniBand (one NIC per GPU) once the ring spans nodes."""
    return gpu.nvlink_bw if ranks <= gpu.per_node else gpu.ib_bw


# ---------------------------------------------------------------- memory

def activation_bytes(s: Shape, batch: int, seq: int, ckpt: bool, lm_head: bool = True) -> float:
    """Training activations for `batch` sequences. A layer keeps ~s b d (34 + 5 a s / d) bytes in
    16-bit (Korthikanti et al. 2022); checkpointing keeps only each layer's input (2 s b d) plus one
    layer being recomputed. Logits: bf16 logits, log-softmax and their gradient (3 x 2 V bytes)."""
    per_layer = batch * seq * s.d_model * (34 + 5 * s.heads * seq / s.d_model)
    layers = (s.layers * BF16 * batch * seq * s.d_model + per_layer) if ckpt else s.layers * per_layer
    return layers + (3 * BF16 * s.vocab * batch * seq if lm_head else 0)


def memory_per_gpu(cfg: Config, b: int) -> dict[str, float]:
    """Bytes per GPU with b prompts per data-parallel rank: persistent states + the worst phase."""
    a, c, n, z, tp = model_shape(cfg.model), model_shape(cfg.critic), cfg.gpus, cfg.zero_stage, cfg.inference_tp
    seq = cfg.prompt_len + cfg.gen_len
    shard = lambda stage: n if z >= stage else 1          # ZeRO stage k shards its states n ways
    na, nc, nl = param_count(a), param_count(c), lora_param_count(a, cfg.lora_dim)
    trainable = nl if cfg.lora_dim else na
    states = {
        "actor_weights": (na + nl) * BF16 / shard(3),
        "actor_grads": trainable * BF16 / shard(2),
        "actor_adam": trainable * ADAM_BYTES / shard(1),
        "ref_weights": 0.0 if cfg.offload_ref else na * BF16 / shard(3),
        "critic_states": nc * (BF16 / shard(3) + BF16 / shard(2) + ADAM_BYTES / shard(1)),
        "reward_weights": nc * BF16 / shard(3),
        "inference_copy": na * BF16 / tp if cfg.engine == "ds-inference" else 0.0,
    }
    layer = (12 * a.d_model ** 2) * BF16
    gathered = 0.0
    if z == 3 and n > 1 and cfg.engine in ("hybrid", "ds-hybrid"):
        gathered = na * BF16 / tp                        # whole actor gathered once per generate
    elif z == 3 and n > 1:
        gathered = 2 * layer                             # one layer in use + one prefetched
    b_gen = b * tp                                       # a TP group generates for its tp ranks
    generate = gathered + kv_cache_bytes(a, b_gen, seq) / tp + b_gen * a.vocab * 4
    # no-grad scoring forward: one layer's activations live + bf16 logits and their log-softmax
    one_layer = b * seq * a.d_model * (34 + 5 * a.heads * seq / a.d_model)
    score = 2 * layer * (z == 3) + one_layer + 2 * BF16 * a.vocab * b * seq
    train = 2 * layer * (z == 3) + max(activation_bytes(a, b, seq, cfg.grad_ckpt),
                                       activation_bytes(c, b, seq, cfg.grad_ckpt, lm_head=False))
    peak = max(generate, score, train)
    return {**states, "peak_phase": peak, "total": sum(states.values()) + peak}


def memory_fit(cfg: Config, b: int) -> bool:
    gpu = GPUS[cfg.gpu]
    return memory_per_gpu(cfg, b)["total"] <= USABLE_MEMORY * gpu.memory


def largest_batch(cfg: Config) -> int:
    """Largest global batch (prompts, a multiple of `gpus`) that fits, capped at DeepSpeed-Chat's
    1024; 0 when not even one prompt per rank fits. Memory grows with b, so bisect."""
    cap = max(MAX_GLOBAL_BATCH // cfg.gpus, 1)
    if not memory_fit(cfg, 1):
        return 0
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if memory_fit(cfg, mid) else (lo, mid - 1)
    return lo * cfg.gpus


# ---------------------------------------------------------------- time per phase

def _roofline(flops: float, nbytes: float, gpu: Gpu, flop_eff: float, bw_eff: float) -> float:
    """Seconds for work that is bound by whichever of compute or memory traffic takes longer."""
    return max(flops / (gpu.bf16_flops * flop_eff), nbytes / (gpu.hbm_bw * bw_eff))


def generate_time(cfg: Config, b: float) -> tuple[float, float]:
    """(compute/memory seconds, exposed communication seconds) for one generate.

    A TP group of `inference_tp` GPUs generates for b * tp prompts, each GPU holding 1/tp of the
    weights and KV cache; decode step i reads weights + KV of P + i positions. `hf` under ZeRO-3
    gathers every layer for every forward (prefill and each token step); `hybrid`/`ds-hybrid`
    gather the whole actor once per generate; `ds-inference` generates from its own copy."""
    a, gpu, e, tp, n = model_shape(cfg.model), GPUS[cfg.gpu], cfg.efficiency, cfg.inference_tp, cfg.gpus
    b_gen, P = b * tp, cfg.prompt_len
    link = link_bw(gpu, n) * e.comm
    gather = zero3_gather_bytes(a, n) / link + a.layers * e.collective_latency_s
    z3_sharded = cfg.zero_stage == 3 and n > 1

    def tp_allreduce(tokens: float) -> float:   # 2 all-reduces of the hidden state per layer
        if tp == 1:
            return 0.0
        nbytes = 2 * (tp - 1) / tp * tokens * a.d_model * BF16
        return 2 * a.layers * (e.collective_latency_s + nbytes / (gpu.nvlink_bw * e.comm))

    # prefill: P tokens per prompt, weights read once; it yields the first answer token
    work = _roofline(b_gen * sequence_forward_flops(a, P) / tp, matmul_params(a) * BF16 / tp,
                     gpu, e.prefill, e.decode) + a.layers * e.layer_overhead_s
    comm = tp_allreduce(b_gen * P) + (max(0.0, gather - work) if z3_sharded and cfg.engine == "hf" else 0)
    # decode step j = 1 .. G-1 feeds answer token j: reads P + j - 1 cached positions
    for j in range(1, cfg.gen_len):
        t = _roofline(b_gen * flops_per_token_forward(a, P + j) / tp,
                      decode_bytes_per_step(a, b_gen, P + j - 1) / tp, gpu, e.prefill, e.decode)
        t += a.layers * e.layer_overhead_s            # launches the GPU cannot hide at small work
        work += t
        comm += tp_allreduce(b_gen)
        if z3_sharded and cfg.engine == "hf":
            comm += max(0.0, gather - t)              # per-layer gathers; prefetch hides up to t
    if z3_sharded and cfg.engine in ("hybrid", "ds-hybrid"):
        comm += gather                                # blocking gather before the first prefill
    return work, comm


def sync_time(cfg: Config) -> float:
    """`ds-inference` refreshes its inference copy after each train step: gather the ZeRO-3
    shards (if any), then copy 1/tp of the bf16 weights (read + write of HBM)."""
    if cfg.engine != "ds-inference":
        return 0.0
    a, gpu, e, n = model_shape(cfg.model), GPUS[cfg.gpu], cfg.efficiency, cfg.gpus
    t = 2 * param_count(a) * BF16 / cfg.inference_tp / (gpu.hbm_bw * e.decode)
    if cfg.zero_stage == 3 and n > 1:
        t += zero3_gather_bytes(a, n) / (link_bw(gpu, n) * e.comm) + a.layers * e.collective_latency_s
    return t


def score_time(cfg: Config, b: float) -> tuple[float, float]:
    """No-grad forwards over P + G tokens: actor and reference (LM heads), critic and reward
    (value heads). ZeRO-3 gathers each model once; an offloaded reference streams over PCIe.
    Transfers overlap the forwards (prefetch), so only what exceeds the compute is exposed."""
    a, c, gpu, e, n = (model_shape(cfg.model), model_shape(cfg.critic), GPUS[cfg.gpu],
                       cfg.efficiency, cfg.gpus)
    seq = cfg.prompt_len + cfg.gen_len
    flops = b * (2 * sequence_forward_flops(a, seq) + 2 * sequence_forward_flops(c, seq, False))
    work = flops / (gpu.bf16_flops * e.score)
    comm = 0.0
    if cfg.zero_stage == 3 and n > 1:
        nbytes = 2 * zero3_gather_bytes(a, n) + 2 * zero3_gather_bytes(c, n)
        comm += nbytes / (link_bw(gpu, n) * e.comm) + 2 * (a.layers + c.layers) * e.collective_latency_s
    if cfg.offload_ref:
        shard = n if cfg.zero_stage == 3 else 1
        comm += param_count(a) * BF16 / shard / (gpu.pcie_bw * e.pcie)
    return work, max(0.0, comm - work)


def train_time(cfg: Config, b: float) -> tuple[float, float]:
    """Actor and critic forward + backward (+ recompute) over P + G tokens, then Adam.
    Communication per step: ZeRO-3 gathers weights for forward and again for backward and
    reduce-scatters grads; stages 0-2 all-reduce grads (stage 1-2 as reduce-scatter + gather of
    updated weights: the same bytes). Overlapped with backward; only the excess is exposed."""
    a, c, gpu, e, n, z = (model_shape(cfg.model), model_shape(cfg.critic), GPUS[cfg.gpu],
                          cfg.efficiency, cfg.gpus, cfg.zero_stage)
    seq = cfg.prompt_len + cfg.gen_len
    flops = b * (train_flops(a, seq, cfg.lora_dim, cfg.grad_ckpt)
                 + train_flops(c, seq, 0, cfg.grad_ckpt, lm_head=False))
    trainable = (lora_param_count(a, cfg.lora_dim) if cfg.lora_dim else param_count(a)) + param_count(c)
    adam = trainable / (n if z >= 1 else 1) * ADAM_STEP_BYTES / (gpu.hbm_bw * e.decode)
    work = flops / (gpu.bf16_flops * e.train) + adam
    if n == 1:
        return work, 0.0
    nbytes, calls = 2 * all_gather_bytes(trainable * BF16, n), 2   # all-reduce of the grads
    if z == 3:   # reduce-scatter grads; gather every layer for forward and again for backward
        nbytes = all_gather_bytes(trainable * BF16, n) + 2 * (zero3_gather_bytes(a, n)
                                                              + zero3_gather_bytes(c, n))
        calls = 3 * (a.layers + c.layers)
    comm = nbytes / (link_bw(gpu, n) * e.comm) + calls * e.collective_latency_s
    return work, max(0.0, comm - work)


# ---------------------------------------------------------------- one prediction

def validate(cfg: Config) -> Config:
    """Raise ValueError (one line) on a configuration the model cannot price."""
    model_shape(cfg.model), model_shape(cfg.critic)
    if cfg.gpu not in GPUS:
        raise ValueError(f"unknown gpu {cfg.gpu!r}; choose from {', '.join(GPUS)}")
    if cfg.engine not in ENGINES:
        raise ValueError(f"unknown engine {cfg.engine!r}; choose from {', '.join(ENGINES)}")
    if cfg.gpus < 1 or cfg.zero_stage not in (0, 1, 2, 3) or cfg.lora_dim < 0:
        raise ValueError("need --gpus >= 1, --zero-stage in 0..3 and --lora-dim >= 0")
    tp = cfg.inference_tp
    if tp > 1 and cfg.engine in ("hf", "hybrid"):
        raise ValueError(f"{cfg.engine} generates on one device; --inference-tp needs ds-inference or ds-hybrid")
    if tp < 1 or cfg.gpus % tp or tp > GPUS[cfg.gpu].per_node:
        raise ValueError(f"--inference-tp {tp} must divide --gpus {cfg.gpus} and stay within one node")
    if min(cfg.prompt_len, cfg.gen_len) < 1 or cfg.prompt_len + cfg.gen_len > model_shape(cfg.model).positions:
        raise ValueError("need prompt and answer lengths >= 1 whose sum fits the model's positions")
    if not cfg.tokens > 0:
        raise ValueError(f"--tokens must be > 0, got {cfg.tokens}")
    if cfg.batch is not None and (cfg.batch < 1 or cfg.batch % cfg.gpus):
        raise ValueError(f"--batch {cfg.batch} must be a positive multiple of --gpus {cfg.gpus}")
    return cfg


def predict(cfg: Config) -> dict:
    """One row: the batch that fits, seconds per phase of a PPO step, hours for the token budget."""
    validate(cfg)
    batch = cfg.batch if cfg.batch is not None else largest_batch(cfg)
    b = batch / cfg.gpus                                  # prompts per data-parallel rank
    mem = memory_per_gpu(cfg, max(int(b), 1))["total"]
    row = dict(model=cfg.model, gpus=cfg.gpus, gpu=cfg.gpu, engine=cfg.engine, batch=batch,
               zero_stage=cfg.zero_stage, inference_tp=cfg.inference_tp, lora_dim=cfg.lora_dim,
               grad_ckpt=cfg.grad_ckpt, offload_ref=cfg.offload_ref,
               fits=batch > 0 and memory_fit(cfg, int(b)), mem_gib=round(mem / 2 ** 30, 1))
    if batch == 0:
        nan = float("nan")
        return {**row, **{f"{p}_s": nan for p in PHASES}, "step_s": nan, "total_hours": nan,
                "dominant_phase": "none (does not fit)", "efficiency": cfg.efficiency.short(),
                "eff_source": cfg.eff_source}
    gen, gen_comm = generate_time(cfg, b)
    score, score_comm = score_time(cfg, b)
    train, train_comm = train_time(cfg, b)
    phases = dict(generate=gen, sync=sync_time(cfg), score=score, train=train,
                  comm=gen_comm + score_comm + train_comm)
    step = sum(phases.values())
    samples = cfg.tokens / (cfg.prompt_len + cfg.gen_len)
    steps = math.ceil(samples / batch)
    return {**row, **{f"{p}_s": v for p, v in phases.items()}, "step_s": step,
            "total_hours": steps * step / 3600, "dominant_phase": max(phases, key=phases.get),
            "efficiency": cfg.efficiency.short(), "eff_source": cfg.eff_source}
