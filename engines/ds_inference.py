"""`ds-inference`: generate with a `deepspeed.init_inference` copy of the actor.

Two copies of the actor's weights: the training one (torch or DeepSpeed ZeRO, as `hf`) and an
inference one. `sync` streams the trainable tensors, one (name, tensor) at a time, from the
training copy into the inference copy and counts the bytes (`sync_bytes`); under ZeRO-3 each
tensor is gathered on its own, never the whole model at once.

- CUDA, no LoRA, decoder layers of the legacy contract (see `kernel_blocker`): kernel
  injection. DeepSpeed re-lays the weights into its fused kernels' layout and has no call that
  refreshes them in place, so sync streams into a plain staging copy kept on the host and
  re-injects from it (timed as sync, like everything a second copy costs).
- Otherwise the plain module (`replace_with_kernel_inject=False`), with the reason in the run's
  note; with `inference_tp` > 1, AutoTP shards its linears over the tensor-parallel group and
  sync copies each rank's slice.
Generation is `engines.hf.hf_generate` on the inference engine: the same Gumbel-max sampling
as `hf`, so the same seed gives the same tokens. A generate given a state whose tensors the copy
was not synced from (another state's, or these written in place since) syncs from them first.
`answer_logprobs` runs that same generate teacher-forced (`forced_logprobs`): the log-probs the
inference module computes, prefill and cached decode, for a rollout's tokens, which the parity
probe compares with hf's. Scoring and training are `hf`'s.
"""
from __future__ import annotations

import copy
import gc
import inspect
import math

import torch

from core.engine import EngineUnavailable, check_generate_args
from core.models import ModelBundle
from core.types import (Experience, GenerationConfig, PPOConfig, Prompts, Rollout, RunConfig,
                        TrainState, torch_dtype)

from . import common, zero
from .hf import hf_generate

# decoder-layer arguments of transformers' Cache-based contract (v5 names and the older ones)
_CACHE_ARGS = ("cache", "past_key_values", "cache_position")


def kernel_blocker(model) -> str | None:
    """Why DeepSpeed's CUDA inference kernels cannot stand in for this model's decoder layers,
    or None. Its injected layer keeps the legacy contract (K/V passed as `layer_past`, a tuple
    returned); a layer that takes a Cache returns a tensor, and its model loop would hand the
    injected layer's tuple to the next layer. DeepSpeed's Hybrid Engine skips such OPT layers
    itself; `init_inference` does not."""
    stack = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), None)
    if stack is None or not len(stack):
        return "no decoder layer stack found"
    layer = stack[0]
    args = set(inspect.signature(layer.forward).parameters) & set(_CACHE_ARGS)
    if args:
        return (f"{type(layer).__name__}.forward takes a Cache ({', '.join(sorted(args))}), and "
                f"DeepSpeed's injected layers keep the legacy tuple contract")
    return None


class ForcedAnswer:
    """Logits processor that teacher-forces `generate`: at answer step t it keeps the log-probs
    (B,) the step's logits give the rollout's token t, and leaves that token the only one
    greedy decoding can pick."""

    def __init__(self, answer: torch.Tensor):
        self.answer, self.logprobs = answer, []   # answer (B, G)

    def __call__(self, input_ids, scores):        # scores (B, V): the step's logits
        tok = self.answer[:, len(self.logprobs), None]                           # (B, 1)
        self.logprobs.append(scores.float().log_softmax(-1).gather(-1, tok)[:, 0])
        return torch.full_like(scores, -math.inf).scatter_(-1, tok, 0.0)


@torch.no_grad()
def forced_logprobs(model, rollout: Rollout, *, pad_id: int, eos_id: int, **extra
                    ) -> torch.Tensor:
    """(B, G) fp32: the log-probs `model.generate` computes for the rollout's own answer tokens,
    fed them in turn (prefill, then its cached decode steps): generation's own numbers, checked
    by the parity probe. `extra` goes to generate, as in hf_generate."""
    P = rollout.prompt_len
    forced = ForcedAnswer(rollout.seq[:, P:])
    prompts = Prompts(rollout.seq[:, :P], rollout.attention_mask[:, :P])
    gen = GenerationConfig(gen_len=rollout.seq.shape[1] - P, greedy=True)
    hf_generate(model, prompts, gen, seed=0, pad_id=pad_id, eos_id=eos_id, processors=[forced],
                **extra)
    return torch.stack(forced.logprobs, 1)


