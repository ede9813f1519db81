"""Scale projection: predict RLHF PPO step time on GPU clusters from first principles.

One PPO step = generate (prefill + G-1 decode steps) -> sync -> score -> train, on a global batch
of B prompts (prompt P tokens, answer G tokens) split over `gpus` data-parallel ranks. Each phase
is priced as FLOPs / (peak * efficiency) or bytes / (bandwidth * efficiency), whichever is larger
(a roofline); collectives by the bytes each GPU receives over its slowest link. Hardware, shapes,
efficiencies and DeepSpeed-Chat's calibration rows are data in project_presets.py.
Units: FLOPs, bytes, seconds; bf16 = 2 bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .presets import (CALIBRATION, CRITIC_MODEL, DEFAULT_EFFICIENCY, ENGINES, GPUS,
                              HELD_OUT, MAX_GLOBAL_BATCH, MODELS, SWEEP_GPUS, SWEEP_MODELS,
                              Efficiency, Gpu, Shape)
from ..results import atomic_write

BF16 = 2              # bytes per bf16 value (weights, grads, activations, KV cache, logits)
ADAM_BYTES = 12       # bytes per trainable param of fp32 master copy + Adam m + v
ADAM_STEP_BYTES = 36  # HBM bytes per param of a fused Adam step: read fp32 p,m,v + grad, write
                      # p,m,v + the bf16 copy
HOST_ADAM_BYTES = 30  # host bytes per param of CPU Adam: fp32 p,m,v read + write, fp32 grad, bf16 p
USABLE_MEMORY = 0.90  # of HBM; CUDA context, NCCL buffers and allocator fragmentation take the rest
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


# ------------------------------------------------------------------ counts (hand-checkable)

def default_critic(actor: str) -> str:
    """DeepSpeed-Chat pairs every OPT actor with an OPT-350m critic and reward model; its Llama-2
    scripts, like most recipes for other families, start them from the actor's own shape (a
    critic reads the actor's tokens, so it shares its tokenizer)."""
    shape = MODELS.get(actor)
    return CRITIC_MODEL if shape is None or shape.family == "opt" else actor


def model_shape(name: str) -> Shape:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]


def layer_matmul_params(s: Shape) -> int:
    """One layer's linear weights: q and o (d x d), k and v (d x kv; kv = d without grouped-query
    attention), and the MLP's two matrices (d x ffn; three when gated)."""
    return 2 * s.d_model ** 2 + 2 * s.d_model * s.kv + (3 if s.gated else 2) * s.d_model * s.ffn


def param_count(s: Shape) -> int:
    """OPT: per layer the linears + 4 d (q,k,v,o biases) + ffn + d (fc1, fc2 biases) + 4 d (2
    layernorms); token embedding V e (tied with the LM head); positions (P_max + 2) d (OPT offsets
    them by 2); final layernorm 2 d; OPT-350m's projections 2 e d. Llama family: per layer the
    linears + 2 d (2 RMSNorms) + d + 2 kv (Qwen2's q,k,v biases); embedding V d, and as much
    again for an untied head; final RMSNorm d."""
    d, f, L = s.d_model, s.ffn, s.layers
    if s.family == "llama":
        per_layer = layer_matmul_params(s) + 2 * d + (d + 2 * s.kv) * s.qkv_bias
        return L * per_layer + s.vocab * d * (1 if s.tied else 2) + d
    n = L * (layer_matmul_params(s) + 9 * d + f) + s.vocab * s.e + (s.positions + 2) * d
    return n + 2 * d * s.final_norm + (2 * s.e * d if s.e != d else 0)


# engines.hybrid.HybridEngine.LORA_FUSE_MIN_TOKENS (tests/test_project.py checks they agree)
HYBRID_FOLD_MIN_TOKENS = 48


