"""The vllm engine: vLLM generating in the engine's own process, beside the trainer, as TRL's
colocate mode and veRL's hybrid engine run it; after a train step the actor's weights are
pushed into vLLM's copy in place (`sync`, timed).

vLLM holds a second copy of the actor (weight_copies 2; 3 on the CPU, whose build keeps a
oneDNN-packed copy of every matmul weight, the tied LM head included, beside the weights it
loaded) and a KV pool it allocates up front,
sized here from the run's batch and lengths. Prompts go in as token ids (left padding
stripped), answers come back as token ids. Sampling is vLLM's own sampler, seeded per row from
the step's seed: the same work as every engine's, other tokens than hf's. Scoring and training
are the shared torch code (engines.common), as hf's are.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile

import torch

from core.engine import EngineUnavailable, check_generate_args
from core.models import ModelBundle, weight_bytes
from core.rng import fold_in
from core.types import (Experience, GenerationConfig, PPOConfig, Prompts, Rollout, RunConfig,
                        TrainState)

from . import common

# tokens per KV block: vLLM's default on the CPU (its attention wants multiples of 32), and
# one every CUDA attention backend takes
BLOCK = {"cpu": 128, "cuda": 16}
# a GPU's share for vLLM covers weights, KV pool and this much for activations and graphs
GPU_MARGIN = 2 << 30


def kv_pool_bytes(config, batch: int, length: int, dtype_bytes: int, block: int) -> int:
    """The KV pool that holds `batch` sequences of `length` tokens at once: 2 (K and V) x
    layers x KV heads x head size x dtype bytes per token, whole blocks per sequence, plus the
    one block vLLM keeps aside (its null block)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    return (batch * math.ceil(length / block) + 1) * block * per_token


