"""Model presets (architecture configs, random init, no download) and the four-model bundle."""
from __future__ import annotations

import contextlib
import copy
import os
from typing import NamedTuple, Optional

import torch
from torch import nn

from .rng import fold_in

# name -> (model_type, config kwargs). Tiny ones are for tests; the others have real models' shapes.
_TINY = dict(vocab_size=512, max_position_embeddings=256)
PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-opt": ("opt", dict(_TINY, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             ffn_dim=256, word_embed_proj_dim=64)),
    "tiny-llama": ("llama", dict(_TINY, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=176)),
    "tiny-qwen2": ("qwen2", dict(_TINY, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=176)),
    "tiny-gpt2": ("gpt2", dict(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4)),
    "opt-mini": ("opt", dict(vocab_size=8192, max_position_embeddings=1024, hidden_size=256,
                             num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                             word_embed_proj_dim=256)),
    "opt-125m": ("opt", dict(vocab_size=50272, max_position_embeddings=2048, hidden_size=768,
                             num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                             word_embed_proj_dim=768)),
    "opt-350m": ("opt", dict(vocab_size=50272, max_position_embeddings=2048, hidden_size=1024,
                             num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                             word_embed_proj_dim=512, do_layer_norm_before=False)),
    "opt-1.3b": ("opt", dict(vocab_size=50272, max_position_embeddings=2048, hidden_size=2048,
                             num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                             word_embed_proj_dim=2048)),
    # a current RLHF actor's shape: GQA (14 query heads, 2 KV), q/k/v biases, tied embeddings,
    # and a 152k vocabulary whose head is a quarter of the weights
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, max_position_embeddings=32768,
                                   hidden_size=896, intermediate_size=4864,
                                   num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, rms_norm_eps=1e-6,
                                   rope_theta=1e6, tie_word_embeddings=True)),
}

# Special ids: OPT's real ones for OPT presets; small fixed ids for the tiny vocabularies.
_IDS = {"opt": dict(pad_token_id=1, bos_token_id=2, eos_token_id=2),
        "llama": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "qwen2": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)}
# RLHF actors train without dropout (DeepSpeed-Chat disables it); it would also break parity.
_NO_DROPOUT = {"opt": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
               "llama": dict(attention_dropout=0.0),
               "qwen2": dict(attention_dropout=0.0),
               "mistral": dict(attention_dropout=0.0),
               "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}
# LoRA targets per family (every linear of every decoder layer, as DeepSpeed-Chat does).
_LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {"opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                "llama": _LLAMA_LINEARS, "qwen2": _LLAMA_LINEARS, "mistral": _LLAMA_LINEARS,
                "gpt2": ["c_attn", "c_proj", "c_fc"]}


class ModelError(ValueError):
    """A model could not be built from what the user gave (bad preset or path)."""


def build_config(name: str):
    from transformers import AutoConfig, CONFIG_MAPPING
    if name in PRESETS:
        mtype, kw = PRESETS[name]
        return CONFIG_MAPPING[mtype](**kw, **_IDS[mtype], **_NO_DROPOUT[mtype])
    if os.path.isdir(name):
        try:
            cfg = AutoConfig.from_pretrained(name, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means "not a model folder"
            if os.path.isfile(os.path.join(name, "config.json")):
                raise ModelError(f"{os.path.join(name, 'config.json')!r} is not a model config "
                                 f"transformers can read ({type(e).__name__}; is it valid "
                                 f"JSON?)")
            raise ModelError(f"{name!r} holds no Hugging Face model config ({type(e).__name__})")
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name)):
            raise ModelError(f"{name!r} holds a model config but no weights (*.safetensors or "
                             f"*.bin files)")
        for k, v in _NO_DROPOUT.get(cfg.model_type, {}).items():
            setattr(cfg, k, v)
        return cfg
    if os.path.isfile(name):
        raise ModelError(f"model path {name!r} is a file; give the folder that holds the model")
    if os.path.sep in name or name.startswith("."):
        raise ModelError(f"model path {name!r} does not exist")
    raise ModelError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)} or a local model path")


def hidden_out_size(cfg) -> int:
    """Width of the base model's last hidden state (OPT may project it down)."""
    return getattr(cfg, "word_embed_proj_dim", None) or cfg.hidden_size


def max_positions(cfg) -> int:
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: (B, T) int64, 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_logits(model, seq, attention_mask, prompt_len: int, params=None):
    """Logits at the positions that emit answer tokens: (B, G, V), i.e. positions P-1..T-2,
    kept at those positions only. `params`: name -> tensor to compute with instead of the
    module's own (torch.func.functional_call)."""
    from torch.func import functional_call
    G = seq.shape[1] - prompt_len
    kw = dict(input_ids=seq, attention_mask=attention_mask,
              position_ids=position_ids(attention_mask), use_cache=False, logits_to_keep=G + 1)
    out = model(**kw) if params is None else functional_call(model, params, (), kw, strict=False)
    return out.logits[:, :-1]


class ValueModel(nn.Module):
    """Base decoder + a scalar head: values (B, T) for critic and reward models."""

    def __init__(self, base: nn.Module, width: int):
        super().__init__()
        self.base = base
        self.v_head = nn.Linear(width, 1, bias=False)

    def forward(self, input_ids, attention_mask):
        out = self.base(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids(attention_mask), use_cache=False)
        return self.v_head(out.last_hidden_state).squeeze(-1).float()


