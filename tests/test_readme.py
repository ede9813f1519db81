"""The README's code runs as written, at a tiny scale: a user copying it gets a working loop."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(section: str) -> str:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_own_loop_snippet_trains(no_network):
    code = _snippet("Using an engine in your own loop")
    # the same code at a size a test affords: tiny-opt, batch 2, 8 + 8 tokens, two steps
    for old, new in (('"opt-125m"', '"tiny-opt"'), ("batch=8", "batch=2"),
                     ("synthetic_prompts(8,", "synthetic_prompts(2,"), ("128", "8"),
                     ("range(100)", "range(2)")):
        assert old in code, f"the README's loop no longer has {old}: update this test"
        code = code.replace(old, new)
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the project's own README
    state, metrics = ns["state"], ns["metrics"]
    assert int(state.step) == 2  # one optimiser step per PPO step, and the state was rebound
    assert all(torch.isfinite(v) for v in metrics)
    assert float(metrics.grad_norm_actor) > 0
    ns["engine"].release()
