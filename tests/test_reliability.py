"""Regression tests for issue 17: one test per reliability case, named after the case number.

Each test failed before its fix: saves that could destroy a model, files written where nobody
asked, and bad inputs that surfaced as raw exceptions instead of one clear line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import kronc
from kronc.budget import Budget, BudgetError
from kronc.serialize import MANIFEST, WEIGHTS, KroncFileError, load, save
from kronc.tools.toy import FunctionalMLP, LSTMLanguageModel

LOWRANK = {"budget": "4x", "default_formats": [{"kind": "lowrank"}]}


def small_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return kronc.compile(FunctionalMLP(), policy=LOWRANK, progress=False)


def leftovers(folder: Path) -> list[str]:
    """Temporary or backup folders a save left beside its target."""
    return [p.name for p in folder.iterdir() if ".kronc-" in p.name]


# --------------------------------------------------------------------------- saving (cases 1-3)


def test_17_01_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = small_mlp(0)
    save(first, tmp_path / "m")
    x = torch.randn(2, 32)
    with torch.no_grad():
        expected = first(x)

    import kronc.serialize.writer as writer

    def interrupted(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt  # Ctrl-C while hashing the new weights

    monkeypatch.setattr(writer, "sha256", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(small_mlp(1), tmp_path / "m")
    monkeypatch.undo()
    again = load(tmp_path / "m", model=FunctionalMLP())  # the earlier save is whole
    with torch.no_grad():
        assert torch.equal(again(x), expected)
    assert leftovers(tmp_path) == []


def test_17_02_save_refuses_a_foreign_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes(b"someone else's weights")
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not a kronc save.*overwrite=True"):
        save(small_mlp(), folder)
    assert (folder / WEIGHTS).read_bytes() == b"someone else's weights"
    assert (folder / "notes.txt").read_text() == "keep me"
    save(small_mlp(), folder, overwrite=True)  # asked for: replaced
    assert (folder / MANIFEST).is_file() and not (folder / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    save(small_mlp(), empty)  # an empty folder is fine
    assert (empty / MANIFEST).is_file()


@pytest.mark.slow
def test_17_03_overwrite_leaves_no_stale_files(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from kronc.tools.toy import TOY_MODELS, toy_inputs

    torch.manual_seed(0)
    gpt2 = kronc.compile(TOY_MODELS["gpt2"](), policy=LOWRANK, example_inputs=toy_inputs("gpt2"), progress=False)
    save(gpt2, tmp_path / "m")
    (tmp_path / "m" / "eval.json").write_text(json.dumps({"perplexity": 12.0}))
    assert (tmp_path / "m" / "config.json").is_file()

    torch.manual_seed(0)
    lstm = kronc.compile(LSTMLanguageModel(), policy=LOWRANK, progress=False)
    save(lstm, tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "eval.json" not in names and "config.json" not in names, names
    assert json.loads((tmp_path / "m" / MANIFEST).read_text())["huggingface"] is False
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- manifests (cases 9, 10, 22)


def test_17_09_missing_checksum_is_an_error(tmp_path: Path) -> None:
    save(small_mlp(), tmp_path / "m")
    data = json.loads((tmp_path / "m" / MANIFEST).read_text())
    del data["weights"]["sha256"]
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(KroncFileError, match=r"no SHA-256 checksum.*verify=False"):
        load(tmp_path / "m", model=FunctionalMLP())
    assert isinstance(load(tmp_path / "m", model=FunctionalMLP(), verify=False), torch.nn.Module)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pipeline", "set_seed", "Trainer"])
def test_17_10_model_class_must_be_a_pretrained_model(name: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    from kronc.tools.toy import TOY_MODELS, toy_inputs

    torch.manual_seed(0)
    gpt2 = kronc.compile(TOY_MODELS["gpt2"](), policy=LOWRANK, example_inputs=toy_inputs("gpt2"), progress=False)
    save(gpt2, tmp_path / "m")
    data = json.loads((tmp_path / "m" / MANIFEST).read_text())
    data["model_class"] = f"transformers.{name}"
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(data))
    called: list[object] = []
    monkeypatch.setattr(transformers, name, lambda *a, **k: called.append(a), raising=False)
    with pytest.raises(KroncFileError, match=rf"model_class '{name}' is not a transformers PreTrainedModel"):
        load(tmp_path / "m")
    assert called == []


def test_17_22_manifest_source_is_quoted_as_data(tmp_path: Path) -> None:
    model = kronc.compile(FunctionalMLP(), policy=LOWRANK, output="graph", progress=False)
    save(model, tmp_path / "m", source="subprocess:Popen")
    with pytest.raises(KroncFileError) as info:
        load(tmp_path / "m")
    text = str(info.value)
    assert "\n" not in text
    assert 'model="subprocess:Popen"' not in text  # no advice to run it
    assert "'subprocess:Popen'" in text and "check it" in text


# --------------------------------------------------------------------------- budgets (case 11)


@pytest.mark.parametrize("bad", ["0MB", "0 params", "nan", "inf", "0.4B", "0x", math.nan, math.inf, 0])
def test_17_11_bad_budgets_are_one_budget_error(bad: object) -> None:
    with pytest.raises(BudgetError) as info:
        Budget.parse(bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and str(bad).strip("x") in str(info.value)


@pytest.mark.parametrize("text", ["25x", "1234567x", "1.5GB", "512KiB", "3M params", "0.4GB", "2.5x", "1_000 params"])
def test_17_11_budgets_keep_the_users_spelling_and_round_trip(text: str) -> None:
    budget = Budget.parse(text)
    assert str(budget) == text
    assert Budget.parse(str(budget)) == budget
    canonical = Budget(unit=budget.unit, value=budget.value)  # built without a spelling: every digit kept
    assert Budget.parse(str(canonical)) == budget
    assert "e+" not in str(canonical) and "inf" not in str(canonical)


# --------------------------------------------------------------------------- recovery checkpoints (cases 5, 8)


def lstm_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense teacher, compressed student): the smallest recovery setup."""
    torch.manual_seed(0)
    teacher = LSTMLanguageModel().eval()
    return teacher, kronc.compile(teacher, policy=LOWRANK, progress=False)


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (600,), generator=torch.Generator().manual_seed(1))


