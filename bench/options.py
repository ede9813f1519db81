"""Every run option, declared once: name, type, default, one-line help, whether it changes the
work measured, and where it goes.

From OPTIONS come the `run` and `sweep` flags, the TOML config's keys and their type checks,
BenchOptions, its RunConfig, and the options resume and compare judge. `validate` holds the
checks that need words of their own or read several options together.
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass

from core.models import PRESETS
from core.types import LORA_MODES, RunConfig

PHASES = ("sync", "generate", "score", "train")

# where an option goes, besides a RunConfig field path ("batch", "gen.gen_len")
ENGINE = "engine"    # the constructor of every engine whose registry entry lists it
HARNESS = "harness"  # the harness and its workers alone

# what resume and compare judge
WORK = "work"          # changes the work measured: resume refuses a change, compare notes one
SAMPLING = "sampling"  # changes how the work is sampled: resume refuses a change


@dataclass(frozen=True)
class Option:
    """name: the TOML key; with - for _ the flag (--no-NAME for a bool that is on by default).
    type: int, float, bool, str, or tuple (names: comma-separated, or a TOML list).
    help: what the flag does, one line; "(default X)" is added unless it says its own.
    to: a RunConfig field path, ENGINE or HARNESS. work: WORK, SAMPLING or ""."""
    name: str
    type: type
    default: object
    help: str
    to: str = HARNESS
    work: str = ""
    choices: tuple = ()

    @property
    def flag(self) -> str:
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.type is bool and self.default else f"--{dashed}"


OPTIONS = (
    Option("engines", tuple, ("hf",), "comma-separated engine names, or 'available'"),
    Option("preset", str, "tiny-opt", f"model preset ({', '.join(PRESETS)}) or local Hugging "
           f"Face model folder", to="preset", work=WORK),
    Option("batch", int, 4, "prompts per generation batch", to="batch", work=WORK),
    Option("prompt_len", int, 32, "prompt tokens", to="prompt_len", work=WORK),
    Option("gen_len", int, 32, "answer tokens", to="gen.gen_len", work=WORK),
    Option("steps", int, 6, "measured steps (rounds); 6 or more give 95%% intervals",
           work=SAMPLING),
    Option("warmup", int, 1, "steps run first and left out of the medians", work=SAMPLING),
    Option("seed", int, 0, "seed of the weights, the prompts and the sampling", work=SAMPLING),
    Option("greedy", bool, False, "greedy decoding (default: sampled)", to="gen.greedy",
           work=WORK),
    Option("stop_at_eos", bool, False, "let answers end at EOS (default: fixed-length answers, "
           "equal work per engine)", to="gen.stop_at_eos", work=WORK),
    Option("reward", str, "model", "reward from a reward model or a rule on the answer's tokens",
           to="reward", work=WORK, choices=("model", "rule")),
    Option("lora_dim", int, 0, "LoRA rank on every linear of the actor's layers; only the "
           "adapters train (default 0: full fine-tuning)", to="lora_dim", work=WORK),
    Option("lora_mode", str, "auto", "hybrid with --lora-dim: fused (fold adapters into the "
           "weights for generate), unfused, or auto (default: fold for answers of 48+ tokens)",
           to=ENGINE, work=WORK),
    Option("zero_stage", int, -1, "train with DeepSpeed ZeRO 0..3 (default -1: plain torch)",
           to="zero_stage", work=WORK),
    Option("offload", bool, False, "ZeRO-Offload: optimizer states and step on the CPU (needs "
           "--zero-stage 1..3)", to="offload", work=WORK),
    Option("grad_ckpt", bool, False, "gradient checkpointing in training (needs --zero-stage "
           "0..3)", to="grad_ckpt", work=WORK),
    Option("inference_tp", int, 1, "ds-inference, ds-hybrid: tensor-parallel ranks that "
           "generate together (multi-rank runs)", to=ENGINE, work=WORK),
    Option("compile", bool, True, "hybrid: decode eagerly, no CUDA graphs; vllm: enforce_eager, "
           "no torch.compile or CUDA graphs (TOML: compile = false)", to=ENGINE, work=WORK),
    Option("dtype", str, "float32", "float32, bfloat16 or float16", to="dtype", work=WORK),
    Option("device", str, "cpu", "cpu, cuda or cuda:N", to="device", work=WORK),
    Option("threads", int, 0, "torch threads per engine process (default 0: torch's)"),
    # sync and generate alone make a generation-only run: RunConfig.train is then False
    Option("phases", tuple, PHASES, "comma-separated subset of sync,generate,score,train to "
           "measure", work=WORK),
    Option("ppo_epochs", int, 1, "passes over each step's experience", to="ppo.ppo_epochs",
           work=WORK),
    Option("generation_batches", int, 1, "prompt batches generated per step",
           to="ppo.generation_batches", work=WORK),
    Option("prompts_file", str, "", "JSONL of {\"prompt\": text} rows (needs --tokenizer)",
           work=WORK),
    Option("tokenizer", str, "", "local tokenizer path for --prompts-file"),
    Option("parity_tol", float, 0.0, "max |logprob diff| vs hf (default 0: by dtype and the size "
           "of hf's logits)"),
    Option("out", str, "", "run directory (default results/latest; a sweep's results/sweep)"),
    Option("overwrite", bool, False, "replace a run already in --out"),
    Option("resume", bool, False, "continue the run in --out: keep finished engines, run the "
           "others"),
    Option("sequential", bool, False, "run each engine's steps alone, one engine after "
           "another (default: engines interleaved, a step of each per round)"),
    Option("engine_timeout", float, 0.0, "seconds one engine may take before it is stopped and "
           "marked failed (default 0: none)"),
    Option("time_budget", float, 0.0, "seconds for all engines together: each gets an equal "
           "share of what is left when it starts, so time one leaves unused goes to the next "
           "(default 0: none)"),
)

BY_NAME = {o.name: o for o in OPTIONS}
# options that change the work measured (resume and compare check them); threads are the
# machine's and recorded with it
WORK_OPTIONS = tuple(o.name for o in OPTIONS if o.work == WORK)
# a resumed run must agree with the saved one on the work, and on how it is sampled
RESUME_OPTIONS = tuple(o.name for o in OPTIONS if o.work)


class ConfigError(ValueError):
    """A bad option: the message names it and says what is allowed."""


class _Methods:
    """BenchOptions' methods; its fields are OPTIONS'."""

    def run_config(self) -> RunConfig:
        """The options whose `to` is a RunConfig field path, set there; `train` follows
        --phases. The nested configs' other fields keep their defaults."""
        top, nested = {}, {}
        for o in OPTIONS:
            if o.to not in (ENGINE, HARNESS):
                head, _, leaf = o.to.partition(".")
                if leaf:
                    nested.setdefault(head, {})[leaf] = getattr(self, o.name)
                else:
                    top[head] = getattr(self, o.name)
        base = RunConfig()
        top.update({h: dataclasses.replace(getattr(base, h), **kw) for h, kw in nested.items()})
        return RunConfig(**top, train=not self.generation_only)

    @property
    def generation_only(self) -> bool:
        """Steps that only sync and generate: no scoring, no training."""
        return set(self.phases) <= {"sync", "generate"}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BenchOptions = dataclasses.make_dataclass(
    "BenchOptions", [(o.name, o.type, dataclasses.field(default=o.default)) for o in OPTIONS],
    bases=(_Methods,), frozen=True)