def matmul_params(s: Shape, lm_head: bool = True) -> int:
    """Weights each token multiplies through: every layer's linears, the projections, and the
    LM head (V e) or a value head (e) for critic and reward models."""
    proj = 2 * s.e * s.d_model if s.e != s.d_model else 0
    return s.layers * layer_matmul_params(s) + proj + (s.vocab * s.e if lm_head else s.e)


def lora_param_count(s: Shape, r: int) -> int:
    """LoRA on every decoder linear: q and o add r (d + d), k and v r (d + kv), each MLP matrix
    (two, or three when gated) r (d + ffn)."""
    d = s.d_model
    return s.layers * r * (2 * 2 * d + 2 * (d + s.kv) + (3 if s.gated else 2) * (d + s.ffn))


def flops_per_token_forward(s: Shape, ctx: int, lm_head: bool = True) -> float:
    """One token attending to `ctx` positions: 2 FLOPs per weight, plus per layer 2 d ctx for the
    scores q.k and 2 d ctx for the weighted sum of values."""
    return 2 * matmul_params(s, lm_head) + 4 * s.layers * s.d_model * ctx


def sequence_forward_flops(s: Shape, seq: int, lm_head: bool = True,
                           logits: int | None = None) -> float:
    """Causal forward over `seq` tokens (token t attends to t positions), summed in closed form,
    with the LM head at `logits` of the positions (all by default): generation keeps the last
    prompt position's, scoring and training the G+1 that emit answer tokens, as the harness's
    bench/flops.py counts them, so that efficiencies measured there mean the same here."""
    head = s.vocab * s.e if lm_head else 0
    kept = seq if logits is None else logits
    return (2 * (matmul_params(s, lm_head) - head) * seq + 2 * head * kept
            + 4 * s.layers * s.d_model * seq * (seq + 1) / 2)


def train_flops(s: Shape, seq: int, lora_dim: int = 0, lora_only: bool = True, ckpt: bool = True,
                lm_head: bool = True, logits: int | None = None) -> float:
    """Forward + backward for one sequence. Backward = activation grads + weight grads = 2x the
    forward (the 6N per token rule); LoRA-only training skips the frozen weights' grads (4N);
    checkpointing recomputes the forward (+2N). Adapters run unfused: 2 per adapter weight per
    token forward, 6 with backward."""
    fwd = sequence_forward_flops(s, seq, lm_head, logits)
    base = fwd * (2 if lora_dim and lora_only else 3) + (fwd if ckpt else 0)
    return base + (6 + 2 * ckpt) * lora_param_count(s, lora_dim) * seq


def kv_cache_bytes(s: Shape, batch: float, seq: int, dtype_bytes: int = BF16) -> float:
    """Keys and values of every layer for `batch` sequences of `seq` positions (kv wide each)."""
    return batch * seq * 2 * s.layers * s.kv * dtype_bytes


def decode_bytes_per_step(s: Shape, batch: float, ctx: int, dtype_bytes: int = BF16) -> float:
    """HBM bytes one decode step reads: every weight once (shared by the batch) + each sequence's
    KV cache of `ctx` earlier positions."""
    return matmul_params(s) * dtype_bytes + kv_cache_bytes(s, batch, ctx, dtype_bytes)


def all_gather_bytes(total_bytes: float, n: int) -> float:
    """Bytes each of n ranks receives in a ring all-gather of `total_bytes` ((n-1)/n of it);
    a reduce-scatter moves the same, an all-reduce twice that."""
    return total_bytes * (n - 1) / n


def zero3_gather_bytes(s: Shape, n: int) -> float:
    """Bytes per GPU to all-gather one full bf16 copy of a ZeRO-3-sharded model over n ranks."""
    return all_gather_bytes(param_count(s) * BF16, n)


def link_bw(gpu: Gpu, ranks: int) -> float:
    """Slowest link a ring over `ranks` GPUs crosses: NVLink in a node, InfiniBand across nodes."""
    return gpu.nvlink_bw if ranks <= gpu.per_node else gpu.ib_bw