RECIPE = {"steps": 2, "seq_len": 16, "batch_size": 2, "progress": False}


@pytest.mark.slow
def test_17_05_checkpoint_path_never_overwrites_a_user_file(tmp_path: Path) -> None:
    from kronc.recover import RecoveryError, recover

    teacher, student = lstm_pair()
    mine = tmp_path / "thesis.txt"
    mine.write_text("two years of work")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(RecoveryError, match=r"thesis.txt exists and is not a kronc.recover checkpoint"):
        recover(student, teacher, tokens(), checkpoint_path=str(mine), **RECIPE)
    assert mine.read_text() == "two years of work"
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # refused before training
    with pytest.raises(RecoveryError, match=r"is a folder"):
        recover(student, teacher, tokens(), checkpoint_path=str(tmp_path), **RECIPE)
    assert not list(tmp_path.glob("*.tmp"))
    ours = tmp_path / "c.pt"  # a kronc checkpoint may be replaced by a new run
    recover(copy_of(student), teacher, tokens(), checkpoint_path=str(ours), **RECIPE)
    recover(copy_of(student), teacher, tokens(), checkpoint_path=str(ours), **RECIPE)
    assert ours.is_file()


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.slow
def test_17_08_checkpoints_are_checked_like_saves(tmp_path: Path) -> None:
    from kronc.recover import RecoveryError, recover
    from kronc.recover import checkpoint as ckpt

    teacher, student = lstm_pair()
    path = tmp_path / "c.pt"
    recover(copy_of(student), teacher, tokens(), checkpoint_path=str(path), **RECIPE)
    good = path.read_bytes()

    def resume() -> None:
        recover(copy_of(student), teacher, tokens(), checkpoint_path=str(path), resume=True, **RECIPE)

    resume()  # an intact checkpoint resumes
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF  # inside the stored snapshot
    path.write_bytes(bytes(flipped))
    with pytest.raises(RecoveryError, match="corrupted: its SHA-256 does not match"):
        resume()

    def tampered(change: str, value: object = None) -> None:
        path.write_bytes(good)
        data = ckpt._read(path)
        if value is None:
            del data[change]
        else:
            data[change] = value
        ckpt._write(data, path)

    for field, value, message in [
        ("optimizer", None, "the field 'optimizer' is missing"),
        ("step", 10**6, "step is 1000000"),
        ("step", -5, "step is -5"),
        ("rng", {"torch": torch.zeros(3, dtype=torch.uint8), "python": (3, (1, 2), None),
                 "numpy": ("MT19937", torch.zeros(2, dtype=torch.int64), 0, 0, 0.0)}, "RNG state is invalid"),
        ("optimizer", {"state": {}}, "optimizer lacks its state or param_groups"),
        ("seconds", float("nan"), "seconds is nan"),
    ]:
        tampered(field, value)
        with pytest.raises(RecoveryError, match=message):
            resume()
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- policies (cases 6, 19)


