"""Numbers the scale projection (bench/project.py) starts from: hardware, model shapes, efficiencies.

Everything here is data with its source or reason beside it; the arithmetic lives in project.py.
Units: FLOP/s, bytes, bytes/s, seconds. GiB = 2**30 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2 ** 30


@dataclass(frozen=True)
class Gpu:
    """One accelerator and the links around it, from public spec sheets (dense, no sparsity)."""
    name: str
    bf16_flops: float    # FLOP/s, dense bf16 tensor-core peak
    hbm_bw: float        # bytes/s, HBM read bandwidth
    memory: float        # bytes of HBM, as nvidia-smi reports it
    nvlink_bw: float     # bytes/s per GPU per direction, inside a node
    ib_bw: float         # bytes/s per GPU per direction, between nodes (one NIC per GPU)
    pcie_bw: float       # bytes/s per direction, host <-> device
    per_node: int = 8    # GPUs behind one NVLink switch (DGX/HGX node)


GPUS: dict[str, Gpu] = {
    # A100 SXM: 312 TFLOP/s bf16; HBM2 1555 GB/s (40G) / HBM2e 2039 GB/s (80G); NVLink 3: 600 GB/s
    # total = 300 GB/s each way; DGX A100: 8x HDR 200 Gb/s = 25 GB/s per GPU; PCIe gen4 x16 32 GB/s.
    "a100-40g": Gpu("a100-40g", 312e12, 1.555e12, 40 * GiB, 300e9, 25e9, 32e9),
    "a100-80g": Gpu("a100-80g", 312e12, 2.039e12, 80 * GiB, 300e9, 25e9, 32e9),
    # H100 SXM: 989 TFLOP/s bf16, HBM3 3.35 TB/s; NVLink 4: 900 GB/s total = 450 each way;
    # DGX H100: 8x NDR 400 Gb/s = 50 GB/s per GPU; PCIe gen5 x16 64 GB/s.
    "h100": Gpu("h100", 989e12, 3.35e12, 80 * GiB, 450e9, 50e9, 64e9),
    # H200 SXM: H100's compute with 141 GB of HBM3e at 4.8 TB/s (nvidia-smi shows ~140 GiB).
    "h200": Gpu("h200", 989e12, 4.8e12, 140 * GiB, 450e9, 50e9, 64e9),
}


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's shape (OPT layout: learned positions, ffn = 4 d, tied head)."""
    name: str
    layers: int
    d_model: int
    heads: int
    ffn: int
    vocab: int = 50272
    positions: int = 2048
    embed_dim: int = 0   # word_embed_proj_dim when it differs from d_model (OPT-350m: 512), else 0

    @property
    def e(self) -> int:
        """Width of the token embedding / LM head."""
        return self.embed_dim or self.d_model


def _opt(name: str, layers: int, d: int, heads: int, embed_dim: int = 0) -> Shape:
    return Shape(name, layers, d, heads, 4 * d, embed_dim=embed_dim)


