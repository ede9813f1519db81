"""DeepSpeed-Chat's published step-3 hours beside the projection's `ds-hybrid` predictions: the
calibration rows with their scripts' settings, and every published cell as a user would ask for
it, with only model, GPU count and GPU kind (the rows and their sources are in presets.py)."""
from __future__ import annotations

import dataclasses

from .model import Config, memory_fit, predict
from .presets import CALIBRATION, PUBLISHED
from .search import resolve


def _fit_per_gpu(cfg: Config, per_gpu: int) -> Config:
    """Halve the prompts per GPU until they fit (DeepSpeed-Chat's rule: the largest that fits)."""
    while per_gpu > 1 and not memory_fit(cfg, per_gpu):
        per_gpu //= 2
    return dataclasses.replace(cfg, batch=per_gpu * cfg.gpus)


def as_asked(gpus: int, gpu: str, model: str):
    """What `rlhf-bench project --model MODEL --gpus GPUS --gpu GPU` prices (search.Choice)."""
    return resolve(Config(model=model, gpus=gpus, gpu=gpu), frozenset())


def calibration_table():
    """DeepSpeed-Chat's published step-3 hours beside our `ds-hybrid` predictions: the calibration
    rows (per-row script settings), then every published cell as asked (model, GPUs, GPU kind)."""
    import pandas as pd
    rows = []
    for gpus, gpu, model, hours, settings, script in CALIBRATION:
        settings = dict(settings)
        per_gpu = settings.pop("per_gpu")
        cfg = Config(model=model, gpus=gpus, gpu=gpu, engine="ds-hybrid", lora_only=False,
                     **settings)
        rows.append((_fit_per_gpu(cfg, per_gpu), (), hours, "calibration", script))
    for gpus, gpu, model, hours in PUBLISHED:
        choice = as_asked(gpus, gpu, model)
        rows.append((choice.cfg, choice.chosen, hours, "as asked",
                     f"--model {model} --gpus {gpus} --gpu {gpu}"))
    out = []
    for cfg, chosen, hours, kind, note in rows:
        r = predict(cfg)
        out.append({**r, "chosen": ",".join(chosen), "published_hours": hours,
                    "ratio": r["total_hours"] / hours, "set": kind, "settings": note})
    return pd.DataFrame(out)
