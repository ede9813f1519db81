"""Collectives priced with their latency, and what ZeRO-3's fetches leave exposed.

A collective costs a fixed latency (NCCL's ring model: presets.Efficiency.ring_*) plus its bytes
over the slowest link. ZeRO-3 all-gathers every weight matrix on its own, just before the module
that uses it, and DeepSpeed prefetches about one module ahead (DeepSpeed-Chat's config:
stage3_prefetch_bucket_size 3e7 values; the maintainers on the limit, DeepSpeed PR #1170). So a
fetch hides behind compute of about its own size, and shows where it takes longer: small layers,
few tokens per GPU, many ranks. The token embedding is fetched first, with nothing to hide behind.
Units: seconds, bytes.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .counts import BF16, all_gather_bytes, zero3_fetches, zero3_gather_bytes
from .presets import GPUS, Arch, Gpu

if TYPE_CHECKING:
    from .model import Config

REDUCE_BUCKET = 5e8   # values per gradient reduce-scatter (DeepSpeed's reduce_bucket_size default)


def link_bw(gpu: Gpu, ranks: int) -> float:
    """Slowest link a ring over `ranks` GPUs crosses: NVLink in a node, InfiniBand across nodes."""
    return gpu.nvlink_bw if ranks <= gpu.per_node else gpu.ib_bw


def ring_latency_s(cfg: Config, ranks: int) -> float:
    """Fixed time of one ring all-gather or reduce-scatter over `ranks` GPUs: a base, then one
    step per rank but the first, nodes - 1 of them across the network (NCCL's cost model)."""
    if ranks <= 1:
        return 0.0
    e, gpu = cfg.efficiency, GPUS[cfg.gpu]
    nodes = math.ceil(ranks / gpu.per_node)
    hop = e.ring_hop_s if nodes == 1 else max(e.ring_hop_s, 3 * gpu.net_post_s)
    return e.ring_base_s + (ranks - nodes) * hop + (nodes - 1) * e.ring_net_hop_s


def comm_s(cfg: Config, nbytes: float, calls: int) -> float:
    """Seconds for `nbytes` per GPU over the slowest link, plus the latency of `calls` rings."""
    bw = link_bw(GPUS[cfg.gpu], cfg.gpus) * cfg.efficiency.comm
    return nbytes / bw + calls * ring_latency_s(cfg, cfg.gpus)


def fetch_s(cfg: Config, values: float) -> float:
    """One ZeRO-3 all-gather of a weight of `values` bf16 values over all the GPUs."""
    return comm_s(cfg, all_gather_bytes(values * BF16, cfg.gpus), 1)


def gather_model_s(cfg: Config, s: Arch) -> float:
    """Gathering a whole bf16 model, one all-gather per weight matrix."""
    calls = sum(count for _, count in zero3_fetches(s))
    return comm_s(cfg, zero3_gather_bytes(s, cfg.gpus), calls)


def pass_exposed(cfg: Config, s: Arch, pass_s: float, lm_head: bool = True) -> tuple[float, float]:
    """(exposed, slack) seconds of one ZeRO-3 pass over a model whose compute takes `pass_s`:
    each weight's compute is its share of the pass by size; its fetch shows by what it exceeds
    that, and the rest (slack) is left for other traffic (the backward's gradient
    reduce-scatter)."""
    fetches = zero3_fetches(s, lm_head)
    body = sum(v * count for v, count in fetches[1:])
    exposed = fetch_s(cfg, fetches[0][0])          # the embedding: first, nothing before it
    slack = 0.0
    for v, count in fetches[1:]:
        gap = fetch_s(cfg, v) - pass_s * v / body
        exposed += count * max(gap, 0.0)
        slack += count * max(-gap, 0.0)
    return exposed, slack


def reduce_scatter_s(cfg: Config, trainable: float) -> float:
    """The backward's gradient reduce-scatter, in DeepSpeed's buckets."""
    nbytes = all_gather_bytes(trainable * BF16, cfg.gpus)
    return comm_s(cfg, nbytes, math.ceil(trainable / REDUCE_BUCKET))