# Shapes from the OPT paper (Zhang et al. 2022, table 1) and the released HF configs.
MODELS: dict[str, Shape] = {s.name: s for s in [
    _opt("opt-125m", 12, 768, 12),
    _opt("opt-350m", 24, 1024, 16, embed_dim=512),
    _opt("opt-1.3b", 24, 2048, 32),
    _opt("opt-2.7b", 32, 2560, 32),
    _opt("opt-6.7b", 32, 4096, 32),
    _opt("opt-13b", 40, 5120, 40),
    _opt("opt-30b", 48, 7168, 56),
    _opt("opt-66b", 64, 9216, 72),
    _opt("opt-175b", 96, 12288, 96),
]}
SWEEP_MODELS = ("opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b", "opt-175b")
SWEEP_GPUS = (1, 2, 4, 8, 16, 32, 64)
ENGINES = ("hf", "ds-inference", "ds-hybrid", "hybrid")


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of each roofline, per phase. Chosen once; the same for every row.

    Sources of the defaults: dense bf16 GEMMs at these sizes reach 60-75% of peak on A100/H100;
    a whole transformer forward (layernorms, softmax, launches) ~50%; a training step (backward
    kernels, optimizer, ZeRO bookkeeping in Python) ~35% (the Megatron/ZeRO papers report 30-50%
    MFU for 1B-100B models). Decode reads weights at 60-70% of HBM bandwidth with fused inference
    kernels at batch >= 1 and ~40% in eager PyTorch. NCCL all-gather/reduce-scatter reach ~70% of
    link bandwidth at large messages; PCIe copies ~70% of the link.
    """
    prefill: float = 0.50          # of bf16 peak, prompt forward during generation
    decode: float = 0.60           # of HBM bandwidth, one token step (weights + KV cache read)
    score: float = 0.45            # of bf16 peak, no-grad forwards of actor, ref, critic, reward
    train: float = 0.35            # of bf16 peak, forward + backward (+ recompute) of actor, critic
    comm: float = 0.70             # of NVLink/InfiniBand bandwidth, collectives
    pcie: float = 0.70             # of PCIe bandwidth, host <-> device copies
    layer_overhead_s: float = 20e-6   # s per layer per decode step not hidden by the GPU (launches)
    collective_latency_s: float = 10e-6  # s per collective call (NCCL launch + sync)

    def short(self) -> str:
        return (f"pf{self.prefill:.2f} dec{self.decode:.2f} sc{self.score:.2f} "
                f"tr{self.train:.2f} cm{self.comm:.2f} ovh{self.layer_overhead_s * 1e6:.0f}us")


# Per-engine defaults differ only where the software differs, never per row:
# hf decodes eagerly in PyTorch (one Python-dispatched kernel per op, ~15-20 per layer, dynamic
# cache): lower bandwidth fraction, ~60 us per layer per step of CPU launch cost.
# ds-inference / ds-hybrid use DeepSpeed's fused inference kernels (~6 launches per layer).
# hybrid (this project) replays compiled prefill/decode as CUDA graphs: little launch cost.
DEFAULT_EFFICIENCY: dict[str, Efficiency] = {
    "hf": Efficiency(decode=0.40, layer_overhead_s=60e-6),
    "ds-inference": Efficiency(),
    "ds-hybrid": Efficiency(),
    "hybrid": Efficiency(layer_overhead_s=5e-6),
}

# DeepSpeed-Chat's step-3 setup. Its benchmark notes (training/step3_rlhf_finetuning/
# BenckmarkSetting.md) give 264,292 prompts x (256 + 256) tokens = 135,317,504 tokens per epoch,
# one PPO epoch and one generation batch per step, and a cap of 1024 prompts (524,288 tokens) per
# global batch, "using the largest batch that does not run out of memory" below that cap.
# Our default --tokens 135e6 gives 135e6 / 512 = 263,672 prompts (0.2% fewer).
# (The blog's "131.9k queries" disagrees with its own 67.5M query tokens by 2x; we follow the
# token count, which the benchmark notes confirm.)
CRITIC_MODEL = "opt-350m"     # critic and reward model of every DeepSpeed-Chat row
MAX_GLOBAL_BATCH = 1024       # prompts per PPO step

# (gpus, gpu, actor, published hours, settings) -- settings as DeepSpeed-Chat's scripts ran them,
# or, where the script as released cannot fit (full Adam states of 6.7B+ on one GPU: 16 B/param),
# LoRA-only training of the actor, which is what its `*_lora.sh` scripts are named for.
CALIBRATION: tuple[tuple[int, str, str, float, dict], ...] = (
    # single_gpu/run_1.3b.sh: ZeRO 0, actor gradient checkpointing, full training.
    (1, "a100-40g", "opt-1.3b", 15.4, dict(zero_stage=0)),
    (1, "a100-80g", "opt-1.3b", 11.7, dict(zero_stage=0)),
    # single_gpu/run_6.7b_lora.sh: ZeRO 0, LoRA 128. On 40 GB the bf16 actor + reference
    # (2 x 13.4 GB) leave no room for a batch, so the reference sits in host memory
    # (DeepSpeed-Chat's --offload_reference_model) and streams over PCIe each step.
    (1, "a100-40g", "opt-6.7b", 3.4 * 24, dict(zero_stage=0, lora_dim=128, offload_ref=True)),
    (1, "a100-80g", "opt-6.7b", 1.7 * 24, dict(zero_stage=0, lora_dim=128)),
    (1, "a100-80g", "opt-13b", 4.9 * 24, dict(zero_stage=0, lora_dim=128)),
    # single_node/run_1.3b.sh: ZeRO 2. run_6.7b.sh: ZeRO 3. run_13b.sh: ZeRO 3, inference TP 2,
    # LoRA 128. run_30b_lora.sh: ZeRO 3, LoRA 128; its 60 GB of gathered bf16 weights cannot sit
    # on one 40 GB GPU, so generation uses inference TP 4 (the smallest that fits).
    (8, "a100-40g", "opt-1.3b", 2.0, dict(zero_stage=2)),
    (8, "a100-40g", "opt-6.7b", 5.7, dict(zero_stage=3)),
    (8, "a100-40g", "opt-13b", 10.8, dict(zero_stage=3, inference_tp=2, lora_dim=128)),
    (8, "a100-40g", "opt-30b", 1.85 * 24, dict(zero_stage=3, inference_tp=4, lora_dim=128)),
)
