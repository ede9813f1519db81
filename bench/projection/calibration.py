"""DeepSpeed-Chat's published step-3 hours beside the projection's `ds-hybrid` predictions: the
calibration rows with their scripts' settings, the held-out rows priced by one rule (the rows and
their sources are in presets.py)."""
from __future__ import annotations

import dataclasses

from .model import Config, auto_tp, memory_fit, predict
from .presets import CALIBRATION, HELD_OUT, MAX_GLOBAL_BATCH


def _fit_per_gpu(cfg: Config, per_gpu: int) -> Config:
    """Halve the prompts per GPU until they fit (DeepSpeed-Chat's rule: the largest that fits)."""
    while per_gpu > 1 and not memory_fit(cfg, per_gpu):
        per_gpu //= 2
    return dataclasses.replace(cfg, batch=per_gpu * cfg.gpus)


def held_out_config(gpus: int, gpu: str, model: str) -> Config:
    """The one rule the held-out rows are priced with (see HELD_OUT in presets.py)."""
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
