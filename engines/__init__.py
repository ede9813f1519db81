"""Engine registry: a literal dict of lazy import paths (nothing heavy is imported here)."""
from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "hf": "engines.hf:HFEngine",
    "hybrid": "engines.hybrid:HybridEngine",
    "hybrid-packed": "engines.hybrid:packed",
    "ds-inference": "engines.ds_inference:DSInferenceEngine",
    "ds-hybrid": "engines.ds_hybrid:DSHybridEngine",
}


class UnknownEngine(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def check_name(name: str) -> str:
    if name not in REGISTRY:
        raise UnknownEngine(f"unknown engine {name!r}; valid engines: {', '.join(REGISTRY)}")
    return name


def get(name: str, **kwargs):
    """Build the engine called `name`; keyword arguments go to its constructor."""
    module, factory = REGISTRY[check_name(name)].split(":")
    return getattr(importlib.import_module(module), factory)(**kwargs)
