"""The hybrid engine: one copy of the weights, switched between training and fast generation.

What DeepSpeed-Chat's Hybrid Engine does by patching modules at run time, done here with plain
functions: generation runs `engines.decoder.forward_` over references to the training
parameters (no copy, nothing to sync), with a static KV cache kept between steps, prefill and
decode as separate functions, LoRA fused into the weights for the generate (and restored bit
for bit after) when that pays, and under ZeRO-3 every parameter gathered
once per generate. Scoring and training are the shared torch.func (or DeepSpeed) paths.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from core.engine import EngineUnavailable, check_generate_args
from core.models import ModelBundle, position_ids, weight_bytes
from core.rng import noisy_scores
from core.types import (LORA_MODES, Experience, GenerationConfig, PPOConfig, Prompts, Rollout,
                        RunConfig, TrainState)

from . import common
from . import decoder as D
from . import kernels as K
from . import lora_fold
from . import stack as DS


class HybridEngine:
    weight_copies = 1

    # fold + restore measured at 30-58 unfused decode steps (bench/micro/lora_cost.py, opt-125m, B 8)
    LORA_FUSE_MIN_TOKENS = 48

    def __init__(self, name: str = "hybrid", compile: bool = True, pack: bool = False,
                 static: bool = False, lora_mode: str = "auto", prefill_tokens: int = 1024,
                 prefill_min_positions: int = 16):
        # compile: torch.compile decode where it pays. On CUDA it does (decode is
        # launch-bound: CUDA graphs). On this CPU it does not: compiling decode took 258 s and
        # ran 6x slower than eager (docs/performance.md), so CPU stays eager.
        # prefill chunk: prefill_tokens over the batch (its activations are the peak above the
        # cache), and at least prefill_min_positions, so that a large batch is not prefilled in
        # as many eager calls as it has prompt tokens
        if lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {', '.join(LORA_MODES)}, not "
                             f"{lora_mode!r}")
        self.name, self.compile, self.pack, self.static = name, compile, pack, static
        self.lora = lora_mode
        self.prefill_tokens, self.prefill_min_positions = prefill_tokens, prefill_min_positions
        self.cache: D.KVCache | None = None
        self.packed: D.Weights | None = None   # stale (None) after every optimiser step
        self.packed_bytes = 0
        self._packed_from = ()                 # common.stamp of the tensors it was packed from
        self._prefill = D.forward_
        self._decode = None  # decode_static_(w, cache, ids, pos, slot tensor, key_mask) or None
        self.note = ""       # what a reader of the results must know (kept in the summary)

    def init(self, models: ModelBundle, cfg: RunConfig, *, seed: int) -> TrainState:
        try:
            w = D.extract(models.actor)
            D.check_window(w, cfg.prompt_len + cfg.gen.gen_len)
        except D.UnsupportedModel as e:
            raise EngineUnavailable(str(e))
        self.models, self.cfg = models, cfg
        # nothing of an earlier init: its cache, packed copy, compiled decode or note
        self.cache, self.packed, self.packed_bytes = None, None, 0
        self._decode, self.note = None, ""
        if self.pack and not D.can_pack(w):
            raise EngineUnavailable("packed decode needs fp32 weights on a CPU torch with MKL")
        if self.pack and cfg.zero_stage == 3:
            raise EngineUnavailable("packed decode keeps a full copy: not with ZeRO-3")
        self.weight_copies = 1
        if self.pack:  # packed now, so the copy's size is known: MKL's allocation for it
            self._repack()
            self.weight_copies += self.packed_bytes / weight_bytes(models.actor)
        if cfg.device.startswith("cuda") and self.compile:
            # fixed shapes every step (static decode) -> CUDA graphs replay the whole step.
            # Prefill stays eager: a few calls per generate (chunks of prefill_tokens), of
            # GEMMs of hundreds of rows that launch overhead does not dominate, and compiling
            # it would double the cold compile time.
            self._decode = torch.compile(D.decode_static_, mode="reduce-overhead",
                                         fullgraph=True)
        elif self.static:
            self._decode = D.decode_static_
        from .zero import backend_for
        self.backend = backend_for(cfg)
        state, self.opts = self.backend.init_state(models, cfg)
        return state

    def sync(self, state: TrainState) -> None:
        """One-copy mode: nothing to do. Packed mode: re-pack the decode weights (a copy), from
        the state's weights as they are now, however they changed."""
        if self.pack:
            with common.bound(self.models.actor, state.actor_params):
                self._repack()

    @property
    def kv_pool_bytes(self) -> int:
        """Bytes of the static KV cache kept between generates (0 before the first)."""
        c = self.cache
        return 0 if c is None else sum(t.numel() * t.element_size() for t in c.k + c.v)

    def _repack(self) -> None:
        """Pack the actor's weights as bound now."""
        self.packed, self.packed_bytes = D.pack(D.extract(self.models.actor), self.cfg.batch)
        self._packed_from = common.stamp(self.models.actor.parameters())

    def _packed_now(self) -> D.Weights:
        """The packed copy, re-packed first if it was made from other tensors (another state's)
        or a parameter was written in place since (a generate without the sync before it). A
        write through `.data` leaves torch's version counter alone: only an explicit sync sees
        that one."""
        if self.packed is None or not common.unchanged(self._packed_from,
                                                       self.models.actor.parameters()):
            self._repack()
        return self.packed

    def _gathered(self):
        """Under ZeRO-3, gather every actor parameter once for the whole generate (and lift
        ZeRO's per-layer hooks), instead of once per layer per token."""
        if self.cfg.zero_stage == 3:
            return self.backend.gathered(self.opts[0])
        return contextlib.nullcontext()

    def _cache_for(self, w: D.Weights, batch: int, length: int, dtype, device) -> D.KVCache:
        c = self.cache
        k0 = None if c is None else c.k[0]
        if k0 is None or k0.shape[0] != batch or k0.shape[2] < length or k0.dtype != dtype:
            self.cache = None  # free the old one before allocating
            self.cache = D.new_cache(w, batch, length, dtype, device)
            if self._decode is not None and self.cache.k[0].is_cuda:
                # the graph writes into the cache in place: its addresses must never change
                for t in self.cache.k + self.cache.v:
                    torch._dynamo.mark_static_address(t)
        return self.cache

    def _fuse_lora(self, w: D.Weights, gen_len: int) -> bool:
        """Fold LoRA into the weights for this generate? Packed decode keeps its own packed
        base copy, so it stays unfused; `auto` fuses when enough tokens share the cost."""
        if self.pack or self.lora == "unfused" or not lora_fold.has_lora(w):
            return False
        return self.lora == "fused" or gen_len >= self.LORA_FUSE_MIN_TOKENS

    @torch.no_grad()
    def generate(self, state: TrainState, prompts: Prompts, gen: GenerationConfig, *,
                 seed: int) -> Rollout:
        check_generate_args(prompts, self.models.config, gen, seed)
        pad, eos = self.models.pad_id, self.models.eos_id
        done = torch.zeros(prompts.input_ids.shape[0], dtype=torch.bool,
                           device=prompts.input_ids.device)

        def pick(t, logits):
            nonlocal done
            # greedy: the argmax of the fp32 logits (widening is exact, so the same token;
            # torch's bf16 argmax on the CPU is several times slower than widening first)
            scores = logits.float() if gen.greedy else noisy_scores(
                logits, seed, t, gen.temperature, uniform=K.counter_uniform)
            tok = scores.argmax(-1)
            if not gen.stop_at_eos:
                return tok, False
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            done = done | (tok == eos)
            return tok, bool(done.all())

        answer = self._decode_loop(state, prompts, gen.gen_len, pick)
        return common.finish_rollout(prompts, answer, pad, eos, gen.stop_at_eos)

    @torch.no_grad()
    def answer_logprobs(self, state: TrainState, rollout: Rollout) -> torch.Tensor:
        """(B, G) fp32 log-probs of the rollout's answer tokens as generation computes them
        (prefill, then the cached decode steps, fed the rollout's own tokens). The harness's
        parity probe compares them with the training forward's."""
        P = rollout.prompt_len
        forced, out = rollout.seq[:, P:], []

        def pick(t, logits):
            tok = forced[:, t]
            out.append(logits.float().log_softmax(-1).gather(-1, tok[:, None])[:, 0])
            return tok, False

        self._decode_loop(state, Prompts(rollout.seq[:, :P], rollout.attention_mask[:, :P]),
                          forced.shape[1], pick)
        return torch.stack(out, 1)

    def _decode_loop(self, state: TrainState, prompts: Prompts, G: int, pick) -> torch.Tensor:
        """Prefill, then G tokens: pick(t, logits (B, V)) -> (tokens (B,), stop now?) chooses
        each; returns the (B, G) answer (pad after a stop)."""
        ids, am = prompts
        B, P = ids.shape
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._gathered())
            # the state's weights: the module's own (nothing moves) or another state's
            stack.enter_context(common.bound(self.models.actor, state.actor_params))
            w = D.extract(self.models.actor)
            if self._fuse_lora(w, G):
                w = stack.enter_context(lora_fold.lora_fused(w))
            if self.pack and B == self.cfg.batch:
                w = self._packed_now()
            D.check_window(w, P + G)
            cache = self._cache_for(w, B, P + G, w.embed.dtype, ids.device)
            # over the whole cache, which a longer earlier generate may have left longer
            key_mask = torch.ones(B, cache.k[0].shape[2], dtype=torch.bool, device=ids.device)
            key_mask[:, :P] = am.bool()
            pos = position_ids(am)
            next_pos = pos[:, -1:] + 1                                   # (B, 1)
            # prefill in chunks of positions: the whole cache is already allocated, so the
            # activations of one chunk, not the whole prompt's, are the peak above it; only the
            # last chunk computes logits (B, V)
            step = max(self.prefill_min_positions, self.prefill_tokens // B)
            for s0 in range(0, P, step):
                logits = self._prefill(w, cache, ids[:, s0:s0 + step], pos[:, s0:s0 + step], s0,
                                       key_mask, s0 + step >= P)
            answer = torch.full((B, G), self.models.pad_id, dtype=torch.long, device=ids.device)
            # cache slots as device tensors made once: a host scalar copied per step would
            # stall the host until the GPU drains, every token
            slots = torch.arange(P, P + G, device=ids.device)
            # an OPT-shaped model on the CPU: each decode step's layers in one C++ call, the
            # same values (engines/stack.py)
            fused = self._decode is None and DS.applies(w, B)
            ps = DS.params(w) if fused else None
            for t in range(G):
                tok, stop = pick(t, logits)
                answer[:, t] = tok
                if t == G - 1 or stop:
                    break
                # contiguous: a column of a rollout (answer_logprobs) has other strides than
                # a sampled token, and would make the compiled step compile again
                step_ids = tok[:, None].contiguous()
                if fused:
                    logits = DS.step(w, cache, step_ids, next_pos + t, P + t, key_mask, ps=ps)
                elif self._decode is None:
                    logits = D.forward_(w, cache, step_ids, next_pos + t, P + t, key_mask)
                else:
                    logits = self._decode_step(w, cache, step_ids, next_pos + t, slots[t],
                                               key_mask)
        return answer

    def _decode_step(self, *args):
        try:
            return self._decode(*args)
        except Exception as e:  # noqa: BLE001 - re-raised below unless eager can take over
            if self._decode is D.decode_static_:
                raise
            # a compile or CUDA-graph capture that fails must not cost the run: decode eagerly
            # from here on (the step rewrites the same cache slot) and say so in the results
            self._decode = D.decode_static_
            first = (str(e).strip().splitlines() or [""])[0][:160]
            self.note = f"compiled decode failed, decode ran eager: {type(e).__name__}: {first}"
            print(f"hybrid: {self.note}", file=sys.stderr)
            return self._decode(*args)

    def score(self, state: TrainState, rollout: Rollout) -> Experience:
        # full-sequence forwards: ZeRO-3's hooks gather each layer once per forward, which is
        # what a forward costs anyway
        return common.score(self.models, state, rollout, self.cfg.reward)

    def train_step(self, state: TrainState, exp: Experience, ppo: PPOConfig, *, seed: int):
        self.packed = None  # packed copies are stale once the weights move
        return self.backend.train_step(self.models, self.opts, state, exp, ppo)

    def release(self) -> None:
        """Free the KV cache (DeepSpeed's release_inference_cache); the next generate
        allocates a new one."""
        self.cache = None