@pytest.mark.parametrize("pattern", ["re:(.*.*)*X", "re:(a|ab)*c", "re:(x+)+y", "re:.*.*.*.*.*X", "re:(.*){30}X"])
def test_17_06_catastrophic_regexes_are_refused_up_front(pattern: str) -> None:
    import time

    from kronc.policies import PolicyError, load_policy

    start = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        load_policy({"budget": "4x", "rules": [{"match": pattern, "formats": [{"kind": "dense"}]}]})
    assert time.perf_counter() - start < 5
    assert pattern in str(info.value) and "exponential time" in str(info.value)
    assert "\n" not in str(info.value)


def test_17_06_slow_matching_stops_with_the_pattern_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import kronc.policies.patterns as patterns
    from kronc.capture import capture
    from kronc.policies import PolicyError, load_policy, resolve

    for ok in ["re:.*\\.layers\\.\\d+\\.mlp\\..*", "re:model\\.layers\\.([0-9]|1[01])\\.(q|k|v)_proj", "re:x{1,3}"]:
        patterns.check_pattern(ok)  # ordinary regexes still pass
    policy = load_policy({"budget": "4x", "rules": [{"match": "re:.*fc.*", "formats": [{"kind": "dense"}]}]})
    sites = capture(FunctionalMLP()).sites
    monkeypatch.setattr(patterns, "SLOW_MATCH_SECONDS", -1.0)  # every match counts as too slow
    with pytest.raises(PolicyError, match=r"pattern 're:\.\*fc\.\*' took over"):
        resolve(policy, sites, warn=False)


def test_17_19_policy_size_and_rule_count_are_capped(tmp_path: Path) -> None:
    from kronc.policies import PolicyError, load_policy
    from kronc.policies.loader import MAX_POLICY_BYTES, MAX_POLICY_VALUES
    from kronc.policies.model import MAX_RULES

    big = tmp_path / "big.yaml"
    big.write_text("budget: 4x\ndescription: '" + "x" * MAX_POLICY_BYTES + "'\n")
    with pytest.raises(PolicyError, match=r"big.yaml: the file is [\d,]+ bytes; policy files are limited"):
        load_policy(big)
    rules = [{"match": f"layer{i}", "formats": [{"kind": "dense"}]} for i in range(MAX_RULES + 1)]
    with pytest.raises(PolicyError, match=rf"rules: .*{MAX_RULES + 1:,} rules; a policy may have at most"):
        load_policy({"budget": "4x", "rules": rules})
    bomb = tmp_path / "bomb.yaml"  # a few hundred bytes of aliases expanding to 10^8 values
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 8)]
    bomb.write_text("\n".join(lines) + "\nbudget: 4x\n")
    with pytest.raises(PolicyError, match=rf"more than {MAX_POLICY_VALUES:,} values"):
        load_policy(bomb)
    assert load_policy({"budget": "4x", "rules": rules[:10]}).rules[9].match == "layer9"


