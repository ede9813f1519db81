"""What the scale projection starts from: hardware, architectures, efficiencies, published rows.

Everything here is data with its source or reason beside it; the arithmetic lives in counts.py
and model.py.
Units: FLOP/s, bytes, bytes/s, seconds. GiB = 2**30 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2 ** 30


@dataclass(frozen=True)
class Gpu:
    """One accelerator and the links around it, from public spec sheets (dense, no sparsity)."""
    name: str
    bf16_flops: float    # FLOP/s, dense 16-bit tensor-core peak (bf16; fp16 where it has none)
    hbm_bw: float        # bytes/s, HBM read bandwidth
    memory: float        # bytes of HBM, as nvidia-smi reports it
    nvlink_bw: float     # bytes/s per GPU per direction, inside a node
    ib_bw: float         # bytes/s per GPU per direction, between nodes (one NIC per GPU)
    pcie_bw: float       # bytes/s per direction, host <-> device
    host_bw: float       # bytes/s of the node's host DRAM (CPU Adam under ZeRO-Offload)
    per_node: int = 8    # GPUs behind one NVLink switch (DGX/HGX node)
    net_post_s: float = 2e-6  # s the host CPU takes to post one network send (NCCL's cost model:
                              # 2 us on AMD hosts, 1 us on Intel; see Efficiency.ring_hop_s)
    dtype: str = "bf16"       # the 16-bit type of bf16_flops and of training on it
    link: str = "NVLink"      # what nvlink_bw crosses


GPUS: dict[str, Gpu] = {
    # A100 SXM: 312 TFLOP/s bf16; HBM2 1555 GB/s (40G) / HBM2e 2039 GB/s (80G); NVLink 3: 600 GB/s
    # total = 300 GB/s each way; DGX A100: 8x HDR 200 Gb/s = 25 GB/s per GPU; PCIe gen4 x16 32 GB/s.
    # Host: 2x EPYC 7742, 8 channels of DDR4-3200 each = 2 x 204.8 GB/s.
    "a100-40g": Gpu("a100-40g", 312e12, 1.555e12, 40 * GiB, 300e9, 25e9, 32e9, 409.6e9),
    "a100-80g": Gpu("a100-80g", 312e12, 2.039e12, 80 * GiB, 300e9, 25e9, 32e9, 409.6e9),
    # H100 SXM: 989 TFLOP/s bf16, HBM3 3.35 TB/s; NVLink 4: 900 GB/s total = 450 each way;
    # DGX H100: 8x NDR 400 Gb/s = 50 GB/s per GPU; PCIe gen5 x16 64 GB/s;
    # host 2x Xeon 8480C, 8 channels of DDR5-4800 each = 2 x 307.2 GB/s.
    "h100": Gpu("h100", 989e12, 3.35e12, 80 * GiB, 450e9, 50e9, 64e9, 614.4e9, net_post_s=1e-6),
    # H200 SXM: H100's compute with 141 GB of HBM3e at 4.8 TB/s (nvidia-smi shows ~140 GiB).
    "h200": Gpu("h200", 989e12, 4.8e12, 140 * GiB, 450e9, 50e9, 64e9, 614.4e9, net_post_s=1e-6),
    # V100 SXM2 32GB (datasheet): 125 TFLOP/s fp16 tensor (no bf16: DeepSpeed-Chat runs it in fp16),
    # HBM2 900 GB/s; NVLink 2: 300 GB/s total = 150 each way; PCIe gen3 x16 16 GB/s.
    # DGX-1: 4x EDR 100 Gb/s for 8 GPUs = 6.25 GB/s per GPU; host 2x Xeon E5-2698 v4, 4 channels
    # of DDR4-2400 each = 2 x 76.8 GB/s.
    "v100-32g": Gpu("v100-32g", 125e12, 0.9e12, 32 * GiB, 150e9, 6.25e9, 16e9, 153.6e9,
                    net_post_s=1e-6, dtype="fp16"),
    # RTX A6000 (datasheet: 309.7 TFLOP/s tensor with sparsity; GA102 whitepaper: 154.8 dense
    # fp16/bf16, 77.4 is dense TF32): 48 GB GDDR6 at 768 GB/s, PCIe gen4 x16 32 GB/s. Its NVLink
    # bridge joins only pairs, so an 8-card server's collectives cross PCIe; no reference cluster:
    # one 100 Gb/s NIC per GPU assumed. Host: a workstation CPU, 8 channels of DDR4-3200.
    "a6000": Gpu("a6000", 154.8e12, 0.768e12, 48 * GiB, 32e9, 12.5e9, 32e9, 204.8e9, link="PCIe"),
}


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer's architecture (counts.flop_shape gives bench/flops.py's Shape).
    family "opt": learned positions, LayerNorm, biases on every linear, a two-matrix MLP (ffn =
    4 d), tied head. family "llama" (Llama, Mistral, Qwen2): rotary positions, RMSNorm, no biases
    (Qwen2: on q, k, v), a gated three-matrix MLP, and grouped-query attention with `kv_heads`
    K/V heads."""
    name: str
    layers: int
    d_model: int
    heads: int
    ffn: int
    vocab: int = 50272
    positions: int = 2048
    embed_dim: int = 0   # word_embed_proj_dim when it differs from d_model (OPT-350m: 512), else 0
    final_norm: bool = True   # OPT-350m (post-LN) has no final layernorm
    family: str = "opt"
    kv_heads: int = 0    # K/V heads under grouped-query attention; 0: as many as `heads`
    qkv_bias: bool = False    # "llama" family: biases on q, k and v (Qwen2)
    tied: bool = True    # the LM head is the token embedding
    tokenizer: str = "opt"    # models that read each other's tokens share it (actor and critic)

    @property
    def e(self) -> int:
        """Width of the token embedding / LM head."""
        return self.embed_dim or self.d_model

    @property
    def kv(self) -> int:
        """Width of one cached K or V row: kv_heads * head_dim."""
        return self.d_model * (self.kv_heads or self.heads) // self.heads

    @property
    def gated(self) -> bool:
        return self.family == "llama"