BenchOptions.__module__ = __name__
BenchOptions.__doc__ = "One run's options: a field per entry of OPTIONS, its default the same."


def _help(o: Option) -> str:
    if o.type is bool or "(default" in o.help or o.default == "":
        return o.help
    shown = ",".join(o.default) if o.type is tuple else o.default
    return f"{o.help} (default {shown})"


def add_flags(p) -> None:
    """A flag per option on an argparse parser. A flag not given reads None, so the TOML's
    value, or else the default, stands."""
    for o in OPTIONS:
        if o.type is bool:
            p.add_argument(o.flag, dest=o.name, default=None, help=_help(o),
                           action="store_false" if o.default else "store_true")
        else:
            p.add_argument(o.flag, dest=o.name, default=None, help=_help(o),
                           type=o.type if o.type in (int, float) else str,
                           choices=o.choices or None)


def from_dict(d: dict) -> BenchOptions:
    """BenchOptions from a TOML config, a results file's options or a worker's spec: keys with _
    or -, values of the declared types (an int where a float belongs is taken)."""
    d = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = set(d) - set(BY_NAME)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}; valid keys: "
                          f"{', '.join(sorted(BY_NAME))}")
    for k, v in d.items():
        want = BY_NAME[k].type
        if want is tuple:
            if isinstance(v, str):
                d[k] = tuple(x.strip() for x in v.split(",") if x.strip())
            elif isinstance(v, list) and all(isinstance(x, str) for x in v):
                d[k] = tuple(v)
            elif not isinstance(v, tuple):
                raise ConfigError(f"config key {k!r} should be a comma-separated string or a "
                                  f"list of names, got {v!r}")
        elif want is float and isinstance(v, int) and not isinstance(v, bool):
            d[k] = float(v)
        elif not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"config key {k!r} should be {want.__name__}, got {v!r}")
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


def differing(saved: dict, now: dict, keys) -> list[str]:
    """The keys whose values differ between two records of a run (options or environment).
    A key missing or None on either side, as in results older than it, is not compared; a
    list read back from JSON equals the tuple it was saved from."""
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v
    return [k for k in keys if saved.get(k) is not None and now.get(k) is not None
            and norm(saved[k]) != norm(now[k])]


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