# --------------------------------------------------------------------------- weights and inputs (cases 12, 13, 14)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("objective", ["weight", "data"])
def test_17_12_non_finite_weights_name_the_site(value: float, objective: str) -> None:
    torch.manual_seed(0)
    model = LSTMLanguageModel()
    with torch.no_grad():
        model.decoder.weight[3, 5] = value
    calibration = [torch.randint(0, 64, (2, 8))] if objective == "data" else None
    with pytest.raises(kronc.InputError, match=r"^site decoder.weight has 1 NaN or Inf value\(s\) in its 64x64 weight"):
        kronc.compile(model, "4x", calibration=calibration)


def bad_inputs() -> list[tuple[str, dict[str, object], str]]:
    ids = torch.randint(0, 64, (2, 8))
    return [
        ("float ids", {"calibration": [ids.float()]}, r"calibration\[0\] holds float32 values, but the model takes integer"),
        ("out of vocabulary", {"calibration": [ids, ids + 64]}, r"calibration\[1\] has the token id \d+, outside .* 64"),
        ("3-D ids", {"calibration": [ids[None]]}, r"calibration\[0\] is a 3-D tensor of token ids"),
        ("a string", {"calibration": ["some text"]}, r"calibration\[0\] is a string: tokenize"),
        ("None", {"calibration": [None]}, r"calibration\[0\] is None"),
        ("wrong key", {"calibration": [{"input_idz": ids}]}, r"calibration\[0\] has the key 'input_idz'"),
        ("zero length", {"calibration": [ids[:, :0]]}, r"calibration\[0\] is empty"),
        ("calibration a string", {"calibration": "text"}, r"calibration must be a list of batches"),
        ("float example", {"example_inputs": ids.float()}, r"example_inputs holds float32 values"),
        ("policy=123", {"policy": 123}, r"policy must be a Policy.*got int"),
    ]


