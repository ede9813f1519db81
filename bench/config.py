"""Benchmark options: defaults, validation, TOML files. One place knows every key."""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass

from core.types import LORA_MODES, GenerationConfig, PPOConfig, RunConfig

PHASES = ("sync", "generate", "score", "train")


# options that change the work measured (resume and compare check them); steps, warm-up and
# seed change how it is sampled, threads are the machine's and recorded with it
WORK_OPTIONS = ("preset", "batch", "prompt_len", "gen_len", "generation_batches", "ppo_epochs",
                "phases", "dtype", "device", "greedy", "stop_at_eos", "reward", "lora_dim",
                "lora_mode", "zero_stage", "offload", "grad_ckpt", "inference_tp",
                "prompts_file", "compile")

# the environment a resumed run must share with the saved one, so that kept rows and new ones
# compare; `compare` notes a difference in any but the commit (the code under test)
SETUP_KEYS = ("git_commit", "python", "torch", "transformers", "deepspeed", "cpu", "cpu_isa",
              "gpu", "threads", "world_size")


def differing(saved: dict, now: dict, keys) -> list[str]:
    """The keys whose values differ between two records of a run (options or environment).
    A key missing or None on either side, as in results older than it, is not compared; a
    list read back from JSON equals the tuple it was saved from."""
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v
    return [k for k in keys if saved.get(k) is not None and now.get(k) is not None
            and norm(saved[k]) != norm(now[k])]


class ConfigError(ValueError):
    """A bad option: the message names it and says what is allowed."""


@dataclass(frozen=True)
class BenchOptions:
    engines: tuple = ("hf",)
    preset: str = "tiny-opt"
    batch: int = 4
    prompt_len: int = 32
    gen_len: int = 32
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    greedy: bool = False
    stop_at_eos: bool = False
    reward: str = "model"
    lora_dim: int = 0
    zero_stage: int = -1
    offload: bool = False
    grad_ckpt: bool = False
    inference_tp: int = 1          # ds-inference: tensor-parallel ranks (multi-rank runs)
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 0               # 0: torch's default
    phases: tuple = PHASES
    ppo_epochs: int = 1
    generation_batches: int = 1
    prompts_file: str = ""         # JSONL of {"prompt": text}; needs tokenizer
    tokenizer: str = ""
    parity_tol: float = 0.0        # 0: by dtype and logit size (report.parity_tolerance)
    compile: bool = True           # hybrid: CUDA-graph decode (torch.compile) on GPUs
    lora_mode: str = "auto"        # hybrid: fold LoRA into the weights for generate (fused),
                                   # run it unfused, or fold for answers of >= 48 tokens (auto)
    out: str = ""
    overwrite: bool = False
    resume: bool = False           # continue the run in --out: re-run only unfinished engines
    engine_timeout: float = 0.0    # seconds per engine process; 0: no limit
    time_budget: float = 0.0       # seconds for all the engines of a run, shared out as they
                                   # go (time one leaves unused goes to the next); 0: no limit

    def run_config(self) -> RunConfig:
        return RunConfig(preset=self.preset, batch=self.batch, prompt_len=self.prompt_len,
                         gen=GenerationConfig(gen_len=self.gen_len, greedy=self.greedy,
                                              stop_at_eos=self.stop_at_eos),
                         ppo=PPOConfig(ppo_epochs=self.ppo_epochs,
                                       generation_batches=self.generation_batches),
                         reward=self.reward, lora_dim=self.lora_dim, zero_stage=self.zero_stage,
                         offload=self.offload, grad_ckpt=self.grad_ckpt,
                         inference_tp=self.inference_tp, dtype=self.dtype,
                         device=self.device, train=not self.generation_only)

    @property
    def generation_only(self) -> bool:
        """Steps that only sync and generate: no scoring, no training."""
        return set(self.phases) <= {"sync", "generate"}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


KEYS = {f.name for f in dataclasses.fields(BenchOptions)}