# ------------------------------------------------------------------ memory

def layer_activation_bytes(s: Shape, batch: float, seq: int) -> float:
    """16-bit activations one layer keeps for backward (Korthikanti et al. 2022): s b d (34 +
    5 a s / d) bytes for an OPT layer. Their terms, written per width: attention 7 d + 4 kv
    (K and V are kv wide; one d is the output's dropout mask), 2 norms 4 d, MLP 3 d + 4 ffn,
    scores 5 a s (softmax output, dropout mask and output). The Llama family has no dropout:
    attention 6 d + 4 kv, scores 2 a s; its gated MLP keeps its input (2 d) and four ffn-wide
    tensors (gate, up, the activation, the product: 8 ffn)."""
    d, f, dropout = s.d_model, s.ffn, s.family == "opt"
    mlp = 2 * d + 8 * f if s.gated else 3 * d + 4 * f
    attn = (6 + dropout) * d + 4 * s.kv
    return batch * seq * (attn + 4 * d + mlp) + (5 if dropout else 2) * s.heads * seq * seq * batch


def train_activation_bytes(s: Shape, batch: float, seq: int, ckpt: bool,
                           lm_head: bool = True) -> float:
    """Checkpointing keeps each layer's input (2 s b d bytes) + the layer being recomputed;
    without it every layer's activations stay. Logits: bf16 logits, log-softmax, gradient."""
    layers = (s.layers * BF16 * batch * seq * s.d_model + layer_activation_bytes(s, batch, seq)
              if ckpt else s.layers * layer_activation_bytes(s, batch, seq))
    return layers + (3 * BF16 * s.vocab * batch * seq if lm_head else 0)


def memory_per_gpu(cfg: Config, b: float) -> dict[str, float]:
    """Bytes per GPU with b prompts per data-parallel rank: persistent states + the worst phase."""
    a, c = model_shape(cfg.model), model_shape(cfg.critic)
    n, z, tp = cfg.gpus, cfg.zero_stage, cfg.inference_tp
    seq = cfg.prompt_len + cfg.gen_len
    shard = lambda stage: n if z >= stage else 1       # ZeRO stage k shards its state n ways
    na, nc, nl = param_count(a), param_count(c), lora_param_count(a, cfg.lora_dim)
    trainable = trainable_params(cfg) - nc                 # the actor's share
    kv = kv_cache_bytes(a, b * tp, seq) / tp               # a TP group generates b * tp prompts
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
    a, c, n = model_shape(cfg.model), model_shape(cfg.critic), cfg.gpus
    return 2 * zero3_gather_bytes(a, n) + 2 * zero3_gather_bytes(c, n)


def trainable_params(cfg: Config) -> int:
    """Actor params Adam updates (adapters, plus the base unless LoRA-only) + the critic's."""
    a, c = model_shape(cfg.model), model_shape(cfg.critic)
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
    a, c = model_shape(cfg.model), model_shape(cfg.critic)
    return grads + (2 + cfg.grad_ckpt) * (zero3_gather_bytes(a, n) + zero3_gather_bytes(c, n))


# ------------------------------------------------------------------ time per phase

def _roofline(flops: float, nbytes: float, gpu: Gpu, flop_eff: float, bw_eff: float) -> float:
    """Seconds for work bound by whichever of compute or memory traffic takes longer."""
    return max(flops / (gpu.bf16_flops * flop_eff), nbytes / (gpu.hbm_bw * bw_eff))


def _comm_s(cfg: Config, nbytes: float, calls: int) -> float:
    """Seconds for `nbytes` per GPU over the slowest link, plus a latency per collective call."""
    e = cfg.efficiency
    return nbytes / (link_bw(GPUS[cfg.gpu], cfg.gpus) * e.comm) + calls * e.collective_latency_s


