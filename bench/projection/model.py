"""Scale projection: predict RLHF PPO step time on GPU clusters from first principles.

One PPO step = generate (prefill + G-1 decode steps) -> sync -> score -> train, on a global batch
of B prompts (prompt P tokens, answer G tokens) split over `gpus` data-parallel ranks. Each phase
is priced as FLOPs / (peak * efficiency) or bytes / (bandwidth * efficiency), whichever is larger
(a roofline); collectives by their latency and the bytes each GPU receives over its slowest
link, less what compute hides (overlap.py). FLOPs and bytes are bench/flops.py's, of the shapes
counts.py builds; hardware, shapes, efficiencies and DeepSpeed-Chat's published rows are data in
presets.py.
Units: FLOPs, bytes, seconds; bf16 = 2 bytes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..flops import decode_step_bytes, forward_flops, kv_bytes, train_flops
from .counts import (BF16, all_gather_bytes, default_critic, flop_shape, layer_activation_bytes,
                     layer_matmul_params, lora_param_count, matmul_params, model_arch,
                     param_count, train_activation_bytes, zero3_gather_bytes)
from .overlap import comm_s, gather_model_s, pass_exposed, reduce_scatter_s
from .presets import DEFAULT_EFFICIENCY, ENGINES, GPUS, MAX_GLOBAL_BATCH, Efficiency, Gpu

ADAM_BYTES = 12       # bytes per trainable param of fp32 master copy + Adam m + v
ADAM_STEP_BYTES = 36  # HBM bytes per param of a fused Adam step: read fp32 p,m,v + grad, write
                      # p,m,v + the bf16 copy
HOST_ADAM_BYTES = 30  # host bytes per param of CPU Adam: fp32 p,m,v read + write, fp32 grad, bf16 p
USABLE_MEMORY = 0.90  # of HBM; CUDA context, NCCL buffers and allocator fragmentation take the rest
STEP_PARTS = ("generate", "sync", "score", "train", "comm")   # a step's seconds, split


@dataclass(frozen=True)
class Config:
    """One configuration to project. `batch` is the global batch in prompts (None: largest fit)."""
    model: str = "opt-1.3b"
    gpus: int = 1
    gpu: str = "a100-80g"
    engine: str = "ds-hybrid"
    zero_stage: int = 3
    inference_tp: int = 1
    lora_dim: int = 0
    lora_only: bool = True      # with lora_dim > 0: train only the adapters (False: also the base)
    tokens: float = 135e6
    prompt_len: int = 256
    gen_len: int = 256
    batch: int | None = None
    grad_ckpt: bool = True      # activation checkpointing of actor and critic
    offload: bool = False       # ZeRO-Offload: grads and Adam states in host memory, CPU Adam
    critic: str | None = None   # critic and reward model; None: default_critic(model)
    eff: Efficiency | None = None  # None: the engine's documented defaults
    eff_source: str = "defaults"

    def __post_init__(self):
        if self.critic is None:
            object.__setattr__(self, "critic", default_critic(self.model))

    @property
    def efficiency(self) -> Efficiency:
        return self.eff or DEFAULT_EFFICIENCY[self.engine]


# ------------------------------------------------------------------ memory

def memory_per_gpu(cfg: Config, b: float) -> dict[str, float]:
    """Bytes per GPU with b prompts per data-parallel rank: persistent states + the worst phase."""
    a, c = model_arch(cfg.model), model_arch(cfg.critic)
    n, z, tp = cfg.gpus, cfg.zero_stage, cfg.inference_tp
    seq = cfg.prompt_len + cfg.gen_len
    shard = lambda stage: n if z >= stage else 1       # ZeRO stage k shards its state n ways
    na, nc, nl = param_count(a), param_count(c), lora_param_count(a, cfg.lora_dim)
    trainable = trainable_params(cfg) - nc                 # the actor's share
    kv = kv_bytes(flop_shape(a), b * tp, seq, BF16) / tp  # a TP group generates b * tp prompts
    states = {
        "actor_weights": (na + nl) * BF16 / shard(3),
        "actor_grads": 0.0 if cfg.offload else trainable * BF16 / shard(2),
        "actor_adam": 0.0 if cfg.offload else trainable * ADAM_BYTES / shard(1),
        "ref_weights": na * BF16 / shard(3),
        "critic": nc * BF16 / shard(3)
                  + (0.0 if cfg.offload else nc * (BF16 / shard(2) + ADAM_BYTES / shard(1))),
        "reward_weights": nc * BF16 / shard(3),
        "inference_copy": na * BF16 / tp if cfg.engine == "ds-inference" else 0.0,
        # DeepSpeed's inference workspace and our static cache outlive generate; hf's does not
        "kv_cache": kv if cfg.engine != "hf" else 0.0,
    }
    layer = layer_matmul_params(a) * BF16                 # one layer's bf16 weights
    in_flight = 2 * layer * (z == 3 and n > 1)            # ZeRO-3: a layer in use + one prefetched
    gathered = na * BF16 / tp if generate_gathers(cfg) == 1 else in_flight   # whole actor once
    # generate: + fp32 logits of the last position; score: one layer live + bf16 logits of actor
    # and reference + a log-softmax; train: the larger of actor's and critic's activations
    generate = gathered + (kv if cfg.engine == "hf" else 0.0) + b * tp * a.vocab * 4
    score = in_flight + layer_activation_bytes(a, b, seq) + 3 * BF16 * a.vocab * b * seq
    train = in_flight + max(train_activation_bytes(a, b, seq, cfg.grad_ckpt),
                            train_activation_bytes(c, b, seq, cfg.grad_ckpt, lm_head=False))
    peak = max(generate, score, train)
    return {**states, "peak_phase": peak, "total": sum(states.values()) + peak}


def memory_fit(cfg: Config, b: float) -> bool:
    return memory_per_gpu(cfg, b)["total"] <= USABLE_MEMORY * GPUS[cfg.gpu].memory


def largest_batch(cfg: Config) -> int:
    """Largest global batch that fits: a power of two per rank (as practitioners pick), at most
    DeepSpeed-Chat's 1024 prompts per step; 0 when not even one prompt per rank fits."""
    cap = max(MAX_GLOBAL_BATCH // cfg.gpus, 1)
    if not memory_fit(cfg, 1):
        return 0
    b = 1
    while 2 * b <= cap and memory_fit(cfg, 2 * b):
        b *= 2
    return b * cfg.gpus


# ------------------------------------------------------------------ communication (bytes per GPU)

def generate_gathers(cfg: Config) -> int:
    """Whole-actor ZeRO-3 all-gathers per generate: `hf` gathers layer by layer for every forward
    (1 prefill + G-1 decode steps), `hybrid` / `ds-hybrid` once; none unsharded."""
    if cfg.zero_stage < 3 or cfg.gpus == 1 or cfg.engine == "ds-inference":
        return 0
    return cfg.gen_len if cfg.engine == "hf" else 1


def score_comm_bytes(cfg: Config) -> float:
    """ZeRO-3 gathers each of actor, reference, critic and reward once for the scoring forwards."""
    if cfg.zero_stage < 3 or cfg.gpus == 1:
        return 0.0
    a, c, n = model_arch(cfg.model), model_arch(cfg.critic), cfg.gpus
    return 2 * zero3_gather_bytes(a, n) + 2 * zero3_gather_bytes(c, n)


def trainable_params(cfg: Config) -> int:
    """Actor params Adam updates (adapters, plus the base unless LoRA-only) + the critic's."""
    a, c = model_arch(cfg.model), model_arch(cfg.critic)
    base = 0 if cfg.lora_dim and cfg.lora_only else param_count(a)
    return base + lora_param_count(a, cfg.lora_dim) + param_count(c)


def train_comm_bytes(cfg: Config) -> float:
    """Per train step: stages 0-2 all-reduce the bf16 grads (stages 1-2 as reduce-scatter + gather
    of updated weights: the same bytes); ZeRO-3 reduce-scatters grads and gathers actor and
    critic for forward and backward, and once more for the recompute under checkpointing."""
    n = cfg.gpus
    if n == 1:
        return 0.0
    grads = all_gather_bytes(trainable_params(cfg) * BF16, n)
    if cfg.zero_stage < 3:
        return 2 * grads
    a, c = model_arch(cfg.model), model_arch(cfg.critic)
    return grads + (2 + cfg.grad_ckpt) * (zero3_gather_bytes(a, n) + zero3_gather_bytes(c, n))


# ------------------------------------------------------------------ time per phase

def _roofline(flops: float, nbytes: float, gpu: Gpu, flop_eff: float, bw_eff: float) -> float:
    """Seconds for work bound by whichever of compute or memory traffic takes longer."""
    return max(flops / (gpu.bf16_flops * flop_eff), nbytes / (gpu.hbm_bw * bw_eff))


def hybrid_folds_lora(cfg: Config) -> bool:
    """Whether `hybrid` folds the LoRA adapters into the weights for this generate: for answers
    of the engine's own LORA_FUSE_MIN_TOKENS or more."""
    if cfg.engine != "hybrid" or cfg.lora_dim == 0:
        return False
    from engines.hybrid import HybridEngine   # imports torch: only where the answer depends on it
    return cfg.gen_len >= HybridEngine.LORA_FUSE_MIN_TOKENS


def generate_time(cfg: Config, b: float) -> tuple[float, float]:
    """(seconds of generation work, seconds of exposed communication) for one generate.

    A TP group of `inference_tp` GPUs generates for b * tp prompts, each GPU holding 1/tp of the
    weights and KV cache, with 2 all-reduces of the hidden states per layer per forward. A
    token step costs its roofline or the host's time to issue its layers, whichever is longer,
    plus the generate loop's host work. `hf`'s per-layer gathers are prefetched during the step,
    so only their excess over it is exposed; the gather-once of `hybrid` / `ds-hybrid` blocks.
    LoRA adapters: DeepSpeed fuses them into the weights for generation, and so does `hybrid`
    for answers of its LORA_FUSE_MIN_TOKENS or more (folding and restoring cost ~4 passes over the
    adapted weights per generate); `hf` (PEFT), and `hybrid` for shorter answers, run them
    unfused, reading their weights and paying 2 FLOPs per adapter weight."""
    a, gpu, e, tp = model_arch(cfg.model), GPUS[cfg.gpu], cfg.efficiency, cfg.inference_tp
    s, bg, P = flop_shape(a), b * tp, cfg.prompt_len
    folds = hybrid_folds_lora(cfg)
    unfused = cfg.engine == "hf" or (cfg.engine == "hybrid" and not folds)
    adapters = lora_param_count(a, cfg.lora_dim) if unfused else 0
    gather = gather_model_s(cfg, a)
    per_forward = cfg.engine == "hf" and generate_gathers(cfg) > 0

    def step(flops: float, nbytes: float, tokens: float) -> tuple[float, float]:
        flops, nbytes = flops + 2 * adapters * tokens, nbytes + adapters * BF16
        t = max(_roofline(flops / tp, nbytes / tp, gpu, e.prefill, e.decode), a.layers * e.launch_s)
        t += e.token_sync_s
        comm = max(0.0, gather - t) if per_forward else 0.0
        if tp > 1:
            allreduce = 2 * all_gather_bytes(tokens * a.d_model * BF16, tp)
            comm += 2 * a.layers * (e.collective_latency_s + allreduce / (gpu.nvlink_bw * e.comm))
        return t, comm

    # prefill reads the weights once for P tokens per prompt; it yields answer token 1
    work, comm = step(bg * forward_flops(s, 1, P, logits=1), s.weight_bytes, bg * P)
    for j in range(1, cfg.gen_len):   # decode step j feeds answer token j, P + j - 1 cached
        t, c = step(bg * forward_flops(s, 1, 1, past=P + j - 1),
                    decode_step_bytes(s, bg, P + j - 1, BF16), bg)
        work, comm = work + t, comm + c
    if folds:  # read + write the adapted weights to fold, and again to restore
        work += _roofline(0.0, 4 * matmul_params(a, lm_head=False) * BF16 / tp, gpu, e.prefill,
                          e.decode)
    if not per_forward:
        comm += generate_gathers(cfg) * gather
    return work, comm


def sync_time(cfg: Config) -> float:
    """`ds-inference` refreshes its copy after each train step: gather ZeRO-3 shards (if any),
    then copy its 1/tp of the bf16 weights (an HBM read + write)."""
    if cfg.engine != "ds-inference":
        return 0.0
    a, gpu, e = model_arch(cfg.model), GPUS[cfg.gpu], cfg.efficiency
    t = 2 * param_count(a) * BF16 / cfg.inference_tp / (gpu.hbm_bw * e.decode)
    if cfg.zero_stage == 3 and cfg.gpus > 1:
        t += gather_model_s(cfg, a)
    return t


def score_time(cfg: Config, b: float) -> tuple[float, float]:
    """No-grad forwards over P + G tokens of actor and reference (LM heads, adapters unfused),
    critic and reward (value heads). Each reads its weights at least once: with few tokens a
    forward is bound by that, not by its FLOPs (a matmul of M rows does ~M FLOPs per weight
    byte; an A100 needs 153 to be compute-bound: NVIDIA's matrix multiplication background
    guide). Under ZeRO-3 each forward's fetches hide as overlap.pass_exposed prices."""
    a, c, gpu, e = model_arch(cfg.model), model_arch(cfg.critic), GPUS[cfg.gpu], cfg.efficiency
    T, logits = cfg.prompt_len + cfg.gen_len, cfg.gen_len + 1
    actor = flop_shape(a, adapters=lora_param_count(a, cfg.lora_dim))
    critic = flop_shape(c, lm_head=False)
    passes = [(a, actor, logits, True), (a, flop_shape(a), logits, True),
              (c, critic, 0, False), (c, critic, 0, False)]    # actor, reference, critic, reward
    work = comm = 0.0
    for arch, shape, kept, head in passes:
        t = _roofline(b * forward_flops(shape, 1, T, logits=kept), shape.weight_bytes, gpu,
                      e.score, e.decode)
        work += t
        if score_comm_bytes(cfg):
            comm += pass_exposed(cfg, arch, t, lm_head=head)[0]
    return work, comm


def train_time(cfg: Config, b: float) -> tuple[float, float]:
    """Actor and critic forward + backward (+ recompute) over P + G tokens, at least one read of
    the weights per pass, then Adam: fused on the GPU, or under ZeRO-Offload grads down and bf16
    weights up over PCIe while the node's CPUs run Adam. ZeRO-3 fetches hide pass by pass
    (overlap.pass_exposed), the gradient reduce-scatter in what the backward leaves; stages 0-2
    all-reduce the gradients behind the whole backward."""
    a, c, gpu, e = model_arch(cfg.model), model_arch(cfg.critic), GPUS[cfg.gpu], cfg.efficiency
    n, adapters = cfg.gpus, lora_param_count(a, cfg.lora_dim)
    T, ckpt = cfg.prompt_len + cfg.gen_len, cfg.grad_ckpt
    actor, critic = flop_shape(a, adapters=adapters), flop_shape(c, lm_head=False)
    trained = adapters if cfg.lora_dim and cfg.lora_only else None
    flops = b * train_flops(actor, critic, 1, cfg.prompt_len, cfg.gen_len, recompute=ckpt,
                            trained=trained)
    fa = b * forward_flops(actor, 1, T, logits=cfg.gen_len + 1)
    fc = b * forward_flops(critic, 1, T, logits=0)
    wgrad = fa if trained is None else 2 * trained * b * T
    # (model, forward FLOPs, backward FLOPs): forward, recompute, and backward passes
    models = [(a, actor, fa, fa + wgrad, True), (c, critic, fc, 2 * fc, False)]
    reads = sum((3 + ckpt) * shape.weight_bytes for _, shape, *_ in models)   # + grads written
    per_rank = trainable_params(cfg) / (n if cfg.zero_stage >= 1 else 1)
    if cfg.offload:
        adam = (2 * BF16 * per_rank / (gpu.pcie_bw * e.pcie)
                + per_rank * min(n, gpu.per_node) * HOST_ADAM_BYTES / (gpu.host_bw * e.host))
    else:
        adam = per_rank * ADAM_STEP_BYTES / (gpu.hbm_bw * e.decode)
    work = _roofline(flops, reads, gpu, e.train, e.decode) + adam
    if n == 1:
        return work, 0.0
    if cfg.zero_stage < 3:
        return work, max(0.0, comm_s(cfg, train_comm_bytes(cfg), 2) - work)
    rate = gpu.bf16_flops * e.train
    comm = slack = 0.0
    for arch, _, fwd, bwd, head in models:
        for pass_flops in [fwd] * (1 + ckpt):
            comm += pass_exposed(cfg, arch, pass_flops / rate, lm_head=head)[0]
        exposed, left = pass_exposed(cfg, arch, bwd / rate, lm_head=head)
        comm, slack = comm + exposed, slack + left
    return work, comm + max(0.0, reduce_scatter_s(cfg, trainable_params(cfg)) - slack)


# ------------------------------------------------------------------ one prediction

def check_config(cfg: Config) -> Config:
    """Raise ValueError (one line) for a configuration the model cannot price."""
    actor, critic = model_arch(cfg.model), model_arch(cfg.critic)
    if cfg.gpu not in GPUS:
        raise ValueError(f"unknown gpu {cfg.gpu!r}; choose from {', '.join(GPUS)}")
    if cfg.engine not in ENGINES:
        raise ValueError(f"unknown engine {cfg.engine!r}; choose from {', '.join(ENGINES)}")
    if not 1 <= cfg.gpus <= 100_000 or cfg.zero_stage not in (0, 1, 2, 3) or cfg.lora_dim < 0:
        raise ValueError("need --gpus from 1 to 100,000, --zero-stage in 0..3 and --lora-dim >= 0")
    width = min(actor.d_model, actor.e)                    # as `rlhf-bench run` checks
    if cfg.lora_dim > width:
        raise ValueError(f"--lora-dim {cfg.lora_dim} is larger than {cfg.model}'s layer width "
                         f"{width}")
    tp = cfg.inference_tp
    if tp > 1 and cfg.engine in ("hf", "hybrid"):
        raise ValueError(f"{cfg.engine} generates on one device; "
                         "--inference-tp > 1 needs ds-inference or ds-hybrid")
    if tp < 1 or cfg.gpus % tp or tp > GPUS[cfg.gpu].per_node:
        raise ValueError(f"--inference-tp {tp} must divide --gpus {cfg.gpus} and fit in one node")
    seq = cfg.prompt_len + cfg.gen_len
    if min(cfg.prompt_len, cfg.gen_len) < 1 or seq > min(actor.positions, critic.positions):
        raise ValueError("need --prompt-len, --gen-len >= 1 summing to at most the actor's and "
                         "the critic's positions")
    if critic.tokenizer != actor.tokenizer:
        raise ValueError(f"--critic {cfg.critic} reads {critic.tokenizer}'s tokens, {cfg.model} "
                         f"writes {actor.tokenizer}'s: the critic and reward model score the "
                         f"actor's answers, so they share its tokenizer")
    if not (cfg.tokens > 0 and math.isfinite(cfg.tokens)):
        raise ValueError(f"--tokens must be a positive number, got {cfg.tokens}")
    if cfg.batch is not None and (cfg.batch < 1 or cfg.batch % cfg.gpus):
        raise ValueError(f"--batch {cfg.batch} must be a positive multiple of --gpus {cfg.gpus}")
    return cfg


def predict(cfg: Config) -> dict:
    """One row: the batch, seconds per phase of one PPO step, hours for the token budget, and the
    assumptions it rests on."""
    check_config(cfg)
    batch = cfg.batch if cfg.batch is not None else largest_batch(cfg)
    b = batch / cfg.gpus                                   # prompts per data-parallel rank
    row = dict(model=cfg.model, critic=cfg.critic, gpus=cfg.gpus, gpu=cfg.gpu, engine=cfg.engine,
               batch=batch, zero_stage=cfg.zero_stage, inference_tp=cfg.inference_tp,
               lora_dim=cfg.lora_dim, lora_only=cfg.lora_only, grad_ckpt=cfg.grad_ckpt,
               offload=cfg.offload, fits=batch > 0 and memory_fit(cfg, b),
               mem_gib=round(memory_per_gpu(cfg, max(b, 1))["total"] / 2 ** 30, 1))
    times = dict.fromkeys(STEP_PARTS, math.nan)
    if batch > 0:
        gen, gen_comm = generate_time(cfg, b)
        score, score_comm = score_time(cfg, b)
        train, train_comm = train_time(cfg, b)
        times = dict(generate=gen, sync=sync_time(cfg), score=score, train=train,
                     comm=gen_comm + score_comm + train_comm)
    step = sum(times.values())
    steps = math.ceil(cfg.tokens / (cfg.prompt_len + cfg.gen_len) / batch) if batch else math.nan
    return {**row, **{f"{p}_s": v for p, v in times.items()}, "step_s": step,
            "total_hours": steps * step / 3600,
            "dominant_phase": max(times, key=times.get) if batch else "none: does not fit",
            "efficiency": cfg.efficiency.short(), "eff_source": cfg.eff_source}


def auto_tp(cfg: Config) -> int:
    """`--inference-tp auto`: the TP degree (1, 2, 4, 8; dividing the GPUs, within a node) that
    lets the largest batch fit, the smallest on ties; engines without TP always get 1."""
    if cfg.engine in ("hf", "hybrid"):
        return 1
    options = [t for t in (1, 2, 4, 8) if cfg.gpus % t == 0 and t <= GPUS[cfg.gpu].per_node]
    return max(options, key=lambda t: (largest_batch(dataclasses.replace(cfg, inference_tp=t)), -t))
