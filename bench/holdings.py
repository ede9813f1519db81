"""How many copies of the actor's weights an engine really holds, counted from what is alive in
the process rather than taken from the engine's word (its `weight_copies`).

After a gc, every live tensor (nn.Parameters included) is found with gc.get_objects() and its
storage counted once (views and tied weights share one); an opaque tensor (MKL-packed, MKL-DNN)
has no storage and counts at numel x element size, what it was allocated. Weights a library
keeps outside torch's tensors count where the Python object owning them says how large they are
(LIBRARY_HELD). What the run itself holds is set aside: the bundle's four models (parameters
and buffers) and the state (trainable tensors, optimiser moments, counters). What is left is the
engine's own: a second copy, a packed layout, a KV cache, working buffers. The engine's KV
cache (`kv_pool_bytes`: vLLM's pool, hybrid's static cache) is not weights and comes off; the
rest, in units of the actor's weight bytes, plus the one copy the run holds, is the count. Take
it after a generate, when its transient caches are freed and any copy made on first use exists
(the worker takes it right after the parity probe).
"""
from __future__ import annotations

import gc

import torch
from torch import nn

# attributes of objects inside a state (an optimiser and what it holds) followed this deep
_DEPTH = 3

# type name -> bytes of weights the object keeps outside torch's tensors, in elements of
# `itemsize` bytes. vLLM's CPU linears hand their weight to a oneDNN matmul handler (k x n) and
# keep an empty parameter.
LIBRARY_HELD = {"CPUDNNLGEMMHandler": lambda h, itemsize: h.k * h.n * itemsize}


def live_holdings(itemsize: int = 4) -> dict:
    """key -> (owner, bytes) for every storage alive in the process (after a gc), every opaque
    tensor and every LIBRARY_HELD object (its weights in elements of `itemsize` bytes). The
    owners are kept: while the dict lives, no address in it is reused."""
    # gc.get_objects() skips what gc.freeze() set aside, and vLLM freezes its whole heap once
    # started: thaw it for the walk, and freeze what lives again after
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    gc.collect()
    out = {}
    try:
        for obj in gc.get_objects():
            # type(), not isinstance: that would read __class__ off every object, and some warn
            kind = type(obj)
            if issubclass(kind, torch.Tensor):
                key, owner, n = _storage(obj)
                if key is not None:
                    out[key] = (owner, n)
            elif kind.__name__ in LIBRARY_HELD:
                out[("held", id(obj))] = (obj, LIBRARY_HELD[kind.__name__](obj, itemsize))
    finally:
        if frozen:
            gc.freeze()
    return out


def _storage(t: torch.Tensor):
    """(key, owner, bytes) of the memory `t` computes with, or Nones for a tensor that holds none
    of its own (meta, a fake tensor left from tracing, a functorch wrapper)."""
    if t.device.type == "meta":
        return None, None, 0
    if t.layout == torch._mkldnn:  # opaque (MKL-DNN, MKL-packed): no storage, its own memory
        return ("opaque", id(t)), t, t.numel() * t.element_size()
    try:
        s = t.untyped_storage()
        key = (str(s.device), s.data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return None, None, 0
    if key[1] == 0 or s.nbytes() == 0:
        return None, None, 0
    return key, s, s.nbytes()


def run_tensors(bundle, state) -> list:
    """Every tensor the run itself holds: the bundle's models' parameters and buffers (ZeRO-3's
    partitions too) and the state's tensors, optimiser state included. `state` may be several
    states (a tuple of them), all the run's."""
    found, seen = [], set()

    def walk(obj, depth):
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            part = getattr(obj, "ds_tensor", None)  # a ZeRO-3 parameter's own partition
            if isinstance(part, torch.Tensor):
                found.append(part)
        elif isinstance(obj, nn.Module):
            for t in [*obj.parameters(), *obj.buffers()]:
                walk(t, depth)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v, depth)
        elif depth > 0 and hasattr(obj, "__dict__"):  # an optimiser, and what it holds
            for v in vars(obj).values():
                walk(v, depth - 1)

    for model in bundle[:4]:  # actor, ref, critic, reward (None in a generation-only bundle)
        walk(model, _DEPTH)
    walk(state, _DEPTH)
    return found


def actor_bytes(actor: nn.Module) -> int:
    """The actor's weight bytes (parameters and buffers, tied ones once; a ZeRO-3 parameter at
    its full size)."""
    seen, total = set(), 0
    for t in [*actor.parameters(), *actor.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += getattr(t, "ds_numel", t.numel()) * t.element_size()
    return total


def weight_copies(engine, bundle, state, exclude: dict | None = None) -> float:
    """Copies of the actor's weights the process holds: 1 (the run's own) + the bytes alive that
    neither the run holds nor `exclude` (a live_holdings() taken before the run, in a process
    that holds other things) lists, less the engine's KV cache, over the actor's weight bytes.
    NaN for an actor of no size."""
    size = actor_bytes(bundle.actor)
    if not size:
        return float("nan")
    live = live_holdings(next(bundle.actor.parameters()).element_size())
    mine = {_storage(t)[0] for t in run_tensors(bundle, state)}
    extra = sum(n for k, (_, n) in live.items()
                if k not in mine and not (exclude and k in exclude))
    extra -= getattr(engine, "kv_pool_bytes", 0) or 0
    return 1.0 + extra / size