def generate_time(cfg: Config, b: float) -> tuple[float, float]:
    """(seconds of generation work, seconds of exposed communication) for one generate.

    A TP group of `inference_tp` GPUs generates for b * tp prompts, each GPU holding 1/tp of the
    weights and KV cache, with 2 all-reduces of the hidden states per layer per forward. A
    token step costs its roofline or the CPU time to launch its layers, whichever is longer,
    plus the generate loop's host work. `hf`'s per-layer gathers are prefetched during the step,
    so only their excess over it is exposed; the gather-once of `hybrid` / `ds-hybrid` blocks.
    LoRA adapters: DeepSpeed fuses them into the weights for generation, and so does `hybrid`
    for answers of HYBRID_FOLD_MIN_TOKENS or more (folding and restoring cost ~4 passes over the
    adapted weights per generate); `hf` (PEFT), and `hybrid` for shorter answers, run them
    unfused, reading their weights and paying 2 FLOPs per adapter weight."""
    a, gpu, e, tp = model_shape(cfg.model), GPUS[cfg.gpu], cfg.efficiency, cfg.inference_tp
    bg, P = b * tp, cfg.prompt_len
    folds = cfg.engine == "hybrid" and cfg.lora_dim > 0 and cfg.gen_len >= HYBRID_FOLD_MIN_TOKENS
    unfused = cfg.engine == "hf" or (cfg.engine == "hybrid" and not folds)
    adapters = lora_param_count(a, cfg.lora_dim) if unfused else 0
    gather = _comm_s(cfg, zero3_gather_bytes(a, cfg.gpus), a.layers)
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
    work, comm = step(bg * sequence_forward_flops(a, P, logits=1), matmul_params(a) * BF16,
                      bg * P)
    for j in range(1, cfg.gen_len):   # decode step j feeds answer token j, P + j - 1 cached
        t, c = step(bg * flops_per_token_forward(a, P + j),
                    decode_bytes_per_step(a, bg, P + j - 1), bg)
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
    a, gpu, e = model_shape(cfg.model), GPUS[cfg.gpu], cfg.efficiency
    t = 2 * param_count(a) * BF16 / cfg.inference_tp / (gpu.hbm_bw * e.decode)
    if cfg.zero_stage == 3 and cfg.gpus > 1:
        t += _comm_s(cfg, zero3_gather_bytes(a, cfg.gpus), a.layers)
    return t


def score_time(cfg: Config, b: float) -> tuple[float, float]:
    """No-grad forwards over P + G tokens of actor and reference (LM heads, adapters unfused),
    critic and reward (value heads). ZeRO-3 gathers overlap the forwards (prefetch): only what
    exceeds the compute is exposed."""
    a, c, gpu, e = model_shape(cfg.model), model_shape(cfg.critic), GPUS[cfg.gpu], cfg.efficiency
    seq = cfg.prompt_len + cfg.gen_len
    flops = b * (2 * sequence_forward_flops(a, seq, logits=cfg.gen_len + 1)
                 + 2 * sequence_forward_flops(c, seq, False)
                 + 2 * lora_param_count(a, cfg.lora_dim) * seq)
    work = flops / (gpu.bf16_flops * e.score)
    nbytes = score_comm_bytes(cfg)
    comm = _comm_s(cfg, nbytes, 2 * (a.layers + c.layers)) if nbytes else 0.0
    return work, max(0.0, comm - work)