def _opt(name: str, layers: int, d: int, heads: int, embed_dim: int = 0) -> Arch:
    return Arch(name, layers, d, heads, 4 * d, embed_dim=embed_dim, final_norm=not embed_dim)


def _llama(name: str, tokenizer: str, layers: int, d: int, heads: int, kv_heads: int, ffn: int,
           vocab: int, positions: int, qkv_bias: bool = False, tied: bool = False) -> Arch:
    return Arch(name, layers, d, heads, ffn, vocab, positions, family="llama", kv_heads=kv_heads,
                 qkv_bias=qkv_bias, tied=tied, tokenizer=tokenizer)


# Shapes from the OPT paper (Zhang et al. 2022, table 1) and the released HF configs (layers,
# hidden size, heads, K/V heads, intermediate size, vocabulary, max_position_embeddings).
MODELS: dict[str, Arch] = {s.name: s for s in [
    _opt("opt-125m", 12, 768, 12),
    _opt("opt-350m", 24, 1024, 16, embed_dim=512),
    _opt("opt-1.3b", 24, 2048, 32),
    _opt("opt-2.7b", 32, 2560, 32),
    _opt("opt-6.7b", 32, 4096, 32),
    _opt("opt-13b", 40, 5120, 40),
    _opt("opt-30b", 48, 7168, 56),
    _opt("opt-66b", 64, 9216, 72),
    _opt("opt-175b", 96, 12288, 96),
    _llama("llama-2-7b", "llama-2", 32, 4096, 32, 32, 11008, 32000, 4096),
    _llama("llama-2-13b", "llama-2", 40, 5120, 40, 40, 13824, 32000, 4096),
    _llama("llama-2-70b", "llama-2", 80, 8192, 64, 8, 28672, 32000, 4096),
    _llama("llama-3-8b", "llama-3", 32, 4096, 32, 8, 14336, 128256, 8192),
    _llama("llama-3-70b", "llama-3", 80, 8192, 64, 8, 28672, 128256, 8192),
    _llama("mistral-7b", "mistral", 32, 4096, 32, 8, 14336, 32000, 32768),
    # Qwen2.5: positions as the native 32k context
    _llama("qwen2.5-0.5b", "qwen2.5", 24, 896, 14, 2, 4864, 151936, 32768, qkv_bias=True,
           tied=True),
    _llama("qwen2.5-7b", "qwen2.5", 28, 3584, 28, 4, 18944, 152064, 32768, qkv_bias=True),
]}
SWEEP_MODELS = ("opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b", "opt-175b")
SWEEP_GPUS = (1, 2, 4, 8, 16, 32, 64)
ENGINES = ("hf", "ds-inference", "ds-hybrid", "hybrid")


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of each roofline, per phase. Chosen once; the same for every row.

    Reasons for the defaults: dense bf16 GEMMs at these sizes reach 60-75% of peak on A100/H100,
    a whole transformer forward (layernorms, softmax, launches) ~50%; a training step (backward
    kernels, ZeRO hooks in Python, recompute) ~35% (Megatron-LM and ZeRO report 30-50% of peak
    for 1B-100B models). Fused inference kernels stream weights at ~60% of HBM bandwidth in
    decode, eager PyTorch ~40%. NCCL all-gather / reduce-scatter reach ~70% of link bandwidth at
    large messages; PCIe copies ~70%; CPU Adam streams host memory at ~50%.
    """
    prefill: float = 0.50          # of bf16 peak: prompt forward during generation
    decode: float = 0.60           # of HBM bandwidth: a token step (weights + KV cache read)
    score: float = 0.45            # of bf16 peak: no-grad forwards of actor, ref, critic, reward
    train: float = 0.35            # of bf16 peak: forward + backward (+ recompute)
    comm: float = 0.70             # of NVLink / InfiniBand bandwidth: collectives
    pcie: float = 0.70             # of PCIe bandwidth: host <-> device copies
    host: float = 0.50             # of host DRAM bandwidth: CPU Adam under ZeRO-Offload
    launch_s: float = 30e-6        # s of CPU per layer per decode step to issue its kernels;
                                   # hidden while the GPU is busier than that (launches run ahead)
    token_sync_s: float = 300e-6   # s per decode step the generate loop spends on the host
                                   # (sampling, stop check, device sync): never hidden
    collective_latency_s: float = 10e-6  # s per small all-reduce inside a node (TP): NCCL's LL
                                   # protocol, 6.6 us + 0.6 us per ring step
    # A ring all-gather or reduce-scatter of n ranks over `nodes` nodes takes n - 1 steps, nodes - 1
    # of them across the network. NCCL's own cost model (src/graph/tuning.cc, Simple protocol, as
    # ZeRO's megabyte messages use): 8.4 us, + 3.4 us per NVLink step, 14 us per network step;
    # once a ring leaves the node every step waits at least 3 network posts (Gpu.net_post_s).
    # At 8 GPUs in a node: 32 us; at 64 over 8 DGX A100 nodes: 442 us a call.
    ring_base_s: float = 8.4e-6
    ring_hop_s: float = 3.4e-6
    ring_net_hop_s: float = 14e-6

    def short(self) -> str:
        return (f"pf{self.prefill:.2f} dec{self.decode:.2f} sc{self.score:.2f} "
                f"tr{self.train:.2f} cm{self.comm:.2f}")


# Per-engine defaults differ only where the software differs, never per row:
# hf decodes eagerly (one Python-dispatched kernel per op, ~20 per layer, growing cache):
# lower bandwidth fraction, ~80 us of CPU per layer. ds-inference / ds-hybrid run DeepSpeed's
# inference kernels inside HF's generate loop, a layer's Python wrapper around them taking
# 0.3 ms of host time. The bound: DeepSpeed-Chat's own step-3 log (training_log_output/
# actor_opt-1.3b_critic_opt-350m_globalBatchSize64.log) generates 4 x 256 tokens of OPT-1.3B
# on a V100 in 2.5 s, 9.8 ms a token where its weights stream in 2.9: at most 0.39 ms for each
# of the 24 layers. (0.39 here would put the 1x A100-80G OPT-1.3B calibration row at 1.54x.)
# hybrid (this project) replays compiled prefill/decode as CUDA graphs: one launch per step.
DEFAULT_EFFICIENCY: dict[str, Efficiency] = {
    "hf": Efficiency(decode=0.40, launch_s=80e-6),
    "ds-inference": Efficiency(launch_s=300e-6),
    "ds-hybrid": Efficiency(launch_s=300e-6),
    "hybrid": Efficiency(launch_s=1e-6, token_sync_s=100e-6),
}

# DeepSpeed-Chat's step-3 setup. Its benchmark notes (training/step3_rlhf_finetuning/
# BenckmarkSetting.md) give 264,292 prompts x (256 + 256) tokens = 135,317,504 tokens per epoch,
# one PPO epoch and one generation batch per step, and at most 1024 prompts per global batch.
# Our default --tokens 135e6 gives 135e6 / 512 = 263,672 prompts, so 263,672 / B steps.
# (The blog's "131.9k queries" disagrees with its own 67.5M query tokens by 2x; we follow the
# token count, which the benchmark notes confirm.)
CRITIC_MODEL = "opt-350m"     # critic and reward model of every DeepSpeed-Chat row (OPT actors)
MAX_GLOBAL_BATCH = 1024       # prompts per PPO step
PER_GPU_BATCH = 16            # prompts per GPU: main.py's --per_device_train_batch_size default

# (gpus, gpu, actor, published hours, settings, why). Settings follow DeepSpeed-Chat's scripts:
# 16 prompts per GPU (main.py's default and the April 2023 node scripts; 4 in run_30b_lora.sh),
# halved until it fits in our memory model (its benchmark rule: the largest batch that fits),
# actor gradient checkpointing, Hybrid Engine. Their `--actor_lora_dim 128` adds adapters but,
# without `--only_optimize_lora`, still trains every weight: lora_only=False here. Where the full
# Adam states cannot fit (16 B/param), ZeRO-Offload (`--offload`, CPU Adam) is on, at stage 2 on
# one GPU (the stage ZeRO-Offload needs; sharding over one rank changes nothing else).
CALIBRATION: tuple[tuple[int, str, str, float, dict, str], ...] = (
    (1, "a100-40g", "opt-1.3b", 15.4, dict(zero_stage=0, lora_dim=128, per_gpu=16),
     "single_gpu/run_1.3b.sh"),
    (1, "a100-80g", "opt-1.3b", 11.7, dict(zero_stage=0, lora_dim=128, per_gpu=16),
     "single_gpu/run_1.3b.sh"),
    (1, "a100-40g", "opt-6.7b", 3.4 * 24,
     dict(zero_stage=2, lora_dim=128, offload=True, per_gpu=16),
     "single_gpu/run_6.7b_lora.sh + offload"),
    (1, "a100-80g", "opt-6.7b", 1.7 * 24,
     dict(zero_stage=2, lora_dim=128, offload=True, per_gpu=16),
     "single_gpu/run_6.7b_lora.sh + offload"),
    (1, "a100-80g", "opt-13b", 4.9 * 24, dict(zero_stage=2, lora_dim=128, offload=True, per_gpu=16),
     "no script: as 6.7B + offload"),
    (8, "a100-40g", "opt-1.3b", 2.0, dict(zero_stage=2, per_gpu=16), "single_node/run_1.3b.sh"),
    (8, "a100-40g", "opt-6.7b", 5.7, dict(zero_stage=3, per_gpu=16), "single_node/run_6.7b.sh"),
    (8, "a100-40g", "opt-13b", 10.8, dict(zero_stage=3, inference_tp=2, lora_dim=128,
                                          offload=True, per_gpu=16),
     "single_node/run_13b.sh + offload"),
    (8, "a100-40g", "opt-30b", 1.85 * 24, dict(zero_stage=3, inference_tp=4, lora_dim=128,
                                               offload=True, per_gpu=4),
     "single_node/run_30b_lora.sh + offload, TP 4"),
    (1, "a6000", "opt-1.3b", 1.1 * 24, dict(zero_stage=0, lora_dim=128, per_gpu=16),
     "single_gpu/run_1.3b.sh"),
    (1, "a6000", "opt-6.7b", 5.6 * 24, dict(zero_stage=2, lora_dim=128, offload=True, per_gpu=16),
     "single_gpu/run_6.7b_lora.sh + offload"),
)
# Not a calibration row: 1x V100-32G OPT-1.3B (1.8 days). run_1.3b.sh as written (ZeRO-0, no
# offload) fits one prompt in our memory model, 3.8x the published hours; the settings DeepSpeed-
# Chat ran it with are not published (docs/projection.md has the arithmetic).

# Every cell of DeepSpeed-Chat's step-3 table (its README's "Table 1. End-to-end RLHF training
# (Step 3)", April 2023), hours: "1x V100 32G | 1.8 days", "1x A6000 48G | 1.1 days | 5.6 days".
# `project --calibration` prices each with only model, GPU count and GPU kind given, as a user
# would ask: the defaults, or the fastest setting that fits.
PUBLISHED: tuple[tuple[int, str, str, float], ...] = (
    (1, "a100-40g", "opt-1.3b", 15.4), (1, "a100-40g", "opt-6.7b", 3.4 * 24),
    (1, "a100-80g", "opt-1.3b", 11.7), (1, "a100-80g", "opt-6.7b", 1.7 * 24),
    (1, "a100-80g", "opt-13b", 4.9 * 24),
    (1, "v100-32g", "opt-1.3b", 1.8 * 24),
    (1, "a6000", "opt-1.3b", 1.1 * 24), (1, "a6000", "opt-6.7b", 5.6 * 24),
    (8, "a100-40g", "opt-1.3b", 2.0), (8, "a100-40g", "opt-6.7b", 5.7),
    (8, "a100-40g", "opt-13b", 10.8), (8, "a100-40g", "opt-30b", 1.85 * 24),
    (8, "a100-80g", "opt-1.3b", 1.4), (8, "a100-80g", "opt-6.7b", 4.1),
    (8, "a100-80g", "opt-13b", 9.0), (8, "a100-80g", "opt-30b", 18.0),
    (8, "a100-80g", "opt-66b", 2.1 * 24),
    (64, "a100-80g", "opt-1.3b", 31 / 60), (64, "a100-80g", "opt-6.7b", 51 / 60),
    (64, "a100-80g", "opt-13b", 1.25), (64, "a100-80g", "opt-30b", 4.0),
    (64, "a100-80g", "opt-66b", 7.5), (64, "a100-80g", "opt-175b", 20.0),
)
