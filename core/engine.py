"""The engine contract: state in, state out; randomness is an argument; modes are functions."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from .models import ModelBundle
from .types import (Experience, GenerationConfig, Metrics, PPOConfig, Prompts, Rollout,
                    RunConfig, TrainState)


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (no CUDA, missing package); the message says why, in one line."""


@runtime_checkable
class Engine(Protocol):
    """Optional members, read with getattr by the harness: `note: str` (how the engine ran,
    kept in the results) and `answer_logprobs(state, rollout) -> (B, G) Tensor` (its own
    generation path's log-probs of a rollout's tokens, checked by the parity probe)."""
    name: str
    weight_copies: int  # full-size copies of the actor's weights the engine holds

    def init(self, models: ModelBundle, cfg: RunConfig, *, seed: int) -> TrainState: ...

    def sync(self, state: TrainState) -> None:
        """Refresh any second copy of the weights from the training copy (no-op for one copy)."""

    def generate(self, state: TrainState, prompts: Prompts, gen: GenerationConfig, *,
                 seed: int) -> Rollout: ...

    def score(self, state: TrainState, rollout: Rollout) -> Experience: ...

    def train_step(self, state: TrainState, exp: Experience, ppo: PPOConfig, *,
                   seed: int) -> tuple[TrainState, Metrics]: ...

    def release(self) -> None: ...