def train_time(cfg: Config, b: float) -> tuple[float, float]:
    """Actor and critic forward + backward (+ recompute) over P + G tokens, then Adam: fused on
    the GPU, or under ZeRO-Offload grads down and bf16 weights up over PCIe while the node's
    CPUs run Adam. Communication overlaps the backward; only the excess is exposed."""
    a, c, gpu, e = model_shape(cfg.model), model_shape(cfg.critic), GPUS[cfg.gpu], cfg.efficiency
    n = cfg.gpus
    seq = cfg.prompt_len + cfg.gen_len
    flops = b * (train_flops(a, seq, cfg.lora_dim, cfg.lora_only, cfg.grad_ckpt,
                             logits=cfg.gen_len + 1)
                 + train_flops(c, seq, ckpt=cfg.grad_ckpt, lm_head=False))
    per_rank = trainable_params(cfg) / (n if cfg.zero_stage >= 1 else 1)
    if cfg.offload:
        adam = (2 * BF16 * per_rank / (gpu.pcie_bw * e.pcie)
                + per_rank * min(n, gpu.per_node) * HOST_ADAM_BYTES / (gpu.host_bw * e.host))
    else:
        adam = per_rank * ADAM_STEP_BYTES / (gpu.hbm_bw * e.decode)
    work = flops / (gpu.bf16_flops * e.train) + adam
    nbytes = train_comm_bytes(cfg)
    calls = (3 + cfg.grad_ckpt) * (a.layers + c.layers) if cfg.zero_stage == 3 else 2
    comm = _comm_s(cfg, nbytes, calls) if nbytes else 0.0
    return work, max(0.0, comm - work)


# ------------------------------------------------------------------ one prediction

def validate(cfg: Config) -> Config:
    """Raise ValueError (one line) for a configuration the model cannot price."""
    actor, critic = model_shape(cfg.model), model_shape(cfg.critic)
    if cfg.gpu not in GPUS:
        raise ValueError(f"unknown gpu {cfg.gpu!r}; choose from {', '.join(GPUS)}")
    if cfg.engine not in ENGINES:
        raise ValueError(f"unknown engine {cfg.engine!r}; choose from {', '.join(ENGINES)}")
    if not 1 <= cfg.gpus <= 100_000 or cfg.zero_stage not in (0, 1, 2, 3) or cfg.lora_dim < 0:
        raise ValueError("need --gpus from 1 to 100,000, --zero-stage in 0..3 and --lora-dim >= 0")
    width = min(actor.d_model, actor.e)                    # as `run` checks
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
    validate(cfg)
    batch = cfg.batch if cfg.batch is not None else largest_batch(cfg)
    b = batch / cfg.gpus                                   # prompts per data-parallel rank
    row = dict(model=cfg.model, critic=cfg.critic, gpus=cfg.gpus, gpu=cfg.gpu, engine=cfg.engine,
               batch=batch, zero_stage=cfg.zero_stage, inference_tp=cfg.inference_tp,
               lora_dim=cfg.lora_dim, lora_only=cfg.lora_only, grad_ckpt=cfg.grad_ckpt,
               offload=cfg.offload, fits=batch > 0 and memory_fit(cfg, b),
               mem_gib=round(memory_per_gpu(cfg, max(b, 1))["total"] / 2 ** 30, 1))
    times = dict.fromkeys(PHASES, math.nan)
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


# ------------------------------------------------------------------ measured efficiencies

# harness summary.csv column -> Efficiency field (achieved fraction of that phase's roofline)
EFFICIENCY_COLUMNS = {"prefill_flops_frac": "prefill", "prefill_roofline_frac": "prefill",
                      "decode_roofline_frac": "decode", "score_flops_frac": "score",
                      "score_roofline_frac": "score", "train_flops_frac": "train",
                      "train_roofline_frac": "train"}


