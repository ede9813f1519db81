"""Save and load a TrainState: tensors as safetensors, scalars as JSON, nothing unpickled.

A checkpoint is a folder:
  meta.json            format, version, step, seed, config, optimiser counts, tensors file name
  tensors-<id>.safetensors   actor/<name>, critic/<name> (trainable params) and
                       actor_opt/mu/<name>, actor_opt/nu/<name>, critic_opt/... (AdamW moments)

meta.json is the commit point: the new tensors file is written under a fresh name, then meta.json
is replaced atomically to name it, then older tensors files are removed. A crash at any moment
leaves either the old checkpoint or the new one, never a mix.

Only trainable tensors are saved: frozen weights (reference, reward, a LoRA actor's base) are
rebuilt from the preset and seed, so load into a bundle built exactly as the saved one was.
"""
from __future__ import annotations

import json
import os
import uuid

import torch

from .engine import spent
from .files import atomic_write
from .models import ModelBundle, trainable
from .optim import AdamState
from .types import TrainState

FORMAT, VERSION = "rlhf-bench-checkpoint", 1
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not fit the models; one-line message."""


def save(path_dir: str, state: TrainState, models: ModelBundle, *, seed: int, step: int,
         config_dict: dict) -> None:
    """Write `state` (torch backend: AdamState optimisers) as a checkpoint folder.

    `step`: PPO steps done, so a resumed run continues with step `step` and its seed
    fold_in(seed, step). `config_dict` must be JSON-serialisable (e.g. dataclasses.asdict).
    `models`: the bundle `state` trains; its trainable names must be the state's.
    """
    from safetensors.torch import save_file
    if (state.actor_params.keys() != trainable(models.actor).keys()
            or state.critic_params.keys() != trainable(models.critic).keys()):
        raise CheckpointError("the state's parameters are not the models' trainable ones")
    if spent(state):
        raise CheckpointError("this state was donated to a train_step (spent): save the state "
                              "that call returned")
    if not (isinstance(state.actor_opt, AdamState) and isinstance(state.critic_opt, AdamState)):
        raise CheckpointError("only torch-backend optimiser states (AdamState) can be saved")
    tensors = {}
    for which, params, opt in (("actor", state.actor_params, state.actor_opt),
                               ("critic", state.critic_params, state.critic_opt)):
        for k, p in params.items():
            tensors[f"{which}/{k}"] = p.detach()
            tensors[f"{which}_opt/mu/{k}"] = opt.mu[k]
            tensors[f"{which}_opt/nu/{k}"] = opt.nu[k]
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(format=FORMAT, version=VERSION, step=int(step), seed=int(seed),
                state_step=int(state.step), actor_opt_count=int(state.actor_opt.count),
                critic_opt_count=int(state.critic_opt.count), config=config_dict,
                tensors=f"tensors-{uuid.uuid4().hex}.safetensors")
    text = json.dumps(meta, indent=1, sort_keys=True)  # fails here, before any write
    os.makedirs(path_dir, exist_ok=True)
    atomic_write(os.path.join(path_dir, meta["tensors"]), lambda p: save_file(tensors, p))

    def write_meta(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(os.path.join(path_dir, META), write_meta)
    for name in os.listdir(path_dir):  # older tensors files, leftovers of killed saves
        if (name.startswith("tensors-") and name != meta["tensors"]) or ".tmp-" in name:
            os.remove(os.path.join(path_dir, name))


def _read_meta(path_dir: str) -> dict:
    path = os.path.join(path_dir, META)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path_dir!r} is not a checkpoint (no {META})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rlhf-bench checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: version {meta.get('version')!r}, this code reads "
                              f"{VERSION}")
    need = ("step", "seed", "state_step", "actor_opt_count", "critic_opt_count", "config")
    missing = [k for k in need if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: malformed (missing {', '.join(missing)})")
    name = meta.get("tensors")
    if not isinstance(name, str) or os.path.basename(name) != name or not all(
            type(meta[k]) is int for k in need[:-1]):  # bool is not a count
        raise CheckpointError(f"{path}: malformed (bad tensors name or a non-integer count)")
    bad = [k for k in need[2:-1] if not 0 <= meta[k] < 2 ** 62]   # counts held in int64
    if bad:
        raise CheckpointError(f"{path}: malformed ({', '.join(bad)} must be 0 or more and fit in "
                              f"64 bits)")
    return meta


def load_(path_dir: str, models: ModelBundle) -> tuple[TrainState, dict]:
    """Read a checkpoint into `models` and return (state, meta).

    The trainable parameters are copied in place into the modules' own tensors, so the state's
    param dicts stay the modules' parameters (one copy of the weights) and any engine built on
    these modules sees them. Load right after engine.init and call engine.sync before the next
    generate: an engine holding a second copy (hybrid-packed, ds-inference) refreshes it there.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta = _read_meta(path_dir)
    path = os.path.join(path_dir, meta["tensors"])
    try:
        t = load_file(path)
    except (OSError, SafetensorError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: unreadable tensors ({msg})") from None
    a_params, c_params = trainable(models.actor), trainable(models.critic)
    expect = {f"{w}{sub}/{k}" for w, ps in (("actor", a_params), ("critic", c_params))
              for sub in ("", "_opt/mu", "_opt/nu") for k in ps}
    if set(t) != expect:
        diff = sorted(set(t) ^ expect)
        raise CheckpointError(f"{path}: tensors do not match the models ({len(diff)} names "
                              f"differ, e.g. {diff[0]!r})")
    for w, ps in (("actor", a_params), ("critic", c_params)):
        for k, p in ps.items():
            for sub, like, dtype in (("", p, p.dtype), ("_opt/mu", p, torch.float32),
                                     ("_opt/nu", p, torch.float32)):
                x = t[f"{w}{sub}/{k}"]
                if x.shape != like.shape or x.dtype != dtype:
                    raise CheckpointError(f"{path}: {w}{sub}/{k} is {tuple(x.shape)} {x.dtype}, "
                                          f"the model wants {tuple(like.shape)} {dtype}")
    # every check passed: only now touch the models
    with torch.no_grad():
        for w, ps in (("actor", a_params), ("critic", c_params)):
            for k, p in ps.items():
                p.copy_(t[f"{w}/{k}"])

    def adam(w, ps, count):
        dev = {k: p.device for k, p in ps.items()}
        return AdamState(torch.tensor(count, dtype=torch.int64),
                         {k: t[f"{w}_opt/mu/{k}"].to(dev[k]) for k in ps},
                         {k: t[f"{w}_opt/nu/{k}"].to(dev[k]) for k in ps})
    state = TrainState(a_params, c_params, adam("actor", a_params, meta["actor_opt_count"]),
                       adam("critic", c_params, meta["critic_opt_count"]),
                       torch.tensor(meta["state_step"], dtype=torch.int64))
    return state, meta
