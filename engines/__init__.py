"""Engine registry: a literal dict of entries, each a lazy import path and what the engine needs
(nothing heavy is imported here). Registering an engine is one line; the harness, `--engines
available` and the contract and parity tests all read this dict."""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    """target: "module:factory". options: the run options (bench.options names) its constructor
    takes as keyword arguments; no other option reaches it. fixed: constructor arguments this
    entry always passes. needs: "cuda" and/or importable package names; an engine whose needs are
    not met here is left out of `--engines available` (asked for by name, it reports itself
    unavailable)."""
    target: str
    options: tuple[str, ...] = ()
    fixed: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()


REGISTRY: dict[str, Entry] = {
    "hf": Entry("engines.hf:HFEngine"),
    "hybrid": Entry("engines.hybrid:HybridEngine", options=("compile", "lora_mode")),
    "hybrid-packed": Entry("engines.hybrid:HybridEngine", options=("compile", "lora_mode"),
                           fixed={"pack": True}),
    "ds-inference": Entry("engines.ds_inference:DSInferenceEngine", options=("inference_tp",),
                          needs=("deepspeed",)),
    "ds-hybrid": Entry("engines.ds_hybrid:DSHybridEngine", options=("inference_tp",),
                       needs=("cuda", "deepspeed")),
    "vllm": Entry("engines.vllm:VLLMEngine", options=("compile",), needs=("vllm",)),
}


class UnknownEngine(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def check_name(name: str) -> str:
    if name not in REGISTRY:
        raise UnknownEngine(f"unknown engine {name!r}; valid engines: {', '.join(REGISTRY)}")
    return name


def missing(name: str, device: str) -> str | None:
    """What the engine needs that this machine lacks (one phrase), or None."""
    for need in REGISTRY[check_name(name)].needs:
        if need == "cuda":
            if not device.startswith("cuda"):
                return f"needs CUDA (device: {device})"
        elif importlib.util.find_spec(need) is None:
            return f"needs the {need} package (not installed)"
    return None


def available(device: str) -> list[str]:
    """The engines whose needs are met here, in registry order."""
    return [n for n in REGISTRY if missing(n, device) is None]


def engine_class(name: str):
    """The class (or factory) the entry called `name` points at, imported."""
    module, factory = REGISTRY[check_name(name)].target.split(":")
    return getattr(importlib.import_module(module), factory)


def get(name: str, **kwargs):
    """Build the engine called `name`: its entry's fixed arguments plus `kwargs` go to the
    constructor (an argument it does not take raises TypeError)."""
    return engine_class(name)(name=name, **REGISTRY[check_name(name)].fixed, **kwargs)