@pytest.mark.parametrize(("label", "kwargs", "message"), bad_inputs(), ids=[c[0] for c in bad_inputs()])
def test_17_13_bad_calibration_and_example_inputs_are_one_line(label: str, kwargs: dict[str, object],
                                                                message: str) -> None:
    torch.manual_seed(0)
    model = LSTMLanguageModel()
    budget = None if "policy" in kwargs else "4x"
    with pytest.raises(kronc.InputError, match=message) as info:
        kronc.compile(model, budget, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_17_13_meta_device_model_is_refused() -> None:
    with torch.device("meta"):
        model = LSTMLanguageModel()
    with pytest.raises(kronc.InputError, match=r"model has parameters on the meta device \(e.g. embedding.weight\)"):
        kronc.compile(model, "4x")


@pytest.mark.slow
def test_17_13_a_2d_tensor_of_ids_is_that_many_batches_in_compile_and_recover() -> None:
    from kronc.planning.calibrate import collect_input_moments
    from kronc.recover import recover

    torch.manual_seed(0)
    model = LSTMLanguageModel().eval()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    small = kronc.compile(model, "4x", calibration=ids)  # was: row by row into a crash inside the model
    assert small.kronc_policy["objective"] == "data"
    captured = kronc.capture(model)
    rows = collect_input_moments(model, captured.sites, [ids[i:i + 1] for i in range(3)], progress=False)
    whole = kronc.api.input_moments(captured, kronc.load_policy(small.kronc_policy), ids)
    assert whole is not None and rows.keys() == whole.keys()
    assert all(torch.allclose(rows[k], whole[k]) for k in rows)

    teacher = LSTMLanguageModel().eval()
    student = kronc.compile(teacher, "4x")
    result = recover(student, teacher, torch.randint(0, 64, (3, 17)), steps=5, progress=False)
    assert result.steps == 5 and result.tokens == 5 * 17  # one-row batches of 17 ids, cycled (was: refused)


@pytest.mark.parametrize("calibration", [[], [torch.full((4, 32), math.nan)], [torch.randn(4, 32), torch.full((4, 32), math.inf)]])
def test_17_14_empty_or_non_finite_calibration_is_refused(calibration: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    with pytest.raises(kronc.InputError, match=r"calibration(\[\d\])? (is empty|holds NaN or Inf)"):
        kronc.compile(FunctionalMLP(), "4x", calibration=calibration)


def test_17_14_non_finite_activations_are_refused() -> None:
    torch.manual_seed(0)
    model = LSTMLanguageModel()
    with torch.no_grad():
        model.embedding.weight[7] = math.inf  # out of scope, so not checked: the LSTM's inputs overflow
    ids = torch.full((2, 8), 7)
    with pytest.raises(kronc.InputError, match=r"calibration gave NaN or Inf inputs at site lstm.weight_ih_l0"):
        kronc.compile(model, "4x", calibration=[ids])


# --------------------------------------------------------------------------- benchmark caches (case 21)


def test_17_21_benchmark_caches_are_per_user_and_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("KRONC_CACHE", str(tmp_path / "cache"))
    objectives = pytest.importorskip("benchmarks.objectives")
    lstm_word_lm = pytest.importorskip("benchmarks.lstm_word_lm")
    import tempfile

    assert not str(objectives.moments_cache()).startswith(tempfile.gettempdir() + "/kronc")
    assert objectives.moments_cache().is_relative_to(tmp_path / "cache")

    loads: list[dict[str, object]] = []
    real_load = torch.load

    def recording_load(*args: object, **kwargs: object) -> object:
        loads.append(kwargs)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", recording_load)
    from kronc.planning.calibrate import InputMoments

    made = InputMoments({"a": torch.eye(3, dtype=torch.float64)})
    made.folds = {"a": (torch.eye(3), 2 * torch.eye(3))}
    calls: list[int] = []
    path = objectives.moments_cache()
    first = objectives.cached_moments(path, lambda: calls.append(1) or made)
    again = objectives.cached_moments(path, lambda: calls.append(1) or made)
    assert calls == [1] and torch.equal(again["a"], first["a"]) and torch.equal(again.folds["a"][1], 2 * torch.eye(3))
    assert loads and all(k.get("weights_only") is True for k in loads)

    loads.clear()
    v = lstm_word_lm
    cached = Path(tmp_path / "cache" / "kjv-word-lstm" / f"v{v.VOCAB}-e{v.EMBED}-h{v.HIDDEN}-l{v.LAYERS}-s3.pt")
    cached.parent.mkdir(parents=True)
    torch.save(LSTMLanguageModel(v.VOCAB, v.EMBED, v.HIDDEN, v.LAYERS).state_dict(), cached)
    assert isinstance(v.load_or_train(torch.zeros(10, dtype=torch.long), 3), LSTMLanguageModel)
    assert loads and all(k.get("weights_only") is True for k in loads)


# --------------------------------------------------------------------------- command-line exit codes (phase 2)


def test_17_23_input_errors_exit_2_with_one_line() -> None:
    from kronc.tools.cli import EXIT_INPUT
    from kronc.tools.cli.errors import classify

    code, text, hint = classify(kronc.InputError("calibration[3] has the token id 99, outside the vocabulary"))
    assert code == EXIT_INPUT == 2
    assert "\n" not in text and "calibration[3]" in text and hint


def exits(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of ``kronc ARGV`` run in-process (argparse errors raise SystemExit)."""
    from kronc.tools.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one ``kronc: error:`` line of stderr (there must be exactly one)."""
    lines = [line for line in err.splitlines() if line.startswith("kronc")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flag", ["--calibration-length", "--calibration-windows"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_17_17_calibration_sizes_below_one_are_usage_errors(flag: str, value: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 50)
    code, err = exits(["compress", "toy:gpt2", "--budget", "2x", "--out", str(tmp_path / "out"),
                       "--calibration", str(text), flag, value], capsys)
    assert code == 2
    line = error_line(err)
    assert flag in line and "at least 1" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["os:system", "json:dumps", "torch.nn:Linear", "builtins:exit"])
def test_17_16_bad_factories_exit_2(spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = exits(["compress", spec, "--budget", "2x", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert spec in error_line(err)
    assert not (tmp_path / "out").exists()


def fifo_with(tmp_path: Path, text: str) -> Path:
    """A named pipe that a daemon thread fills with ``text`` once a reader opens it."""
    import os
    import threading

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "w", encoding="utf-8") as f:
            f.write(text)

    threading.Thread(target=feed, daemon=True).start()
    return fifo


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs named pipes")
def test_17_20_named_pipes_are_read_like_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kronc.tools.cli.inputs import read_text

    assert read_text(fifo_with(tmp_path, "line one\nline two\n")) == "line one\nline two\n"
    (tmp_path / "pipe.txt").unlink()
    # on the command line: the pipe's few tokens are read (and counted), not reported missing
    fifo = fifo_with(tmp_path, "too short")
    code, err = exits(["compress", "toy:gpt2", "--budget", "2x", "--out", str(tmp_path / "out"),
                       "--calibration", str(fifo)], capsys)
    assert code == 2
    line = error_line(err)
    assert "tokens, fewer than one window" in line and "does not exist" not in line


def test_17_15_a_scope_that_matches_nothing_is_a_policy_error(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "narrow.json"
    policy.write_text(json.dumps({"budget": "2x", "scope": {"include": ["no_such_layer.*"]}}))
    code, err = exits(["plan", "toy:mlp", "--policy", str(policy)], capsys)
    assert code == 2
    line = error_line(err)
    assert "scope.include" in line and "none of the" in line
    assert "scope.include" in err.split(line, 1)[1]  # the hint says what to widen
    with pytest.raises(kronc.PolicyError, match="scope.include"):
        kronc.plan(FunctionalMLP(), {"budget": "2x", "scope": {"include": ["no_such_layer.*"]}})


@pytest.mark.parametrize(("body", "expected"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not an object"),
    ('{"perplexity": "high"}', "perplexity is 'high'"),
    ('{"latency_s": true}', "latency_s is True"),
])
def test_17_18_bad_eval_json_is_one_line(body: str, expected: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    save(small_mlp(), tmp_path / "m")
    (tmp_path / "m" / "eval.json").write_text(body)
    code, err = exits(["report", str(tmp_path / "m")], capsys)
    assert code == 2
    line = error_line(err)
    assert expected in line and "eval.json" in line
    assert not (tmp_path / "m" / "report.png").exists()


def test_17_18_bad_results_json_and_out_suffix_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"kind": "kronc-results", "model": "m",
                                   "runs": [{"label": "2x", "measured": {"perplexity": "high"}}]}))
    code, err = exits(["report", str(results), "--out", str(tmp_path / "r.png")], capsys)
    assert code == 2 and "runs[0].measured: perplexity is 'high'" in error_line(err)
    results.write_text(json.dumps({"kind": "kronc-results", "model": "m", "runs": "2x"}))
    code, err = exits(["report", str(results), "--out", str(tmp_path / "r.png")], capsys)
    assert code == 2 and "runs is a JSON str" in error_line(err)
    save(small_mlp(), tmp_path / "m")
    code, err = exits(["report", str(tmp_path / "m"), "--out", str(tmp_path / "m" / "kronc.json")], capsys)
    assert code == 2 and "image suffix" in error_line(err)
    assert json.loads((tmp_path / "m" / "kronc.json").read_text())  # the manifest was not drawn over


@pytest.mark.slow
def test_17_04_eval_json_and_report_png_are_not_written_through_links(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "m"
    save(small_mlp(), folder)
    (folder / "eval.json").symlink_to(victim)
    code, err = exits(["eval", str(folder), "--model", "toy:mlp", "--latency-runs", "1"], capsys)
    assert code == 2 and "symbolic link" in error_line(err)
    (folder / "eval.json").unlink()
    (folder / "report.png").symlink_to(victim)
    code, err = exits(["report", str(folder)], capsys)
    assert code == 2 and "symbolic link" in error_line(err)
    assert victim.read_text() == "precious" and (folder / "report.png").is_symlink()
    (folder / "report.png").unlink()
    assert exits(["report", str(folder)], capsys)[0] == 0  # a plain target is written (atomically)
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG" and leftovers(folder) == []


def test_17_07_unwritable_out_fails_before_compressing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("kronc.compile ran although --out cannot be written")

    monkeypatch.setattr(kronc, "compile", never)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    code, err = exits(["compress", "toy:mlp", "--budget", "2x", "--out", str(a_file / "deeper" / "out")], capsys)
    assert code == 2 and "--out" in error_line(err) and "not a folder" in error_line(err)
    import os

    if os.geteuid() != 0:  # root writes anywhere: the read-only folder only stops other users
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            code, err = exits(["compress", "toy:mlp", "--budget", "2x", "--out", str(locked / "out")], capsys)
        finally:
            locked.chmod(0o700)
        assert code == 2 and "cannot create folders" in error_line(err)
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_17_07_demo_keeps_finished_runs_when_a_later_budget_fails(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    out = tmp_path / "demo"
    code, err = exits(["demo", "--model", "toy:llama", "--budgets", "2x,1000x", "--text", str(text), "--window", "32",
                       "--windows", "1", "--latency-runs", "1", "--out", str(out), "-q"], capsys)
    assert code == 2 and "1000x" in error_line(err)
    kept = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in kept["runs"]] == ["2x"] and kept["dense"]["perplexity"] > 0
    code, err = exits(["demo", "--model", "toy:llama", "--budgets", "2x,huge", "--out", str(tmp_path / "d2")], capsys)
    assert code == 2 and "huge" in error_line(err) and not (tmp_path / "d2").exists()  # parsed before any work


def test_17_phase1_cases_exit_2_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The library-side cases (budgets 11, policies 6 and 19, manifests 9) as the README's exit code 2."""
    from kronc.policies.loader import MAX_POLICY_BYTES

    assert exits(["plan", "toy:mlp", "--budget", "0x"], capsys)[0] == 2  # 11
    regex = tmp_path / "regex.json"
    regex.write_text(json.dumps({"budget": "4x", "rules": [{"match": "re:(x+)+y", "formats": [{"kind": "dense"}]}]}))
    code, err = exits(["plan", "toy:mlp", "--policy", str(regex)], capsys)  # 6
    assert code == 2 and "exponential time" in error_line(err)
    big = tmp_path / "big.yaml"
    big.write_text("budget: 4x\ndescription: '" + "x" * MAX_POLICY_BYTES + "'\n")
    code, err = exits(["plan", "toy:mlp", "--policy", str(big)], capsys)  # 19
    assert code == 2 and "policy files are limited" in error_line(err)
    save(small_mlp(), tmp_path / "m")
    data = json.loads((tmp_path / "m" / MANIFEST).read_text())
    del data["weights"]["sha256"]
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(data))
    code, err = exits(["eval", str(tmp_path / "m"), "--model", "toy:mlp", "--no-record"], capsys)  # 9
    assert code == 2 and "checksum" in error_line(err)
