"""When the settings a user gave do not fit in GPU memory, or fit only a starved batch: the fastest
configuration that does, over the knobs they left open, and one line on what would fit when
nothing does.

Knobs: ZeRO stage, ZeRO-Offload, inference TP, LoRA and the batch. A knob the user set is never
changed. Full training is searched first; LoRA adapters on a frozen base (rank 128, the rank of
DeepSpeed-Chat's scripts) train a different model, so they are tried only when no configuration
with full training fits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .counts import BF16, model_arch, param_count
from .model import USABLE_MEMORY, Config, largest_batch, memory_fit, memory_per_gpu, predict
from .presets import GPUS, MAX_GLOBAL_BATCH, PER_GPU_BATCH

KNOBS = ("zero_stage", "offload", "inference_tp", "lora_dim", "batch")
FLAGS = {"zero_stage": "--zero-stage", "offload": "--offload", "inference_tp": "--inference-tp",
         "lora_dim": "--lora-dim", "batch": "--batch"}
SEARCH_LORA = 128     # DeepSpeed-Chat's step-3 scripts: --actor_lora_dim 128
MAX_GPUS = 4096       # the GPU counts tried for "it would on N GPUs"


@dataclass(frozen=True)
class Choice:
    """A configuration to price. `chosen`: the knobs the search set because the settings as given
    did not fit (empty when they fit); `note`: why it chose them, or what would fit."""
    cfg: Config
    chosen: tuple[str, ...] = ()
    note: str = ""


def fits(cfg: Config) -> bool:
    """The given batch fits, or (batch open) at least one prompt per GPU does."""
    if cfg.batch is None:
        return largest_batch(cfg) > 0
    return memory_fit(cfg, cfg.batch / cfg.gpus)


def starved(cfg: Config) -> bool:
    """With the batch open, fewer prompts per GPU fit than DeepSpeed-Chat's scripts run (16, or the
    1024-prompt step's share): a token step then costs the host's launches whatever its batch, so
    the hours grow as the batch shrinks, and offload or sharding that frees memory is faster."""
    if cfg.batch is not None:
        return False
    return largest_batch(cfg) < min(PER_GPU_BATCH, max(MAX_GLOBAL_BATCH // cfg.gpus, 1)) * cfg.gpus


def tp_options(cfg: Config) -> list[int]:
    """TP degrees of generation: 1, 2, 4, 8 dividing the GPUs within a node; 1 for engines that
    generate on one device."""
    if cfg.engine in ("hf", "hybrid"):
        return [1]
    return [t for t in (1, 2, 4, 8) if cfg.gpus % t == 0 and t <= GPUS[cfg.gpu].per_node]


def candidates(cfg: Config, given: frozenset[str], lora: int) -> list[Config]:
    """Every setting of the open knobs (the given ones as they are). ZeRO-Offload needs a ZeRO
    stage >= 1, as DeepSpeed requires."""
    stages = [cfg.zero_stage] if "zero_stage" in given else [3, 2, 1, 0]
    offloads = [cfg.offload] if "offload" in given else [False, True]
    tps = [cfg.inference_tp] if "inference_tp" in given else tp_options(cfg)
    batch = cfg.batch if "batch" in given else None
    return [dataclasses.replace(cfg, zero_stage=z, offload=o, inference_tp=t, lora_dim=lora,
                                lora_only=True if lora else cfg.lora_only, batch=batch)
            for z in stages for o in offloads if z or not o for t in tps]


def fastest_fit(cfg: Config, given: frozenset[str]) -> tuple[Config | None, int]:
    """The fitting candidate with the fewest hours, full training first; and how many fit."""
    loras = [cfg.lora_dim] if "lora_dim" in given or cfg.lora_dim else [0, SEARCH_LORA]
    for lora in loras:
        ok = [c for c in candidates(cfg, given, lora) if fits(c)]
        if ok:
            return min(ok, key=lambda c: predict(c)["total_hours"]), len(ok)
    return None, 0


def gib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.1f} GiB"


def need(cfg: Config) -> str:
    """'261.9 GiB per GPU, 72.0 usable' for one prompt per GPU (or the given batch)."""
    b = cfg.batch / cfg.gpus if cfg.batch else 1
    usable = USABLE_MEMORY * GPUS[cfg.gpu].memory
    return f"{gib(memory_per_gpu(cfg, b)['total'])} per GPU, {gib(usable)} usable"


def where(cfg: Config) -> str:
    return f"{cfg.model} on {cfg.gpus} {cfg.gpu} ({cfg.engine})"


def flags(cfg: Config, knobs) -> str:
    """Command-line flags that set `knobs` to cfg's values ('without --offload' for no offload:
    the option has no negative)."""
    out = []
    for k in knobs:
        value = getattr(cfg, k)
        if k == "offload":
            out.append("--offload" if value else "without --offload")
        elif value is not None:
            out.append(f"{FLAGS[k]} {value}")
    return " ".join(out)


REASONS = {
    "zero_stage": lambda c: f"ZeRO-{c.zero_stage}",
    "offload": lambda c: "Adam states in host memory (ZeRO-Offload)" if c.offload else "",
    "inference_tp": lambda c: f"TP-{c.inference_tp} generation" if c.inference_tp > 1 else "",
    "lora_dim": lambda c: (f"LoRA-{c.lora_dim} adapters on a frozen base (no full training fits)"
                           if c.lora_dim else ""),
}


def resolve(cfg: Config, given: frozenset[str]) -> Choice:
    """The configuration as given when it fits (unless starved and another setting is faster);
    else the fastest that fits with the given knobs kept; else the configuration as given, with
    a note on what would fit."""
    ok = fits(cfg)
    if ok and not starved(cfg):
        return Choice(cfg)
    best, count = fastest_fit(cfg, given)
    if ok and (best is None or predict(best)["total_hours"] >= predict(cfg)["total_hours"]):
        return Choice(cfg)
    if best is None:
        return Choice(cfg, note=what_would_fit(cfg, given))
    chosen = tuple(k for k in KNOBS if k not in given)
    reasons = [r for k in chosen if k in REASONS for r in [REASONS[k](best)] if r]
    b = largest_batch(best) if best.batch is None else best.batch
    mem = gib(memory_per_gpu(best, b / best.gpus)["total"])
    why = (f"as given only {largest_batch(cfg) // cfg.gpus} prompts per GPU fit" if ok
           else f"as given it needs {need(cfg)}")
    note = (f"{where(cfg)}: {why}; chose {', '.join(reasons + [''])}"
            f"batch {b}: {mem} per GPU, " + (f"the fastest of {count} settings that fit"
                                              if count > 1 else "the one setting that fits"))
    return Choice(best, chosen, note)


def what_would_fit(cfg: Config, given: frozenset[str]) -> str:
    """One line: the configuration does not fit with what the user set; the settings that would,
    or else the fewest GPUs on which it would (with the user's settings, if any fit)."""
    kept = flags(cfg, [k for k in KNOBS if k in given])
    head = f"{where(cfg)} does not fit{' with ' + kept if kept else ''}: {need(cfg)}"
    open_cfg = dataclasses.replace(cfg, lora_dim=0, batch=None)
    n = cfg.gpus
    while n <= MAX_GPUS:
        tries = [(open_cfg, frozenset())] if n == cfg.gpus else [
            (dataclasses.replace(cfg, batch=None), given - {"batch"}), (open_cfg, frozenset())]
        for base, keep in tries:
            best, _ = fastest_fit(dataclasses.replace(base, gpus=n), keep)
            if best is not None:
                changed = [k for k in KNOBS[:-1]
                           if k in given and k not in keep or getattr(best, k) != getattr(cfg, k)]
                words = [f"on {n} GPUs" if n > cfg.gpus else "",
                         f"with {flags(best, changed)}" if changed else "",
                         "and the batch open" if "batch" in given else ""]
                return f"{head}; it would {' '.join(w for w in words if w)}"
        n *= 2
    why = ""
    if cfg.engine == "hybrid":
        whole = gib(param_count(model_arch(cfg.model)) * BF16)
        why = (f" (hybrid generates on one GPU, which holds the whole {whole} bf16 actor; "
               "ds-hybrid splits it with --inference-tp)")
    return f"{head}; no setting fits on up to {MAX_GPUS} GPUs{why}"
