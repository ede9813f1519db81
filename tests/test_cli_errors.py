"""Every bad input: exit status 2, one line naming the problem, no traceback, and an existing
run left byte for byte as it was."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bench.cli import main

TINY = ["--preset", "tiny-opt", "--batch", "2", "--prompt-len", "8", "--gen-len", "4",
        "--steps", "1", "--warmup", "0"]


@pytest.fixture
def saved_run(tmp_path):
    """A run directory holding results, as a previous run left it."""
    out = tmp_path / "saved"
    (out / "engines").mkdir(parents=True)
    options = dict(engines_run=["hf"], preset="tiny-opt", batch=2, generation_batches=1,
                   prompt_len=8, gen_len=4, warmup=0)
    (out / "results.json").write_text(json.dumps(dict(version=1, options=options, engines={},
                                                      rows=[])))
    (out / "summary.csv").write_text("engine,status\nhf,ok\n")
    (out / "engines" / "hf.jsonl").write_text("{}\n")
    return out


def _digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _expect_bad(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    return lines[0]


def _model_dir(tmp_path, with_model=True):
    from core.models import build_bundle
    d = tmp_path / "model"
    d.mkdir()
    if with_model:
        build_bundle("tiny-opt", seed=0).actor.save_pretrained(d)
    return d


CASES = {
    "unknown engine": (["--engines", "nope"], "unknown engine 'nope'; valid engines: hf"),
    "unknown preset": (["--preset", "opt-7t"], "unknown preset 'opt-7t'; valid:"),
    "zero batch": (["--batch", "0"], "--batch must be at least 1, got 0"),
    "negative prompt": (["--prompt-len", "-3"], "--prompt-len must be at least 1"),
    "zero answer": (["--gen-len", "0"], "--gen-len must be at least 1"),
    "zero steps": (["--steps", "0"], "--steps must be at least 1"),
    "too long": (["--prompt-len", "200", "--gen-len", "100"],
                 "= 300 is longer than the model's 256 positions"),
    "lora too big": (["--lora-dim", "65"], "--lora-dim 65 is larger than the layer width 64"),
    "zero stage": (["--zero-stage", "4"], "--zero-stage must be 0, 1, 2 or 3"),
    "offload without zero": (["--offload"], "--offload is ZeRO-Offload: it needs --zero-stage 1"),
    "grad-ckpt without zero": (["--grad-ckpt"], "--grad-ckpt is done by the DeepSpeed"),
    "bad lora mode": (["--lora-mode", "folded"], "--lora-mode must be auto, fused or unfused"),
    "missing path": (["--preset", "./no/such/model"], "model path './no/such/model' does not "
                                                      "exist"),
    "path of a file": (["--preset", __file__], f"model path {__file__!r} is a file"),
    "bad dtype": (["--dtype", "float8"], "--dtype must be float32, bfloat16 or float16"),
    "no cuda": (["--device", "cuda"], "no CUDA device on this machine"),
    "bad phases": (["--phases", "generate,fly"], "--phases takes a subset of"),
    "negative threads": (["--threads", "-1"], "--threads must be 0 (torch's default) to 1024"),
    "unknown device": (["--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
    "zero generation batches": (["--generation-batches", "0"],
                                "--generation-batches must be at least 1"),
    "zero ppo epochs": (["--ppo-epochs", "0"], "--ppo-epochs must be at least 1"),
    "negative parity tol": (["--parity-tol", "-1"],
                            "--parity-tol must be 0 (by dtype and logit size) or a positive"),
    "nan budget": (["--time-budget", "nan"], "--time-budget must be 0 (none) or a positive finite"),
    "negative timeout": (["--engine-timeout", "-5"], "--engine-timeout must be 0 (none) or a"),
    "not a number": (["--batch", "2.5"], "argument --batch: invalid int value: '2.5'"),
    "bad choice": (["--reward", "vibes"], "argument --reward: invalid choice"),
    "tokenizer alone": (["--tokenizer", "/tmp"], "--tokenizer is read only with --prompts-file"),
    # a lower bound (KV cache and a row of logits per sequence) over the machine's memory,
    # refused before any engine starts: the worker used to run until the OOM killer came
    "batch beyond memory": (["--batch", "1000000000000"], "--batch 1000000000000 cannot fit: "
                            "generation alone needs at least"),
    "sub-second timeout": (["--engine-timeout", "1e-9"],
                           "--engine-timeout is in seconds: 0 (none) or at least 1, got 1e-09"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_run_options(case, saved_run, capsys):
    extra, fragment = CASES[case]
    before = _digest(saved_run)
    _expect_bad(["run", "--engines", "hf", *TINY, *extra, "--out", saved_run, "--overwrite"],
                fragment, capsys)
    assert _digest(saved_run) == before


def test_out_holding_a_run_needs_overwrite(saved_run, capsys):
    before = _digest(saved_run)
    _expect_bad(["run", *TINY, "--out", saved_run], "already holds a run; pass --overwrite",
                capsys)
    assert _digest(saved_run) == before


def test_path_without_a_model(tmp_path, saved_run, capsys):
    empty = _model_dir(tmp_path, with_model=False)
    before = _digest(saved_run)
    _expect_bad(["run", *TINY, "--preset", empty, "--out", saved_run, "--overwrite"],
                "holds no Hugging Face model config", capsys)
    assert _digest(saved_run) == before


@pytest.mark.parametrize("config, fragment", [
    ("{not json", "config.json' is not a model config transformers can read"),
    (None, "holds a model config but no weights"),
])
def test_model_folder_with_a_broken_config_or_no_weights(config, fragment, tmp_path, saved_run,
                                                         capsys):
    d = _model_dir(tmp_path)
    for f in d.glob("*.safetensors"):
        f.unlink()
    if config is not None:
        (d / "config.json").write_text(config)
    capsys.readouterr()  # the save's progress bar
    before = _digest(saved_run)
    _expect_bad(["run", *TINY, "--preset", d, "--out", saved_run, "--overwrite"], fragment,
                capsys)
    assert _digest(saved_run) == before


@pytest.mark.parametrize("cmd", ["run", "sweep"])
def test_empty_out_is_refused(cmd, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where the defaults results/latest and results/sweep would go
    _expect_bad([cmd, *TINY, "--out", ""], "--out is empty: give a folder", capsys)
    assert not (tmp_path / "results").exists()


def test_run_and_sweep_folders_do_not_mix(tmp_path, saved_run, capsys):
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.csv").write_text("engine\n")
    a_file = tmp_path / "f"
    a_file.write_text("x")
    before = _digest(saved_run), _digest(sweep_dir)
    _expect_bad(["run", *TINY, "--out", sweep_dir, "--overwrite"], "holds a sweep, not a run",
                capsys)
    _expect_bad(["sweep", *TINY, "--batches", "2", "--out", saved_run, "--overwrite"],
                "holds a run, not a sweep", capsys)
    _expect_bad(["compare", saved_run, sweep_dir], f"{sweep_dir} is a sweep: its points are run "
                "folders of their own", capsys)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for cmd in ("run", "sweep"):
        _expect_bad([cmd, *TINY, "--out", a_file], f"--out {a_file} is a file, not a folder",
                    capsys)
        _expect_bad([cmd, *TINY, "--out", a_file / "sub"], "a part of the path is a file",
                    capsys)
        _expect_bad([cmd, *TINY, "--out", tmp_path / "dangling"], "is a link to nothing",
                    capsys)
    assert (_digest(saved_run), _digest(sweep_dir)) == before and a_file.read_text() == "x"


@pytest.mark.parametrize("content, fragment", [
    ("", "not a readable sweep table (EmptyDataError"),
    (b"\xff\xfe\x00", "not a readable sweep table"),
    ("engine,preset,batch,gen_len,status,gen_tokens_per_s\n", "not a sweep table (no rows"),
    ("engine,preset,batch,gen_len,status,gen_tokens_per_s\nhf,p,x,4,ok,fast\n",
     "not a sweep table (no rows, or batch, gen_len, gen_tokens_per_s not all numbers)"),
])
def test_bad_sweep_table(content, fragment, tmp_path, capsys):
    d = tmp_path / "sw"
    d.mkdir()
    (d / "sweep.csv").write_bytes(content if isinstance(content, bytes) else content.encode())
    _expect_bad(["report", d], f"{d / 'sweep.csv'}: " + fragment, capsys)
    assert not (d / "sweep.png").exists()


@pytest.mark.parametrize("content, fragment", [
    ("", "no prompts"),
    ('{"prompt": "w1"}\n{"prompt": \n', "line 2: not valid JSON"),
    ('{"text": "w1"}\n', "line 1: expected an object with a 'prompt' string"),
    ('{"prompt": 5}\n', "line 1: expected an object with a 'prompt' string"),
    (b"\xff\xfe", "not UTF-8 text"),
    ('{"prompt": "\\ud800"}\n', "line 1: the prompt is not valid Unicode text"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n", "line 1: nested too deeply to read"),
])
def test_bad_prompts_file_is_refused_before_anything_runs(content, fragment, tmp_path,
                                                           saved_run, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _digest(saved_run)
    line = _expect_bad(["run", *TINY, "--prompts-file", prompts, "--tokenizer", tmp_path,
                        "--out", saved_run, "--overwrite"], f"--prompts-file: {prompts}", capsys)
    assert fragment in line
    assert _digest(saved_run) == before


@pytest.mark.parametrize("extra, fragment", [
    (["--batches", ","], "expected comma-separated integers, got ','"),
    (["--presets", "tiny-opt,nope"], "unknown preset 'nope'"),
    (["--gen-lens", "4,260"], "is longer than the model's 256 positions"),
    (["--batches", "2,1000000000000"], "cannot fit"),
])
def test_sweep_checks_every_point_before_running_any(extra, fragment, tmp_path, capsys):
    _expect_bad(["sweep", *TINY, *extra, "--out", tmp_path / "s"], fragment, capsys)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("where, fragment", [("missing", "does not exist"),
                                             (".", "holds no tokenizer")])
def test_bad_tokenizer_path(where, fragment, tmp_path, saved_run, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2"}\n')
    before = _digest(saved_run)
    _expect_bad(["run", *TINY, "--prompts-file", prompts, "--tokenizer", tmp_path / where,
                 "--out", saved_run, "--overwrite"], f"--tokenizer '{tmp_path / where}' {fragment}",
                capsys)
    assert _digest(saved_run) == before


def test_tokenizer_vocabulary_mismatch(tmp_path, saved_run, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(600)}  # 600 tokens > tiny-opt's 512
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path / "tok")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2"}\n')
    before = _digest(saved_run)
    _expect_bad(["run", *TINY, "--prompts-file", prompts, "--tokenizer", tmp_path / "tok",
                 "--out", saved_run, "--overwrite"],
                "tokenizer has 600 tokens but the model's vocabulary is 512", capsys)
    assert _digest(saved_run) == before


@pytest.mark.parametrize("content,fragment", [
    (None, "does not exist"),
    ("engines = [hf\n", "is not valid TOML"),
    ('engines = "hf"\nbatchsize = 3\n', "unknown config key(s): batchsize"),
    ('batch = "four"\n', "config key 'batch' should be int"),
    ("engines = 3\n", "config key 'engines' should be a comma-separated string or a list"),
    ("phases = [1]\n", "config key 'phases' should be a comma-separated string or a list"),
    (b"\xff\xfe", "is not valid TOML: not UTF-8 text"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "is nested too deeply to read"),
    ("\ufeffbatch = 0\n", "--batch must be at least 1, got 0"),  # a BOM is read past
])
def test_bad_config_file(content, fragment, tmp_path, saved_run, capsys):
    cfg = tmp_path / "run.toml"
    if content is not None:
        cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _digest(saved_run)
    _expect_bad(["run", "--config", cfg, "--out", saved_run, "--overwrite"], fragment, capsys)
    assert _digest(saved_run) == before


def _results(**kw) -> str:
    """A results file, valid unless a keyword replaces one of its sections."""
    good = dict(version=1, engines={"hf": {"status": "ok"}}, rows=[], limits={},
                options=dict(engines_run=["hf"], batch=2, generation_batches=1, prompt_len=8,
                             gen_len=8, warmup=0))
    return json.dumps(dict(good, **kw))


@pytest.mark.parametrize("content,fragment", [
    (None, "no results file"),
    ('{"version": 1, "rows": [', "not valid JSON"),
    ('{"version": 7, "rows": [], "engines": {}}', "results version 7, this rlhf-bench reads "
                                                   "version 1"),
    ('{"rows": []}', "not an rlhf-bench results file"),
    ('{"version": 1, "rows": [{"engine": "hf"}], "engines": {}}', "malformed rows"),
    ('{"version": true, "rows": [], "engines": {}}', "results version True"),
    (_results(rows=[dict(engine="hf", step="a", phase="generate", metric="seconds", value=1,
                         unit="s")]), "malformed rows"),
    (_results(rows=[dict(engine="hf", step=0, phase="generate", metric="seconds", value="x",
                         unit="s")]), "malformed rows"),
    (_results(engines={"hf": "ok"}), "malformed engines section"),
    (_results(engines={"hf": {"status": 5}}), "malformed engines section"),
    (_results(options=["hf"]), "malformed options"),
    (_results(options=dict(engines_run=5)), "malformed options"),
    (_results(options=dict(engines_run=["hf"], batch="x")), "batch, generation_batches"),
    (_results(limits="x"), "malformed limits section"),
    (_results(limits={"matmul_flops": -1.0}), "malformed limits section"),
    (_results(env=["AMD EPYC"]), "malformed env section"),
    (_results(env="AMD EPYC"), "malformed env section"),
    (_results(options=dict(engines_run=[], batch=2, generation_batches=1, prompt_len=8,
                           gen_len=8, warmup=0)), "engines_run must be a non-empty list"),
    (_results(options=dict(engines_run=["hf"], batch=0, generation_batches=1, prompt_len=8,
                           gen_len=8, warmup=0)), "(batch must be whole numbers, at least 1"),
    ('{"version": 1, "rows": [{"engine": "hf", "step": 0, "phase": "generate", "metric": '
     '"seconds", "unit": "s", "value": 1' + "0" * 400 + '}], "engines": {}}', "malformed rows"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to read"),
    # a value the loader takes (NaN, +inf: a broken forward's parity) where a whole number
    # belongs: still one line naming the run
    (_results(rows=[dict(engine="hf", step=-1, phase="setup", metric="shape_n_layers",
                         value=float("inf"), unit="")]), None),
])
@pytest.mark.parametrize("cmd", ["compare", "report"])
def test_bad_results_file(cmd, content, fragment, tmp_path, saved_run, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "results.json").write_text(content)
    before = _digest(bad), _digest(saved_run)
    argv = (["compare", saved_run, bad, "--allow-different-work"] if cmd == "compare"
            else ["report", bad])  # the saved run's answers are shorter: other work
    if fragment is None:  # read, and summarised without a warning or a traceback
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code in (0, 1) and "Warning" not in err and "Traceback" not in err, err
        return
    _expect_bad(argv, fragment, capsys)
    assert (_digest(bad), _digest(saved_run)) == before


def test_more_ranks_than_the_batch_divides(monkeypatch, saved_run, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    before = _digest(saved_run)
    _expect_bad(["run", *TINY, "--batch", "4", "--zero-stage", "0", "--out", saved_run,
                 "--overwrite"], "--batch 4 does not split over 3 ranks", capsys)
    assert _digest(saved_run) == before


@pytest.mark.parametrize("value", ["ten", "nan", "inf", "-5%"])
def test_bad_compare_threshold(value, saved_run, capsys):
    # nan would turn the gate off, a negative limit would fail every run
    _expect_bad(["compare", saved_run, saved_run, f"--max-slowdown={value}"],
                f"not a percentage: '{value}'", capsys)


@pytest.mark.parametrize("value", ["10", "1"])
def test_bare_compare_threshold_of_one_or_more_is_refused(value, saved_run, capsys):
    # read as a fraction, 10 would be a 1000% gate: never firing for someone who meant 10%
    _expect_bad(["compare", saved_run, saved_run, f"--max-slowdown={value}"],
                f"'{value}' is ambiguous: write a percentage ({value}%) or a fraction below 1",
                capsys)


def test_resume_with_other_code_is_refused(saved_run, capsys, monkeypatch):
    import bench.machine
    here = bench.machine.environment  # a fixed commit: the test must not depend on a .git
    monkeypatch.setattr(bench.machine, "environment",
                        lambda: dict(here(), git_commit="fedcba9876543210" * 2 + "01234567"))
    data = json.loads((saved_run / "results.json").read_text())
    data["env"] = dict(git_commit="0123456789abcdef0123456789abcdef01234567")
    (saved_run / "results.json").write_text(json.dumps(data))
    before = _digest(saved_run)
    _expect_bad(["run", *TINY, "--out", saved_run, "--resume"],
                "--resume: the saved run was measured with other code or another machine "
                "(git_commit 0123456789ab -> fedcba987654)", capsys)
    assert _digest(saved_run) == before


def test_resume_of_a_run_with_a_malformed_env_is_refused(saved_run, capsys):
    data = json.loads((saved_run / "results.json").read_text())
    data["env"] = ["AMD EPYC"]  # hand-edited: --resume reads it to check the machine
    (saved_run / "results.json").write_text(json.dumps(data))
    before = _digest(saved_run)
    _expect_bad(["run", *TINY, "--out", saved_run, "--resume"], "malformed env section", capsys)
    assert _digest(saved_run) == before


def test_resume_with_other_options_is_refused(saved_run, capsys):
    data = json.loads((saved_run / "results.json").read_text())
    data["options"].update(preset="tiny-opt", batch=2)
    (saved_run / "results.json").write_text(json.dumps(data))
    before = _digest(saved_run)
    _expect_bad(["run", *TINY, "--batch", "4", "--out", saved_run, "--resume"],
                "--resume: options differ from the saved run (batch)", capsys)
    assert _digest(saved_run) == before


def test_unavailable_engine_is_reported_and_the_others_run(tmp_path, capsys):
    out = tmp_path / "u"
    with pytest.raises(SystemExit) as e:
        main(["run", "--engines", "hf,ds-hybrid", *TINY, "--threads", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert e.value.code == 2
    assert "engine(s) unavailable on this machine: ds-hybrid" in captured.err
    data = json.loads((out / "results.json").read_text())
    assert data["engines"]["hf"]["status"] == "ok"
    assert data["engines"]["ds-hybrid"]["status"].startswith("unavailable: ")


def test_help_names_every_preset_and_the_compare_defaults():
    from bench.cli import parser
    from core.models import PRESETS
    sub = parser()._subparsers._group_actions[0].choices
    run_help = " ".join(sub["run"].format_help().split())  # argparse wraps anywhere
    assert all(name in run_help.replace("- ", "-") for name in PRESETS), run_help
    for flag, after in (("--reward", "--lora-dim"), ("--lora-dim", "--lora-mode")):
        text = run_help.rsplit(f"{flag} ", 1)[1].split(f"{after} ", 1)[0]  # its own help
        assert "(default" in text, text
    compare_help = " ".join(sub["compare"].format_help().split())
    assert compare_help.count("(default 10%)") == 2


def test_killed_run_is_read_back_by_report_and_compare(tmp_path, capsys):
    """A harness killed mid-run leaves hf "running"; its worker's JSON lines hold the finished
    steps. Lines that are not objects are skipped, reading stops at an unreadable one, and
    compare reads the run back as report does (it once called hf "now running")."""
    from bench.results import read_jsonl
    row = dict(engine="hf", step=0, phase="generate", metric="seconds", value=1.0, unit="s")
    options = dict(engines_run=["hf"], batch=2, generation_batches=1, prompt_len=8, gen_len=8,
                   warmup=0)
    killed, base = tmp_path / "killed", tmp_path / "base"
    (killed / "engines").mkdir(parents=True)
    base.mkdir()
    (killed / "results.json").write_text(json.dumps(dict(
        version=1, options=options, engines={"hf": {"status": "running"}}, rows=[])))
    (base / "results.json").write_text(json.dumps(dict(
        version=1, options=options, engines={"hf": {"status": "ok"}}, rows=[row])))
    ghost = dict(row, engine="ghost")     # a row of another engine: not hf's
    (killed / "engines" / "hf.jsonl").write_bytes(
        b'[1, 2]\n"x"\n' + json.dumps(row).encode() + b"\n" + json.dumps(ghost).encode() + b"\n"
        + b'{"event": "status", "status": "ok"}\n\xff\xfe\n' + json.dumps(row).encode() + b"\n")
    assert read_jsonl(killed / "engines" / "hf.jsonl") == [row, ghost,
                                                           dict(event="status", status="ok")]
    assert read_jsonl(killed / "engines") == []  # a folder where the file belongs: nothing
    from bench.results import load_results, recover
    assert recover(load_results(killed), killed)["rows"] == [row]   # hf's own rows alone
    for argv in (["report", killed], ["compare", base, killed],
                 ["compare", base, killed / "results.json"]):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert e.value.code == 0 and "Traceback" not in err, (out, err)
    assert "no regression" in out and "ghost" not in out


def test_a_sweep_value_given_twice_is_one_point():
    from bench.sweep import _ints
    assert _ints("2,4,2", 8) == [2, 4] and _ints("", 8) == [8]
