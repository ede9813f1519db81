"""The DeepSpeed training backend: ZeRO 0-3, CPU-Adam offload, gradient checkpointing.

Same signatures and PPO losses as `engines.common`, so an engine picks its trainer with
`backend_for(cfg)` and nothing else changes. DeepSpeed is imported lazily: engines that train
with torch never import it.

Under this backend:
  opts = (actor_engine, critic_engine), the `deepspeed.initialize` engines; they own the live
    weights and the optimiser state (moments, fp32 partitions, offload buffers).
  TrainState.actor_params / critic_params: name -> the engines' own trainable parameters
    (handles, not copies; under ZeRO-3 each is a partitioned placeholder, so read it inside
    `deepspeed.zero.GatheredParameters`). The modules in the ModelBundle are those engines'
    modules, so `models.actor(...)` (generation, scoring) sees every update; under ZeRO-3 its
    forward hooks gather each layer's parameters as it runs.
  TrainState.actor_opt / critic_opt: the engines' optimisers (handles).
  TrainState.step: 0-d int64, optimiser steps taken.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys

import torch

from core import ppo as P
from core.engine import check_train_args, donate_
from core.guards import check_finite, check_grads
from core.models import ModelBundle, trainable
from core.optim import global_norm
from core.step import experience_stats, split_rows, take
from core.types import Experience, Metrics, PPOConfig, RunConfig, TrainState

from . import common
from core.models import answer_logits

from .common import answer_values


def backend_for(cfg: RunConfig):
    """The trainer module an engine uses: this one for `--zero-stage 0..3`, else torch."""
    return sys.modules[__name__] if cfg.zero_stage >= 0 else common


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_dist() -> None:
    """Join (or, in a plain process, create) the process group DeepSpeed needs.

    Launchers (torchrun, deepspeed) set RANK, WORLD_SIZE, MASTER_ADDR/PORT. A plain process gets
    a one-rank group on a free port, passed as arguments rather than environment variables so
    that child processes (the harness's workers) do not inherit a port already taken.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    if not dist.is_initialized() and "RANK" not in os.environ:
        dist.init_process_group(get_accelerator().communication_backend_name(),
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(verbose=False)
    # DeepSpeed keeps a clone of the world group; one cloned from a group destroyed since
    # (vLLM's shutdown destroys the group it joined) names a group torch has forgotten
    from deepspeed.utils import groups
    if groups._WORLD_GROUP is not None:
        try:
            dist.get_process_group_ranks(groups._WORLD_GROUP)
        except KeyError:
            groups._WORLD_GROUP = None


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def generate_kwargs(cfg: RunConfig) -> dict:
    """Extra `generate` arguments: ZeRO-3 over several ranks must keep every rank stepping
    (each forward gathers from all ranks), even after its own rows have stopped at EOS."""
    return {"synced_gpus": True} if cfg.zero_stage == 3 and world_size() > 1 else {}


@contextlib.contextmanager
def gathered(engine):
    """Under ZeRO-3: every parameter of `engine.module` gathered and ZeRO's module hooks off,
    for one generate (DeepSpeed's own `unwrap_model_for_generation`); otherwise nothing.

    `GatheredParameters` alone is not enough: the hooks release each layer after its forward,
    so the next token gathers it again (measured in bench/micro/zero3_gather.py)."""
    if engine.zero_optimization_stage() != 3:
        yield engine.module
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
    with unwrap_model_for_generation(engine):
        yield engine.module


def ds_config(cfg: RunConfig, micro_batch: int, extra: dict | None = None) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.device.startswith("cuda")}
    conf = {"train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": cfg.ppo.grad_accum,
            "gradient_clipping": 0.0,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,   # torch AdamW: no JIT-built Adam op
            "steps_per_print": 2 ** 31, "wall_clock_breakdown": False}
    if cfg.dtype == "bfloat16":
        conf["bf16"] = {"enabled": True}
    elif cfg.dtype == "float16":
        conf["fp16"] = {"enabled": True}
    conf.update(extra or {})
    return conf


def _optimizer(params: list, lr: float, cfg: RunConfig):
    ppo = cfg.ppo
    kw = dict(lr=lr, betas=tuple(ppo.betas), eps=ppo.eps, weight_decay=ppo.weight_decay)
    if cfg.offload:  # ZeRO-Offload steps on the CPU with DeepSpeed's Adam (JIT-built once)
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    return torch.optim.AdamW(params, **kw)


def _needs_optimizer(cfg: RunConfig) -> bool:
    """A run that trains; else only ZeRO-1 and 2, which partition optimiser state and so
    require one (without, ZeRO-3 still partitions the parameters)."""
    return cfg.train or cfg.zero_stage in (1, 2)


def initialize(module: torch.nn.Module, lr: float, cfg: RunConfig, extra: dict | None = None):
    """One `deepspeed.initialize` engine around `module` (trained in place), without an
    optimiser where none is needed."""
    import deepspeed
    init_dist()
    rows = cfg.batch * cfg.ppo.generation_batches // cfg.ppo.minibatches  # per train_step
    micro = max(1, rows // cfg.ppo.grad_accum)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = _optimizer(params, lr, cfg) if _needs_optimizer(cfg) else None
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt,
                                      config=ds_config(cfg, micro, extra))
    return engine


def init_state(models: ModelBundle, cfg: RunConfig, *, actor_extra: dict | None = None
               ) -> tuple[TrainState, tuple]:
    """DeepSpeed engines for actor and critic (the actor's alone for a generation-only bundle,
    which has no critic); `actor_extra` adds keys to the actor's config (ds-hybrid passes its
    `hybrid_engine` section)."""
    has_critic = models.critic is not None
    if cfg.grad_ckpt:
        _checkpoint_layers(models.actor)
        if has_critic:
            _checkpoint_layers(models.critic.base)
    actor = initialize(models.actor, cfg.ppo.actor_lr, cfg, actor_extra)
    critic = initialize(models.critic, cfg.ppo.critic_lr, cfg) if has_critic else None
    a_opt = c_opt = None
    if _needs_optimizer(cfg):  # else None: ZeRO-3's `.optimizer` is then a parameter manager
        a_opt, c_opt = actor.optimizer, critic.optimizer if has_critic else None
    state = TrainState(trainable(actor.module), trainable(critic.module) if has_critic else {},
                       a_opt, c_opt, torch.zeros((), dtype=torch.int64))
    return state, (actor, critic)


def _checkpoint_layers(model) -> None:
    """HF activation checkpointing, non-reentrant (right for LoRA too: inputs need no grad)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def _actor_loss(engine, exp: Experience, cliprange: float):
    logits = answer_logits(engine, exp.seq, exp.attention_mask, exp.prompt_len)  # (B, G, V)
    logprobs = P.logprobs_from_logits(logits, exp.seq[:, exp.prompt_len:])
    return P.actor_loss(logprobs, exp.logprobs, exp.advantages, exp.answer_mask, cliprange)


def _critic_loss(engine, exp: Experience, cliprange_value: float):
    values = answer_values(engine, exp.seq, exp.attention_mask, exp.prompt_len)  # (B, G)
    return P.critic_loss(values, exp.values, exp.returns, exp.answer_mask, cliprange_value)


def _optimise(engine, loss_fn, exp: Experience, clip: float, label: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step over exp in `gradient_accumulation_steps` micro-batches (DeepSpeed
    scales each loss by 1/accum, so the step sees the mean gradient, as the torch backend).
    A non-finite micro-batch loss raises before its backward, so this model does not move;
    at ZeRO-0 the gradients are checked before the step too (ZeRO 1-3 keep them partitioned
    inside DeepSpeed). Returns (mean loss, global grad norm)."""
    n, accum = exp.seq.shape[0], engine.gradient_accumulation_steps()
    parts = split_rows(n, accum)
    if len(parts) != accum or n % accum:
        raise ValueError(f"{n} rows do not split into {accum} equal micro-batches (grad_accum)")
    was_training = engine.module.training
    engine.module.train()  # HF checkpoints layers only in train mode; dropout is 0 anyway
    losses, norm = [], None
    for i, rows in enumerate(parts):
        loss = loss_fn(engine, take(exp, torch.arange(n)[rows]), clip)
        check_finite("train", **{f"{label}_loss": loss})
        engine.backward(loss)
        if i == accum - 1 and engine.zero_optimization_stage() == 0:
            grads = {k: p.grad for k, p in engine.module.named_parameters()
                     if p.grad is not None}
            norm = global_norm(grads)  # ZeRO-0 keeps no norm of its own
            check_grads("train", f"{label} gradient", grads, norm)
        engine.step()  # steps the optimiser only at the accumulation boundary
        losses.append(loss.detach().float())
    engine.module.train(was_training)
    if norm is None:
        g = engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if g is None else float(g))
    return torch.stack(losses).mean(), norm.detach().float()


def train_step(models: ModelBundle, opts, state: TrainState, exp: Experience, ppo: PPOConfig
               ) -> tuple[TrainState, Metrics]:
    """Actor PPO-clip step then critic clipped-value step; one optimiser step each. (Unlike the
    torch backend's, the actor has stepped before the critic's loss is checked.)"""
    actor, critic = opts
    check_train_args(state, exp, models)
    a_loss, a_norm = _optimise(actor, _actor_loss, exp, ppo.cliprange, "actor")
    c_loss, c_norm = _optimise(critic, _critic_loss, exp, ppo.cliprange_value, "critic")
    stats = experience_stats(exp)
    metrics = Metrics(a_loss, c_loss, stats["reward"], stats["kl"], stats["returns"], a_norm,
                      c_norm)
    new = state._replace(step=state.step + 1)
    donate_(state)
    return new, metrics