def load_efficiency(run_dir: str, engine: str) -> tuple[Efficiency, str]:
    """Efficiencies for `engine` from a harness results dir: summary.csv plus meta.json (or the
    harness's results.json) for the machine. Measured fractions where the run has them,
    documented defaults for the rest."""
    import pandas as pd
    root = Path(run_dir)
    meta_path = root / "meta.json" if (root / "meta.json").exists() else root / "results.json"
    try:
        meta = json.loads(meta_path.read_text())
        table = pd.read_csv(root / "summary.csv")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"--efficiency {run_dir}: cannot read summary.csv and meta.json "
                         f"({type(err).__name__})") from None
    if not isinstance(meta, dict) or "engine" not in table.columns:
        raise ValueError(f"--efficiency {run_dir}: meta.json must be an object and summary.csv "
                         "needs an 'engine' column")
    rows = table[table["engine"].astype(str) == engine]
    if "status" in rows.columns:
        rows = rows[rows["status"].astype(str).str.startswith("ok")]
    eff, found = DEFAULT_EFFICIENCY[engine], []
    for col, fieldname in EFFICIENCY_COLUMNS.items():
        if rows.empty or col not in rows.columns:
            continue
        value = pd.to_numeric(rows[col], errors="coerce").median()
        if math.isnan(value):
            continue
        if not 0 < value <= 1.05:   # a measured fraction above 1 by more than noise is wrong
            raise ValueError(f"--efficiency {run_dir}: {col}={value:g} for {engine} "
                             "is not a fraction in (0, 1]")
        eff = dataclasses.replace(eff, **{fieldname: min(value, 1.0)})
        found.append(fieldname)
    if "decode" in found:   # a measured decode fraction already contains launch and loop costs
        eff = dataclasses.replace(eff, launch_s=0.0, token_sync_s=0.0)
    env = meta.get("env") if isinstance(meta.get("env"), dict) else meta
    device = env.get("device") or env.get("gpu") or env.get("cpu") or "unknown device"
    if not isinstance(device, str):
        device = "unknown device"
    if not found:   # said where it is printed: the user asked for measured efficiencies
        why = "no ok row" if rows.empty else "no efficiency columns in its ok row"
        return eff, f"defaults for {engine} ({root.name} has {why})"
    return eff, f"{root.name} ({device}): {', '.join(found)}"


# ------------------------------------------------------------------ calibration

def _fit_per_gpu(cfg: Config, per_gpu: int) -> Config:
    """Halve the prompts per GPU until they fit (DeepSpeed-Chat's rule: the largest that fits)."""
    while per_gpu > 1 and not memory_fit(cfg, per_gpu):
        per_gpu //= 2
    return dataclasses.replace(cfg, batch=per_gpu * cfg.gpus)