def from_dict(d: dict) -> BenchOptions:
    d = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = set(d) - KEYS
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}; valid keys: "
                          f"{', '.join(sorted(KEYS))}")
    for k in ("engines", "phases"):
        if isinstance(d.get(k), str):
            d[k] = tuple(x.strip() for x in d[k].split(",") if x.strip())
        elif isinstance(d.get(k), list) and all(isinstance(x, str) for x in d[k]):
            d[k] = tuple(d[k])
        elif k in d and not isinstance(d[k], tuple):
            raise ConfigError(f"config key {k!r} should be a comma-separated string or a list "
                              f"of names, got {d[k]!r}")
    types = {f.name: f.type for f in dataclasses.fields(BenchOptions)}
    for k, v in d.items():
        want = {"int": int, "float": float, "bool": bool, "str": str}.get(types[k])
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            d[k] = float(v)
        elif want and not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"config key {k!r} should be {types[k]}, got {v!r}")
    return BenchOptions(**d)


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:  # utf-8-sig: a byte-order mark some editors write is fine
            return tomllib.loads(f.read().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path!r} is not valid TOML: {e}")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not valid TOML: not UTF-8 text")
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a directory")
    except RecursionError:
        raise ConfigError(f"config file {path!r} is nested too deeply to read")


def validate(o: BenchOptions) -> BenchOptions:
    """Checks that need no model; model-dependent checks happen in the harness."""
    import engines
    for e in o.engines:
        if e != "available":
            try:
                engines.check_name(e)
            except KeyError as err:
                raise ConfigError(str(err))
    if not o.engines:
        raise ConfigError("no engines given; valid engines: " + ", ".join(engines.REGISTRY))
    for k in ("batch", "prompt_len", "gen_len", "steps", "ppo_epochs", "generation_batches"):
        if getattr(o, k) < 1:
            raise ConfigError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(o, k)}")
    for k, zero in (("engine_timeout", "none"), ("time_budget", "none"),
                    ("parity_tol", "by dtype and logit size")):
        v = getattr(o, k)
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"--{k.replace('_', '-')} must be 0 ({zero}) or a positive finite "
                              f"number, got {v}")
        if k != "parity_tol" and 0 < v < 1:  # no engine process even starts in under a second
            raise ConfigError(f"--{k.replace('_', '-')} is in seconds: 0 ({zero}) or at least 1, "
                              f"got {v:g}")
    if not 0 <= o.threads <= 1024:
        raise ConfigError(f"--threads must be 0 (torch's default) to 1024, got {o.threads}")
    if o.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {o.warmup}")
    if o.zero_stage not in (-1, 0, 1, 2, 3):
        raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3 (or -1 for plain torch), "
                          f"got {o.zero_stage}")
    if o.inference_tp < 1:
        raise ConfigError(f"--inference-tp must be at least 1, got {o.inference_tp}")
    if o.offload and o.zero_stage < 1:
        raise ConfigError(f"--offload is ZeRO-Offload: it needs --zero-stage 1, 2 or 3, got "
                          f"{'none' if o.zero_stage < 0 else o.zero_stage}")
    if o.grad_ckpt and o.zero_stage < 0:
        raise ConfigError("--grad-ckpt is done by the DeepSpeed training backend: add "
                          "--zero-stage 0..3")
    if o.lora_dim < 0:
        raise ConfigError(f"--lora-dim must be 0 (off) or positive, got {o.lora_dim}")
    if o.lora_mode not in LORA_MODES:
        raise ConfigError(f"--lora-mode must be auto, fused or unfused, got {o.lora_mode!r}")
    if o.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {o.dtype!r}")
    if o.reward not in ("model", "rule"):
        raise ConfigError(f"--reward must be 'model' or 'rule', got {o.reward!r}")
    bad = set(o.phases) - set(PHASES)
    if bad or not o.phases:
        raise ConfigError(f"--phases takes a subset of {', '.join(PHASES)}; got "
                          f"{', '.join(o.phases) or 'nothing'}")
    if o.prompts_file and not o.tokenizer:
        raise ConfigError("--prompts-file needs --tokenizer (a local tokenizer path)")
    if o.tokenizer and not o.prompts_file:
        raise ConfigError("--tokenizer is read only with --prompts-file (synthetic prompts "
                          "need no tokenizer); add --prompts-file or drop --tokenizer")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", o.device):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {o.device!r}")
    if o.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {o.device}: no CUDA device on this machine")
    return o
