"""The engine contract: state in, state out; randomness is an argument; modes are functions."""
from __future__ import annotations

import numbers
from typing import Protocol, runtime_checkable

import torch

from .models import ModelBundle, max_positions, trainable
from .types import (Experience, GenerationConfig, Metrics, PPOConfig, Prompts, Rollout,
                    RunConfig, TrainState)


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (no CUDA, missing package); the message says why, in one line."""


@runtime_checkable
class Engine(Protocol):
    """State in, state out. A TrainState holds the trainable tensors (actor and critic, name ->
    tensor) and the optimiser state; the frozen reference and reward models are the bundle's.

    Optional members, read with getattr by the harness: `note: str` (how the engine ran, kept
    in the results); `answer_logprobs(state, rollout) -> (B, G) Tensor` (its own generation
    path's log-probs of a rollout's tokens, fed those tokens, checked by the parity probe: an
    engine without it fails parity as not measured, all but the reference, hf); `kv_pool_bytes:
    int` (a KV cache it keeps between calls, which the count of weight copies leaves out); and
    `preload()` (import the engine's own heavy libraries; the harness calls it before its memory
    baseline, so their code does not count in the engine's peaks)."""
    name: str
    # copies of the actor's weights the engine holds, the run's own included, in units of the
    # actor's weight bytes (a packed or fused layout counts at its own size); bench.holdings
    # counts them from the live tensors
    weight_copies: float

    def init(self, models: ModelBundle, cfg: RunConfig, *, seed: int) -> TrainState:
        """The state over the bundle's own trainable tensors (no copy)."""

    def sync(self, state: TrainState) -> None:
        """Refresh any second copy of the weights from the state's (no-op for one copy)."""

    def generate(self, state: TrainState, prompts: Prompts, gen: GenerationConfig, *,
                 seed: int) -> Rollout:
        """Answers sampled with the state's actor weights: the bundle's own tensors (nothing
        extra happens) or another state's over a bundle built alike (one loaded from a
        checkpoint, say), bound for the call; a second copy made from other weights is
        refreshed first. An engine that cannot bind another state's tensors (partitioned by
        ZeRO-3, held by DeepSpeed's inference containers) refuses it in one line."""

    def score(self, state: TrainState, rollout: Rollout) -> Experience:
        """The rollout scored with the state's actor and critic, taken as generate takes them
        (the frozen reference and reward are the bundle's). A generation-only bundle (the
        actor alone) has nothing to score with: ValueError."""

    def train_step(self, state: TrainState, exp: Experience, ppo: PPOConfig, *,
                   seed: int) -> tuple[TrainState, Metrics]:
        """One optimiser step of actor and critic on the state this engine's init (or its last
        train_step) returned, which it donates. Training is deterministic (the models have no
        dropout) and no engine reads `seed`: it is reserved for training that draws noise."""

    def release(self) -> None: ...


# ---------------------------------------------------------------- checks every engine makes

def check_generate_args(prompts, config, gen: GenerationConfig, seed) -> None:
    """A one-line ValueError for arguments generate cannot use, before they reach torch: the
    type and shapes of the prompts, token ids outside the vocabulary, a prompt plus answer
    longer than the model's positions, a seed that is not an int. `config`: the actor's."""
    if not isinstance(prompts, Prompts):
        raise ValueError(f"generate: prompts must be core.types.Prompts(input_ids, "
                         f"attention_mask), got {type(prompts).__name__}")
    ids, am = prompts
    if not (isinstance(ids, torch.Tensor) and isinstance(am, torch.Tensor)) or ids.dim() != 2 \
            or am.shape != ids.shape:
        raise ValueError(f"generate: input_ids and attention_mask must be (B, P) tensors of one "
                         f"shape, got {_shape(ids)} and {_shape(am)}")
    if ids.dtype not in (torch.int64, torch.int32) or min(ids.shape) < 1:
        raise ValueError(f"generate: input_ids must be integer token ids (int64 or int32) with "
                         f"at least one row and one position, got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    # one read of three numbers (one device sync on a GPU): the ids' range, and whether a row's
    # mask ever falls from 1 to 0 (padding on the right or inside, which every engine would
    # silently continue after)
    m = am.long()
    lo, hi, right = torch.stack([ids.min().long(), ids.max().long(),
                                 (m[:, 1:] < m[:, :-1]).any().long()]).tolist()
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"generate: token ids must lie in [0, {config.vocab_size}), the "
                         f"model's vocabulary; got {lo}..{hi}")
    if right:
        raise ValueError("generate: prompts must be left-padded (attention_mask 0s, then 1s, in "
                         "every row); with a Hugging Face tokenizer set padding_side='left'")
    limit = max_positions(config)
    if ids.shape[1] + gen.gen_len > limit:
        raise ValueError(f"generate: prompt {ids.shape[1]} + answer {gen.gen_len} tokens is "
                         f"longer than the model's {limit} positions")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"generate: seed must be an int, got {seed!r}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


NO_OPTIMISER = ("train_step: this state has no optimiser state (the engine was initialised "
                "with RunConfig(train=False))")


def check_train_args(state: TrainState, exp: Experience, models: ModelBundle) -> None:
    """What every train_step refuses, before anything moves: a state without optimiser state
    (a generation-only init); one over another bundle's parameters (it would train that
    bundle); one already donated to a train_step (as JAX's donate_argnums: its weights and
    moments have moved on); an experience without advantages."""
    if state.actor_opt is None:
        raise ValueError(NO_OPTIMISER)
    mine = trainable(models.actor)
    if state.actor_params.keys() != mine.keys() or any(
            state.actor_params[k] is not p for k, p in mine.items()):
        raise ValueError("train_step: this state holds another model's parameters; pass the "
                         "state this engine's init (or its last train_step) returned")
    if spent(state):
        raise ValueError("train_step: this state was donated to an earlier train_step; pass the "
                         "state that call returned (state, metrics = engine.train_step(state, "
                         "...))")
    if exp.advantages is None or exp.returns is None:
        raise ValueError("train_step: the experience has no advantages or returns; pass it "
                         "through core.step.add_advantages(exp, ppo) first")


def donate_(state: TrainState) -> None:
    """Mark a state consumed by train_step: its step counter becomes -1, which `spent` reads.
    Call it once the new state exists."""
    state.step.fill_(-1)


def spent(state: TrainState) -> bool:
    """Whether `state` was donated to a train_step (step is a CPU tensor: no device sync)."""
    return int(state.step) < 0