def held_out_config(gpus: int, gpu: str, model: str) -> Config:
    """The one rule the held-out rows are priced with (see HELD_OUT in project_presets)."""
    cfg = Config(model=model, gpus=gpus, gpu=gpu, engine="ds-hybrid", lora_dim=128, lora_only=False)
    for offload in (False, True):
        cfg = dataclasses.replace(cfg, offload=offload)
        cfg = dataclasses.replace(cfg, inference_tp=auto_tp(cfg))
        if memory_fit(cfg, 1):
            break
    return _fit_per_gpu(cfg, min(16, MAX_GLOBAL_BATCH // gpus))


def calibration_table():
    """DeepSpeed-Chat's published step-3 hours beside our `ds-hybrid` predictions: the calibration
    rows (per-row script settings) and the held-out rows (one rule)."""
    import pandas as pd
    rows = []
    for gpus, gpu, model, hours, settings, script in CALIBRATION:
        settings = dict(settings)
        per_gpu = settings.pop("per_gpu")
        cfg = Config(model=model, gpus=gpus, gpu=gpu, engine="ds-hybrid", lora_only=False,
                     **settings)
        rows.append((_fit_per_gpu(cfg, per_gpu), hours, "calibration", script))
    for gpus, gpu, model, hours in HELD_OUT:
        rows.append((held_out_config(gpus, gpu, model), hours, "held out", "one rule"))
    out = []
    for cfg, hours, kind, note in rows:
        r = predict(cfg)
        out.append({**r, "published_hours": hours, "ratio": r["total_hours"] / hours,
                    "set": kind, "settings": note})
    return pd.DataFrame(out)


# ------------------------------------------------------------------ command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rlhf-bench project`. --model, --gpus and --engine take comma-separated lists."""
    a = parser.add_argument
    a("--model", default=None,
      help=f"actor(s): {', '.join(MODELS)} (default opt-1.3b; --sweep: 1.3b..175b)")
    a("--gpus", default=None, help="GPU count(s) (default 1; --sweep: 1,2,4,...,64)")
    a("--gpu", default="a100-80g", help=f"one of {', '.join(GPUS)}")
    a("--engine", default="ds-hybrid", help=f"engine(s): {', '.join(ENGINES)}")
    a("--critic", default=None, help="critic and reward model (default: opt-350m for OPT actors, "
      "as DeepSpeed-Chat; the actor's own shape for the others)")
    a("--zero-stage", type=int, default=3, help="ZeRO stage of actor and critic training (0-3)")
    a("--inference-tp", default="1", help="tensor-parallel degree of generation, or 'auto'")
    a("--lora-dim", type=int, default=0, help="LoRA rank; > 0 trains only the adapters")
    a("--offload", action="store_true", help="ZeRO-Offload: Adam states in host memory, CPU Adam")
    a("--no-grad-ckpt", action="store_true", help="no activation checkpointing")
    a("--tokens", type=float, default=135e6, help="token budget, prompt + answer tokens")
    a("--prompt-len", type=int, default=256)
    a("--gen-len", type=int, default=256)
    a("--batch", type=int, default=None, help="global batch, prompts (default: largest that fits)")
    a("--efficiency", default=None, metavar="RUN_DIR",
      help="harness results dir (summary.csv, meta.json) to read achieved efficiencies from")
    a("--sweep", action="store_true", help="OPT 1.3B..175B x 1..64 GPUs")
    a("--calibration", action="store_true", help="DeepSpeed-Chat's published table beside ours")
    a("--out", default=None, help="write the rows as CSV")
    a("--plot", default=None, help="write a PNG of hours vs GPUs and the phase shares")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} must be integers, got {text!r}") from None


def configs_from_args(args) -> list[Config]:
    """The configurations a command line asks for (a cartesian product of the lists)."""
    models = args.model.split(",") if args.model else (
        list(SWEEP_MODELS) if args.sweep else ["opt-1.3b"])
    gpu_counts = _ints(args.gpus, "--gpus") if args.gpus else (
        list(SWEEP_GPUS) if args.sweep else [1])
    tp_auto = str(args.inference_tp).strip().lower() == "auto"
    tp = 1 if tp_auto else _ints(str(args.inference_tp), "--inference-tp")[0]
    efficiencies = {}
    out = []
    for engine in args.engine.split(","):
        if engine in ENGINES and args.efficiency:
            efficiencies[engine] = load_efficiency(args.efficiency, engine)
        eff, source = efficiencies.get(engine, (None, "defaults"))
        for model in models:
            for n in gpu_counts:
                if args.sweep and not tp_auto and n % tp:
                    continue                   # a sweep skips GPU counts the TP degree cannot split
                cfg = Config(model=model, gpus=n, gpu=args.gpu, engine=engine,
                             zero_stage=args.zero_stage, inference_tp=tp, lora_dim=args.lora_dim,
                             tokens=args.tokens, prompt_len=args.prompt_len, gen_len=args.gen_len,
                             batch=args.batch, grad_ckpt=not getattr(args, "no_grad_ckpt", False),
                             offload=getattr(args, "offload", False),
                             critic=getattr(args, "critic", None), eff=eff, eff_source=source)
                validate(cfg)
                if tp_auto:
                    cfg = dataclasses.replace(cfg, inference_tp=auto_tp(cfg))
                out.append(cfg)
    return out


def plot(df, path: str) -> None:
    """Left: projected hours vs GPUs per model and engine. Right: each phase's share of the step
    at the largest GPU count in the table. Rows that do not fit are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = df[df["batch"] > 0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for (model, engine), g in ok.groupby(["model", "engine"], sort=False):
        left.plot(g["gpus"], g["total_hours"], marker="o", label=f"{model} {engine}")
    left.set_xscale("log", base=2)
    left.set_xticks(sorted(df["gpus"].unique()), [str(n) for n in sorted(df["gpus"].unique())])
    left.set(yscale="log", xlabel="GPUs", ylabel="hours for the token budget",
             title=f"RLHF PPO (step 3) on {', '.join(df['gpu'].unique())}")
    if not ok.empty:
        left.legend(fontsize=7)
        last = ok[ok["gpus"] == ok["gpus"].max()]
        share = last[[f"{p}_s" for p in PHASES]].div(last["step_s"], axis=0)
        share.index = last["model"] + " " + last["engine"]
        share.columns = list(PHASES)
        share.plot.barh(stacked=True, ax=right)
        right.set(xlabel="share of step time", title=f"phases at {ok['gpus'].max()} GPUs")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


SHOWN = {"model": "model", "gpus": "gpus", "gpu": "gpu", "engine": "engine", "batch": "batch",
         "zero_stage": "zero", "inference_tp": "tp", "lora": "lora", "offload": "offload",
         "fits": "fits", "mem_gib": "GiB/gpu", "generate_s": "gen_s", "sync_s": "sync_s",
         "score_s": "score_s", "train_s": "train_s", "comm_s": "comm_s", "step_s": "step_s",
         "total_hours": "hours", "dominant_phase": "dominant", "efficiency": "efficiency"}


def format_table(df) -> str:
    """The rows with their assumptions (batch, ZeRO stage, TP, LoRA, offload, efficiencies)."""
    import pandas as pd
    df = df.assign(lora=[f"{d}+base" if d and not only else str(d)
                         for d, only in zip(df["lora_dim"], df["lora_only"])])
    cols = {k: v for k, v in SHOWN.items() if k in df.columns}
    extra = [c for c in ("published_hours", "ratio", "set", "settings") if c in df.columns]
    with pd.option_context("display.width", 300, "display.max_columns", 40,
                           "display.max_colwidth", 80):
        return df[list(cols) + extra].rename(columns=cols).round(2).to_string(index=False)


def run(args) -> int:
    """`rlhf-bench project`: print the projected table, write --out CSV and --plot PNG."""
    import pandas as pd
    for flag in ("out", "plot"):
        path = getattr(args, flag, None)
        if path and Path(path).is_dir():
            raise ValueError(f"--{flag} {path} is a folder; give a file name")
    if getattr(args, "calibration", False):
        df = calibration_table()
    else:
        df = pd.DataFrame([predict(cfg) for cfg in configs_from_args(args)])
    print(format_table(df))
    for name in df["gpu"].unique():
        g = GPUS[name]
        print(f"{name}: {g.bf16_flops / 1e12:.0f} TFLOP/s bf16, {g.hbm_bw / 1e12:.3g} TB/s HBM, "
              f"{g.memory / 2 ** 30:.0f} GiB, NVLink {g.nvlink_bw / 1e9:.0f} GB/s, "
              f"IB {g.ib_bw / 1e9:.0f} GB/s per GPU per direction")
    pairs = dict.fromkeys(f"{m} -> {c}" for m, c in zip(df["model"], df["critic"]))
    print(f"critic and reward model: {', '.join(pairs)}")
    prompts = args.tokens / (args.prompt_len + args.gen_len)
    print(f"efficiencies: {'; '.join(df['eff_source'].unique())}; tokens {args.tokens:.4g} = "
          f"{prompts:,.0f} prompts x ({args.prompt_len} + {args.gen_len})")
    if args.out:
        atomic_write(args.out, lambda tmp: df.to_csv(tmp, index=False))
    if args.plot:
        plot(df, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m bench.projection.model`); the rlhf-bench CLI calls run() itself."""
    class OneLine(argparse.ArgumentParser):   # usage mistakes: one line, as rlhf-bench's own
        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
    parser = OneLine(prog="rlhf-bench project", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