class ModelBundle(NamedTuple):
    """The four PPO models. A generation-only bundle (build_bundle(actor_only=True)) has the
    actor alone: ref, critic and reward are None."""
    actor: nn.Module                # trained; a PEFT model when LoRA is on
    ref: Optional[nn.Module]        # frozen copy of the initial actor
    critic: Optional[ValueModel]    # trained, starts as a copy of the reward model
    reward: Optional[ValueModel]    # frozen
    config: object        # the actor's transformers config
    pad_id: int
    eos_id: int


def _seeded(seed: int):
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)  # leave global RNG state as it was


def _vary_constants_(model: nn.Module) -> nn.Module:
    """HF initialises every bias at 0 and every norm weight at 1, so on a preset an engine
    that dropped a bias or a norm's scale would still agree with hf, in the tests and in the
    parity probe. Move them by noise at the weights' own scale (std 0.02), as trained models'
    are. Draws from the caller's seeded RNG."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p), alpha=0.02)
    return model


@contextlib.contextmanager
def _lm_head_expected(auto, cfg):
    """A value model's base read from a causal-LM folder leaves that folder's LM head unused, as
    it should; transformers would print a load report calling it unexpected. Ignore that one key
    family while loading (every other missing or unexpected key is still reported). transformers
    reads the ignore list from the model class (no from_pretrained argument takes it), so the
    class gets it for the load and has its own back after."""
    try:
        cls = auto._model_mapping[type(cfg)]
    except KeyError:  # not a class transformers maps (from_pretrained will say so itself)
        yield
        return
    had = "_keys_to_ignore_on_load_unexpected" in cls.__dict__
    old = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    cls._keys_to_ignore_on_load_unexpected = set(
        getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ()) | {r"^lm_head\."}
    try:
        yield
    finally:
        if had:
            cls._keys_to_ignore_on_load_unexpected = old
        else:
            del cls._keys_to_ignore_on_load_unexpected


def build_bundle(name: str, *, seed: int, dtype: torch.dtype = torch.float32,
                 lora_dim: int = 0, device: str = "cpu", actor_only: bool = False) -> ModelBundle:
    """Actor, reference, critic and reward, all seeded: the same seed gives the same weights.
    actor_only: the actor alone (the same weights), for runs that only generate: the other
    three are as large again each and would only sit in memory."""
    from transformers import AutoModel, AutoModelForCausalLM
    cfg = build_config(name)
    local = name not in PRESETS

    def make(auto):  # a local folder's weights, or the preset's random init
        if local:
            quiet = _lm_head_expected(auto, cfg) if auto is AutoModel else contextlib.nullcontext()
            with quiet:
                return auto.from_pretrained(name, config=cfg, dtype=dtype, local_files_only=True)
        return _vary_constants_(auto.from_config(cfg, dtype=dtype))

    # build straight on a GPU (random init of a 1.3B model on the CPU costs tens of seconds)
    where = torch.device(device) if str(device).startswith("cuda") else contextlib.nullcontext()
    with _seeded(seed), where:
        torch.manual_seed(fold_in(seed, 1))
        actor = make(AutoModelForCausalLM)
        reward = None
        if not actor_only:
            torch.manual_seed(fold_in(seed, 2))
            reward = ValueModel(make(AutoModel), hidden_out_size(cfg)).to(dtype)
            torch.nn.init.normal_(reward.v_head.weight, std=1.0 / hidden_out_size(cfg) ** 0.5)
    ref = critic = None
    if reward is not None:
        ref = copy.deepcopy(actor)
        critic = copy.deepcopy(reward)
        for m in (ref, reward):
            m.requires_grad_(False)
    if lora_dim:
        actor = apply_lora_(actor, cfg, lora_dim, seed=seed)
    for m in (actor, ref, critic, reward):
        if m is not None:
            m.to(device).eval()
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else (cfg.eos_token_id or [pad])[0]
    return ModelBundle(actor, ref, critic, reward, cfg, int(pad), int(eos))


def apply_lora_(model: nn.Module, cfg, dim: int, *, seed: int) -> nn.Module:
    """PEFT LoRA on every decoder linear; only the adapters train (alpha = dim, scale 1)."""
    from peft import LoraConfig, get_peft_model
    width = min(hidden_out_size(cfg), cfg.hidden_size)
    if dim > width:
        raise ModelError(f"LoRA rank {dim} is larger than the layer width {width}")
    targets = LORA_TARGETS.get(cfg.model_type)
    if targets is None:
        raise ModelError(f"no LoRA targets known for model type {cfg.model_type!r}")
    lcfg = LoraConfig(r=dim, lora_alpha=dim, lora_dropout=0.0, target_modules=targets,
                      fan_in_fan_out=cfg.model_type == "gpt2", bias="none")
    with _seeded(seed):
        torch.manual_seed(fold_in(seed, 3))
        return get_peft_model(model, lcfg)


def trainable(module: nn.Module) -> dict:
    """name -> parameter for parameters that require grad (tied duplicates appear once)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def weight_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
