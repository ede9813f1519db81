"""Prompts: seeded synthetic ones, or real ones from a JSONL file and a local tokenizer."""
from __future__ import annotations

import json
import math

import torch

from .rng import fold_in, generator
from .types import Prompts


def synthetic_prompts(batch: int, prompt_len: int, vocab_size: int, pad_id: int, *, seed: int,
                      low: int = 3, min_frac: float = 0.5) -> Prompts:
    """Random token prompts, left-padded, with true lengths spread over [min_frac*P, P]."""
    g = generator(fold_in(seed, 11))
    shortest = max(1, math.ceil(prompt_len * min_frac))
    lengths = torch.randint(shortest, prompt_len + 1, (batch,), generator=g)
    lengths[0] = prompt_len  # at least one full row, so P is the real prompt length
    ids = torch.randint(low, vocab_size, (batch, prompt_len), generator=g)
    pos = torch.arange(prompt_len).expand(batch, -1)
    mask = (pos >= (prompt_len - lengths).unsqueeze(-1)).long()  # (B, P), 1 on the right
    return Prompts(torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)), mask)


def prompt_texts(path: str, key: str = "prompt") -> list[str]:
    """The texts of a JSONL prompts file; ValueError naming the first bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text")
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory")
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}, line {n}: not valid JSON")
        except RecursionError:
            raise ValueError(f"{path}, line {n}: nested too deeply to read")
        if not isinstance(row, dict) or not isinstance(row.get(key), str):
            raise ValueError(f"{path}, line {n}: expected an object with a {key!r} string")
        try:
            row[key].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape (\ud800): no tokenizer takes it
            raise ValueError(f"{path}, line {n}: the prompt is not valid Unicode text")
        texts.append(row[key])
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts


def jsonl_prompts(path: str, tokenizer_path: str, batch: int, prompt_len: int, *, seed: int,
                  key: str = "prompt") -> Prompts:
    """`batch` prompts drawn (seeded) from a JSONL file of {"prompt": text} rows, tokenised with
    a local tokenizer, cut to their last `prompt_len` tokens and left-padded."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    texts = prompt_texts(path, key)
    order = torch.randperm(len(texts), generator=generator(fold_in(seed, 12)))
    pick = [texts[int(order[i % len(texts)])] for i in range(batch)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((batch, prompt_len), pad, dtype=torch.long)
    mask = torch.zeros((batch, prompt_len), dtype=torch.long)
    for i, text in enumerate(pick):
        t = tok(text, add_special_tokens=True)["input_ids"][-prompt_len:]
        ids[i, prompt_len - len(t):] = torch.tensor(t)
        mask[i, prompt_len - len(t):] = 1
    return Prompts(ids, mask)
