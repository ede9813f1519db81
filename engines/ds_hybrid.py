"""`ds-hybrid`: DeepSpeed's own Hybrid Engine, configured as DeepSpeed-Chat step 3 configures it.

The actor is one `deepspeed.initialize` engine with `hybrid_engine.enabled`: `eval()` swaps the
decoder layers' forwards for DeepSpeed's CUDA inference kernels over the same weights (under
ZeRO-3 with `pin_parameters`, all layers are gathered once per generate), `train()` swaps them
back. The critic is a plain DeepSpeed engine (engines.zero). Training is always DeepSpeed:
`--zero-stage -1` means ZeRO-0 here.

Generation runs DeepSpeed's inference containers, which hold the engine's own parameters: a
state over other tensors is refused there (one line); scoring binds it as every engine does.
`answer_logprobs` runs the same generate teacher-forced (engines.ds_inference.forced_logprobs):
the containers' own log-probs of a rollout's tokens, for the parity probe.

It runs only where DeepSpeed's kernels do: on CPU, or for a model DeepSpeed has no inference
policy for, `init` raises EngineUnavailable (the harness records one "unavailable" row); it
never falls back to plain HF generation under the ds-hybrid name.
"""
from __future__ import annotations

import torch

from core.engine import EngineUnavailable, check_generate_args
from core.models import ModelBundle
from core.types import (Experience, GenerationConfig, PPOConfig, Prompts, Rollout, RunConfig,
                        TrainState)

from . import common, zero
from .ds_inference import forced_logprobs, kernel_blocker
from .hf import hf_generate


def hybrid_config(cfg: RunConfig, inference_tp: int) -> dict:
    """DeepSpeed-Chat's `hybrid_engine` section (its step-3 defaults)."""
    return {"enabled": True,
            "max_out_tokens": cfg.prompt_len + cfg.gen.gen_len,
            "inference_tp_size": inference_tp,
            "release_inference_cache": False,
            "pin_parameters": True,
            "tp_gather_partition_size": 8}


class DSHybridEngine:
    weight_copies = 1

    def __init__(self, name: str = "ds-hybrid", inference_tp: int = 1):
        self.name, self.inference_tp = name, inference_tp
        self.actor = None

    def init(self, models: ModelBundle, cfg: RunConfig, *, seed: int) -> TrainState:
        if not (cfg.device.startswith("cuda") and torch.cuda.is_available()):
            raise EngineUnavailable("DeepSpeed's Hybrid Engine needs CUDA: its inference "
                                    "layers load the CUDA transformer_inference kernels "
                                    f"(device here: {cfg.device})")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise EngineUnavailable("deepspeed is not installed (pip install deepspeed)")
        blocker = kernel_blocker(models.actor)
        if blocker:  # DeepSpeed would keep these layers as they are: plain HF generate
            raise EngineUnavailable(f"DeepSpeed's Hybrid Engine would not swap in its kernels: "
                                    f"{blocker}")
        self.models = models
        self.cfg = cfg if cfg.zero_stage >= 0 else cfg.replace(zero_stage=0)
        section = hybrid_config(cfg, self.inference_tp)
        state, self.opts = zero.init_state(models, self.cfg, actor_extra={"hybrid_engine": section})
        self.actor = self.opts[0]
        if not self.actor._inference_containers:
            raise EngineUnavailable(f"DeepSpeed's Hybrid Engine has no inference policy for "
                                    f"{models.config.model_type} layers here; it would run "
                                    f"plain HF generate")
        self.gen_kw = zero.generate_kwargs(self.cfg)
        return state

    def sync(self, state: TrainState) -> None:
        pass  # the inference containers read the training weights (gathered under ZeRO-3)

    def generate(self, state: TrainState, prompts: Prompts, gen: GenerationConfig, *,
                 seed: int) -> Rollout:
        m = self.models
        check_generate_args(prompts, m.config, gen, seed)
        return self._in_eval(state, lambda: hf_generate(
            self.actor.module, prompts, gen, seed=seed, pad_id=m.pad_id, eos_id=m.eos_id,
            **self.gen_kw))

    def answer_logprobs(self, state: TrainState, rollout: Rollout) -> torch.Tensor:
        """(B, G) fp32: the inference containers' log-probs of the rollout's answer tokens, as
        generate computes them (teacher-forced through the same `module.generate`)."""
        m = self.models
        return self._in_eval(state, lambda: forced_logprobs(
            self.actor.module, rollout, pad_id=m.pad_id, eos_id=m.eos_id, **self.gen_kw))

    def _in_eval(self, state: TrainState, run):
        """run() with the inference containers in (DeepSpeed's eval(): `module.generate` is then
        the Hybrid Engine's), over the engine's own weights."""
        if not common.owns(self.models.actor, state.actor_params):
            raise ValueError("ds-hybrid generates with the weights DeepSpeed's engine holds, "
                             "not another state's: pass the state this engine's init or "
                             "train_step returned")
        self.actor.eval()
        try:
            return run()
        finally:
            # Back to the training forwards: scoring then runs the same math as hf's
            # (DeepSpeed-Chat scores in eval mode, through the inference kernels).
            self.actor.train()

    def score(self, state: TrainState, rollout: Rollout) -> Experience:
        return common.score(self.models, state, rollout, self.cfg.reward)

    def train_step(self, state: TrainState, exp: Experience, ppo: PPOConfig, *, seed: int):
        return zero.train_step(self.models, self.opts, state, exp, ppo)

    def release(self) -> None:
        pass  # release_inference_cache is off, as in DeepSpeed-Chat's defaults
