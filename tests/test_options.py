"""bench.options declares every run option once: each is a flag of `run` and `sweep`, a TOML key,
and reaches where its declaration says it goes (a RunConfig field, the constructors of the
engines whose registry entries list it, or the harness alone)."""
from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

import engines
from bench import cli
from bench.options import ENGINE, HARNESS, OPTIONS, BenchOptions, from_dict, load_toml
from core.types import RunConfig


def _other(o):
    """A value of the option's type other than its default."""
    if o.type is bool:
        return not o.default
    if o.type in (int, float):
        return o.default + 2
    if o.type is tuple:
        return ("a", "b")
    return next((c for c in o.choices if c != o.default), o.default + "x")


def _toml(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return "[" + ", ".join(f'"{x}"' for x in v) + "]"
    return repr(v) if isinstance(v, (int, float)) else f'"{v}"'


@pytest.mark.parametrize("o", OPTIONS, ids=lambda o: o.name)
def test_every_option_is_a_flag_and_a_toml_key(o, tmp_path):
    v = _other(o)
    argv = [o.flag] if o.type is bool else [o.flag, ",".join(v) if o.type is tuple else str(v)]
    for cmd in ("run", "sweep"):
        args = cli.parser().parse_args([cmd, *argv])
        assert from_dict({o.name: getattr(args, o.name)}) == BenchOptions(**{o.name: v})
    toml = tmp_path / "run.toml"
    toml.write_text(f"{o.name} = {_toml(v)}\n")
    assert from_dict(load_toml(toml)) == BenchOptions(**{o.name: v})
    assert getattr(BenchOptions(), o.name) == o.default


@pytest.mark.parametrize("o", OPTIONS, ids=lambda o: o.name)
def test_every_option_reaches_its_destination(o):
    v = _other(o)
    cfg = BenchOptions(**{o.name: v}).run_config()
    if o.to in (ENGINE, HARNESS):  # nothing of it in RunConfig (--phases sets only `train`)
        assert cfg == BenchOptions().run_config()
    else:
        node = cfg
        for part in o.to.split("."):
            node = getattr(node, part)
        assert node == v
    if o.to == ENGINE:
        takers = [e for e in engines.REGISTRY.values() if o.name in e.options]
        assert takers, f"{o.name} goes to engines, but no registry entry lists it"
        for e in takers:
            module, factory = e.target.split(":")
            made = getattr(importlib.import_module(module), factory)
            assert o.name in inspect.signature(made).parameters, e.target


def test_run_config_carries_no_engine_option_and_every_field_has_its_option():
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    to_engines = {o.name for o in OPTIONS if o.to == ENGINE}
    assert not fields & to_engines
    assert {k for e in engines.REGISTRY.values() for k in e.options} == to_engines
    set_by = {o.to.split(".")[0] for o in OPTIONS if o.to not in (ENGINE, HARNESS)}
    assert fields - set_by == {"train"}  # from --phases: a generation-only run trains nothing
    assert not BenchOptions(phases=("sync", "generate")).run_config().train