class _TPGroup:
    """The `mpu` DeepSpeed's InferenceEngine asks for its tensor-parallel group (it would
    otherwise always take ranks 0..tp-1, whatever the world size)."""

    def __init__(self, group):
        self.group = group

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_world_size(self):
        import torch.distributed as dist
        return dist.get_world_size(self.group)

    def get_model_parallel_rank(self):
        import torch.distributed as dist
        return dist.get_rank(self.group)


def tp_group(tp: int):
    """This rank's group of `tp` consecutive ranks (every rank must call this)."""
    import torch.distributed as dist
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise ValueError(f"inference_tp {tp} does not divide the {world} ranks")
    mine = None
    for first in range(0, world, tp):
        g = dist.new_group(list(range(first, first + tp)))
        if first <= rank < first + tp:
            mine = g
    return mine


class DSInferenceEngine:
    weight_copies = 2

    def __init__(self, name: str = "ds-inference", inference_tp: int = 1):
        self.name, self.inference_tp = name, inference_tp
        self.infer = None
        self.sync_bytes = 0
        self.synced = ()  # common.stamp of the tensors the inference copy was made from
        self.note = ""  # what a reader of the results must know (kept in the summary)

    def init(self, models: ModelBundle, cfg: RunConfig, *, seed: int) -> TrainState:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise EngineUnavailable("deepspeed is not installed (pip install deepspeed)")
        zero.init_dist()
        self.models, self.cfg = models, cfg
        why_not = (f"DeepSpeed's inference kernels need CUDA (device: {cfg.device})"
                   if not cfg.device.startswith("cuda") else
                   "not with LoRA adapters" if cfg.lora_dim else kernel_blocker(models.actor))
        self.inject = why_not is None
        self.note = f"no kernel injection: {why_not}" if why_not else ""
        self.tp = self.inference_tp
        self.group = tp_group(self.tp) if self.tp > 1 else None
        # Copy before ZeRO-3 partitions the training module in place. Kernel injection builds
        # its own layout from this copy, so there it waits on the host: one copy on the device.
        self.plain = copy.deepcopy(models.actor)
        if self.inject:
            self.plain.to("cpu")
        self.alias = _aliases(models.actor)
        self.full = {n: p.shape for n, p in models.actor.named_parameters(remove_duplicate=False)}
        self.infer = self._build()
        self.slices = self._tp_slices() if self.tp > 1 and not self.inject else {}
        self.backend = zero.backend_for(cfg)
        state, self.opts = self.backend.init_state(models, cfg)
        self.synced = common.stamp(state.actor_params.values())  # the copy holds these now
        return state

    def _build(self):
        import deepspeed
        module = copy.deepcopy(self.plain) if self.inject else self.plain
        kw = dict(dtype=torch_dtype(self.cfg.dtype), replace_with_kernel_inject=self.inject,
                  max_out_tokens=max(1024, self.cfg.prompt_len + self.cfg.gen.gen_len))
        if self.tp > 1:
            if not self.cfg.device.startswith("cuda"):
                # DeepSpeed's shared-memory all-reduce segfaults under AutoTP on CPU.
                deepspeed.comm.comm.cdb.shm_vector_kernel_level = 0
            kw["tensor_parallel"] = {"tp_size": self.tp, "tp_group": self.group,
                                     "mpu": _TPGroup(self.group)}
        return deepspeed.init_inference(module, **kw)

    def _tp_slices(self) -> dict:
        """name -> (dim, offset, size) of this rank's AutoTP shard. Shards may be uneven (a
        64-wide lm_head input stays whole on rank 0), so the ranks swap their shapes once."""
        import torch.distributed as dist
        mine = {n: tuple(t.shape) for n, t in self.infer.module.named_parameters(
            remove_duplicate=False)}
        every = [None] * self.tp
        dist.all_gather_object(every, mine, group=self.group)
        me, out = dist.get_rank(self.group), {}
        for n, shape in mine.items():
            full = self.full[n]
            dims = {d for s in every for d, (a, b) in enumerate(zip(s[n], full)) if a != b}
            if not dims:
                continue
            (d,) = dims  # AutoTP splits one dimension
            assert sum(s[n][d] for s in every) == full[d], f"{n}: shards do not tile {full}"
            out[n] = (d, sum(s[n][d] for s in every[:me]), shape[d])
        return out

    @torch.no_grad()
    def sync(self, state: TrainState) -> None:
        """Stream every trainable tensor into the inference copy; bytes land in sync_bytes."""
        from deepspeed.runtime.zero import GatheredParameters
        target = self.plain if self.inject else self.infer.module
        dst, seen, n = {}, set(), 0
        for name, t in target.named_parameters(remove_duplicate=False):
            if t.data_ptr() not in seen:  # a tied tensor is written once
                seen.add(t.data_ptr())
                dst.setdefault(self.alias.get(name, name), []).append((name, t))
        for name, p in state.actor_params.items():
            with GatheredParameters([p], enabled=hasattr(p, "ds_id")):  # ZeRO-3: one at a time
                for dname, t in dst.get(name, []):
                    src = p.data
                    if dname in self.slices:  # this rank's tensor-parallel shard
                        src = src.narrow(*self.slices[dname])
                    t.copy_(src)
                    n += t.numel() * t.element_size()
        self.sync_bytes = n
        if self.inject:
            self.infer = None
            gc.collect()
            torch.cuda.empty_cache()
            self.infer = self._build()
        self.synced = common.stamp(state.actor_params.values())

    def generate(self, state: TrainState, prompts: Prompts, gen: GenerationConfig, *,
                 seed: int) -> Rollout:
        m = self.models
        check_generate_args(prompts, m.config, gen, seed)
        self._current(state)

        def run(p: Prompts, s: int) -> Rollout:
            # No ZeRO inside: each rank (or TP group) generates on its own copy.
            return hf_generate(self.infer, p, gen, seed=s, pad_id=m.pad_id, eos_id=m.eos_id)

        return self._in_turns(run, prompts, seed)

    def answer_logprobs(self, state: TrainState, rollout: Rollout) -> torch.Tensor:
        """(B, G) fp32: the inference module's own log-probs of the rollout's answer tokens, as
        its generate computes them (teacher-forced), for the parity probe."""
        m = self.models
        self._current(state)
        return self._in_turns(lambda r: forced_logprobs(self.infer, r, pad_id=m.pad_id,
                                                        eos_id=m.eos_id), rollout)

    def _current(self, state: TrainState) -> None:
        """Sync first when the copy holds other weights than this state's."""
        if not common.unchanged(self.synced, state.actor_params.values()):
            self.sync(state)

    def _in_turns(self, run, batch: tuple, *rest):
        """run(batch, *rest) on this rank. Tensor parallel: every rank of the group must run the
        same forwards, so the group runs each member's arguments in turn (its prompts with its
        own seed, say) and each rank keeps its own result."""
        if self.group is None:
            return run(batch, *rest)
        import torch.distributed as dist
        every = [None] * self.tp
        dist.all_gather_object(every, _moved((batch, *rest), "cpu"), group=self.group)
        mine = dist.get_rank(self.group)
        device = batch[0].device
        out = None
        for i, theirs in enumerate(every):
            r = run(*_moved(theirs, device))
            out = r if i == mine else out
        return out

    def score(self, state: TrainState, rollout: Rollout) -> Experience:
        return common.score(self.models, state, rollout, self.cfg.reward)

    def train_step(self, state: TrainState, exp: Experience, ppo: PPOConfig, *, seed: int):
        return self.backend.train_step(self.models, self.opts, state, exp, ppo)

    def release(self) -> None:
        pass  # the inference copy lives as long as the engine; HF's cache only inside generate


def _moved(x, device):
    """x (a tensor, or tuples and NamedTuples of tensors and plain values) on `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        items = [_moved(v, device) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def _aliases(module: torch.nn.Module) -> dict:
    """name -> the name `named_parameters()` gives the same tensor (tied lm_head -> embedding)."""
    first, out = {}, {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out