def hf_weights(actor) -> list[tuple[str, torch.Tensor]]:
    """The actor's weights as (Hugging Face checkpoint name, tensor), tied ones once. A PEFT
    model's LoRA adapters are folded in (W + B A x scaling, computed; the module is left as it
    is): vLLM gets a plain model."""
    base = actor.get_base_model() if hasattr(actor, "get_base_model") else actor
    deltas = {f"{n}.base_layer.weight": m for n, m in base.named_modules()
              if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    out = []
    with torch.no_grad():
        for n, p in base.named_parameters():
            if any(part.startswith("lora_") for part in n.split(".")):
                continue
            t = p.detach()
            if n in deltas:
                m = deltas[n]
                t = t + sum(m.get_delta_weight(a) for a in m.active_adapters).to(t.dtype)
            out.append((n.replace(".base_layer.", "."), t))
    return out


def _import_vllm():
    """vLLM, in this process, at this process's thread count: its CPU worker lowers torch to
    one thread unless OMP_NUM_THREADS is set."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
        from vllm import ModelRegistry  # noqa: F401 - the registry check needs it
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot run here"
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise EngineUnavailable(f"vllm cannot be imported: {type(e).__name__}: {first}")
    return vllm


def check_runnable(models: ModelBundle, cfg: RunConfig) -> None:
    """EngineUnavailable, in one line, for what vLLM cannot run, before anything is built."""
    if cfg.zero_stage >= 0:
        raise EngineUnavailable("DeepSpeed ZeRO cannot share a process with vLLM (vLLM "
                                "takes over, then destroys, torch.distributed's group)")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise EngineUnavailable("vLLM runs here on one rank, not in a multi-rank run")
    if torch.device(cfg.device).index not in (None, 0):
        raise EngineUnavailable(f"vllm: in this process vLLM takes the first GPU, not "
                                f"{cfg.device}")
    vllm = _import_vllm()
    from vllm.platforms import current_platform
    device = torch.device(cfg.device).type
    if current_platform.device_type != device:
        raise EngineUnavailable(f"this vLLM build runs on {current_platform.device_type}, "
                                f"the run is on {cfg.device}")
    base = models.actor.get_base_model() if hasattr(models.actor, "get_base_model") \
        else models.actor
    arch = type(base).__name__
    if arch not in vllm.ModelRegistry.get_supported_archs():
        raise EngineUnavailable(f"vLLM has no model for {arch}")
    if getattr(torch, cfg.dtype, None) not in current_platform.supported_dtypes:
        raise EngineUnavailable(f"vLLM has no {cfg.dtype} on this {device}")
    c = models.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if device == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise EngineUnavailable(f"vLLM's CPU attention takes head sizes "
                                    f"{', '.join(map(str, sizes))}; this model's is {head_dim}")


@contextlib.contextmanager
def _env_without(key: str):
    old = os.environ.pop(key, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[key] = old


class VLLMEngine:
    weight_copies = 2   # vLLM's copy of the actor, beside the trained one (3 on the CPU: init)

    def __init__(self, name: str = "vllm", compile: bool = True):
        # compile: vLLM's default mode (torch.compile, and CUDA graphs on a GPU); False runs
        # it eager (enforce_eager)
        self.name, self.compile = name, compile
        self.llm = None
        self.note, self.sync_bytes, self.kv_pool_bytes = "", 0, 0
        self._pushed = ()   # common.stamp of the tensors vLLM's copy was made from

    def preload(self) -> None:
        """Import vLLM (~340 MB resident) before the harness's memory baseline."""
        _import_vllm()

    def init(self, models: ModelBundle, cfg: RunConfig, *, seed: int) -> TrainState:
        self.release()   # an earlier init's vLLM
        check_runnable(models, cfg)
        self.models, self.cfg = models, cfg
        # the CPU build packs every matmul weight for oneDNN and keeps the loaded ones too
        self.weight_copies = 3 if torch.device(cfg.device).type == "cpu" else 2
        # torch training (engines.common): DeepSpeed's ZeRO is refused above
        state, self.opts = common.init_state(models, cfg)
        self._start(seed)
        return state

    def _start(self, seed: int) -> None:
        """vLLM over a folder of the actor's current weights (config + safetensors)."""
        from vllm import LLM
        m, cfg = self.models, self.cfg
        self.device = device = torch.device(cfg.device).type
        length = cfg.prompt_len + cfg.gen.gen_len
        dtype_bytes = torch.finfo(next(m.actor.parameters()).dtype).bits // 8
        self.kv_pool_bytes = kv_pool_bytes(m.config, cfg.batch, length, dtype_bytes,
                                           BLOCK[device])
        extra = {}
        if device == "cuda":
            total = torch.cuda.mem_get_info()[1]
            need = weight_bytes(m.actor) + self.kv_pool_bytes + GPU_MARGIN
            extra["gpu_memory_utilization"] = min(0.95, need / total)
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            # VLLM_CPU_KVCACHE_SPACE (whole GiB) would override the pool's size in bytes; vLLM
            # seeds torch's global generator, which stays the caller's; the folder is read
            # once, here (later weights come in by sync)
            with _env_without("VLLM_CPU_KVCACHE_SPACE"), torch.random.fork_rng(devices=[]), \
                    tempfile.TemporaryDirectory(prefix="rlhf-bench-vllm-") as folder:
                _save_hf_folder(m, folder)
                self.llm = LLM(model=folder, skip_tokenizer_init=True, dtype=cfg.dtype,
                               max_model_len=length, seed=seed, enforce_eager=not self.compile,
                               kv_cache_memory_bytes=self.kv_pool_bytes,
                               block_size=BLOCK[device], generation_config="vllm", **extra)
        finally:
            # its CPU worker swaps torch.set_num_threads for a no-op: the trainer in this
            # process keeps the run's threads, and its own way to set them
            torch.set_num_threads = set_threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        self._pushed = common.stamp(m.actor.parameters())
        notes = [f"vLLM {'compiled' if self.compile else 'eager'} in process, KV pool "
                 f"{self.kv_pool_bytes / 2**20:.1f} MiB"]
        if cfg.lora_dim:
            notes.append("LoRA merged into the weights pushed")
        preload = os.environ.get("LD_PRELOAD", "")
        if device == "cpu" and not ("libtcmalloc" in preload and "libiomp" in preload):
            notes.append("tcmalloc and Intel OpenMP not preloaded (vLLM's CPU docs advise both)")
        self.note = "; ".join(notes)

    def sync(self, state: TrainState) -> None:
        """Push the state's actor weights into vLLM's copy, in place."""
        with common.bound(self.models.actor, state.actor_params):
            self._push()

    def _push(self) -> None:
        """vLLM's copy from the actor's weights as bound now."""
        weights = hf_weights(self.models.actor)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        if self.device == "cpu":
            self.llm.apply_model(_repack_tied_head)
        self.llm.reset_prefix_cache()   # its cached prompt KV came from the old weights
        self.sync_bytes = sum(t.numel() * t.element_size() for _, t in weights)
        self._pushed = common.stamp(self.models.actor.parameters())

    @contextlib.contextmanager
    def _current(self, state: TrainState):
        """vLLM's copy holds the state's weights inside the block: pushed first when it was made
        from other tensors (another state's) or one was written in place since (a generate
        without the sync before it). A write through `.data` leaves torch's version counter
        alone: only an explicit sync sees that one."""
        with common.bound(self.models.actor, state.actor_params):
            if not common.unchanged(self._pushed, self.models.actor.parameters()):
                self._push()
            yield

    @torch.no_grad()
    def generate(self, state: TrainState, prompts: Prompts, gen: GenerationConfig, *,
                 seed: int) -> Rollout:
        from vllm import SamplingParams
        m = self.models
        check_generate_args(prompts, m.config, gen, seed)
        ids, am = prompts
        B, G = ids.shape[0], gen.gen_len
        if ids.shape[1] + G > self.cfg.prompt_len + self.cfg.gen.gen_len:
            raise ValueError(f"generate: prompt {ids.shape[1]} + answer {G} tokens is longer "
                             f"than this vllm engine was initialised for (the run's "
                             f"{self.cfg.prompt_len} + {self.cfg.gen.gen_len})")
        stop = dict(stop_token_ids=[m.eos_id]) if gen.stop_at_eos else \
            dict(min_tokens=G, ignore_eos=True)
        params = [SamplingParams(max_tokens=G, detokenize=False, **stop,
                                 **({"temperature": 0.0} if gen.greedy else
                                    {"temperature": gen.temperature, "seed": fold_in(seed, r)}))
                  for r in range(B)]
        with self._current(state):
            outs = self.llm.generate(_token_prompts(ids, am), params, use_tqdm=False)
        answer = torch.full((B, G), m.pad_id, dtype=torch.long)
        for r, o in enumerate(outs):
            toks = o.outputs[0].token_ids[:G]
            answer[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        return common.finish_rollout(prompts, answer.to(ids.device), m.pad_id, m.eos_id,
                                     gen.stop_at_eos)

    @torch.no_grad()
    def answer_logprobs(self, state: TrainState, rollout: Rollout) -> torch.Tensor:
        """(B, G) fp32: vLLM's own log-probs of the rollout's answer tokens (its prompt
        log-probs over prompt + answer[:-1], and the last token's from its sampler's raw
        log-probs at the end), for the parity probe."""
        from vllm import SamplingParams
        P, seq = rollout.prompt_len, rollout.seq
        G = seq.shape[1] - P
        last = seq[:, -1].tolist()
        params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                 prompt_logprobs=0 if G > 1 else None,
                                 logprob_token_ids=[t]) for t in last]
        with self._current(state):
            outs = self.llm.generate(_token_prompts(seq[:, :P], rollout.attention_mask[:, :P],
                                                    seq[:, P:-1]), params, use_tqdm=False)
        rows = []
        for o, ans, t in zip(outs, seq[:, P:].tolist(), last):
            early = o.prompt_logprobs[-(G - 1):] if G > 1 else []
            rows.append([lp[a].logprob for lp, a in zip(early, ans)]
                        + [o.outputs[0].logprobs[0][t].logprob])
        return torch.tensor(rows, dtype=torch.float32, device=seq.device)

    def score(self, state: TrainState, rollout: Rollout) -> Experience:
        return common.score(self.models, state, rollout, self.cfg.reward)

    def train_step(self, state: TrainState, exp: Experience, ppo: PPOConfig, *, seed: int):
        return common.train_step(self.models, self.opts, state, exp, ppo)

    def release(self) -> None:
        """Shut vLLM down: its weights, KV pool and torch.distributed group."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def _save_hf_folder(models: ModelBundle, folder: str) -> None:
    """The actor as a Hugging Face model folder (config + safetensors), LoRA merged."""
    from safetensors.torch import save_file
    base = models.actor.get_base_model() if hasattr(models.actor, "get_base_model") \
        else models.actor
    config = copy.deepcopy(models.config)
    config.architectures = [type(base).__name__]
    config.save_pretrained(folder)
    save_file({n: t.contiguous().cpu() for n, t in hf_weights(models.actor)},
              f"{folder}/model.safetensors")


def _repack_tied_head(model) -> None:
    """vLLM's CPU layers compute with a packed copy of their weight, which a reload re-packs
    for every layer it loads; an LM head tied to the embedding loads nothing of its own, so it
    would go on computing the logits from the old embedding. Re-pack it."""
    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if not (hasattr(head, "cpu_linear") and isinstance(w, torch.Tensor) and w.numel()):
        return
    if any(m is not head and getattr(m, "weight", None) is not None
           and m.weight.data_ptr() == w.data_ptr() for m in model.modules()):
        head.quant_method.process_weights_after_loading(head)


def _token_prompts(ids: torch.Tensor, am: torch.Tensor, tail: torch.Tensor | None = None
                   ) -> list:
    """Each row's prompt without its left padding, then its `tail` tokens (B, T) whole (an
    answer's padding after EOS included: its log-probs are masked out), as vLLM's prompts."""
    from vllm.inputs import TokensPrompt
    ids, am = ids.cpu(), am.cpu()
    tail = ids[:, :0] if tail is None else tail.cpu()
    return [TokensPrompt(prompt_token_ids=row[mask.bool()].tolist() + more.tolist())
            for row, mask, more in zip(ids, am, tail)]
