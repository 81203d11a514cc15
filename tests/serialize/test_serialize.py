"""Save/load: lossless round trips for every format and small model type; clear errors for bad files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import kronc
from kronc import load
from kronc.capture import Captured, capture
from kronc.formats import BlockSparseSpec, DenseSpec, DopedSpec, FormatSpec, KroneckerSpec, LowRankSpec
from kronc.formats.sparse_index import SparseIndex
from kronc.plan import Decision, Plan
from kronc.serialize import FORMAT_VERSION, MANIFEST, WEIGHTS, KroncFileError, empty_format, save
from kronc.sites import Site
from kronc.tools.toy import TOY_MODELS, FunctionalMLP, LSTMLanguageModel, toy_inputs

SPECS: list[FormatSpec] = [
    LowRankSpec(rank=4),
    KroneckerSpec(a_shape=(4, 4), terms=2),
    DopedSpec(base=KroneckerSpec(a_shape=(4, 4)), density=0.02),
    DopedSpec(density=0.05),  # unstructured pruning: no base, sparse index only
    DopedSpec(base=LowRankSpec(rank=2), density=0.6),  # dense enough for the CSR... or the bitmap encoding
    BlockSparseSpec(block=(4, 4), density=0.3),
    DenseSpec(),
]


def every_format_plan(captured: Captured, only: Callable[[Site], bool] = lambda s: True) -> Plan:
    """One decision per site, cycling through every format (a site the format cannot fit gets low rank)."""
    decisions = []
    for i, site in enumerate(s for s in captured.sites if only(s)):
        spec = SPECS[i % len(SPECS)]
        try:
            spec.check(site.shape)
        except ValueError:
            spec = LowRankSpec(rank=1)
        decisions.append(Decision.of(site, spec))
    return Plan(decisions=decisions, budget="2x")


def logits(out: object) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value]


def seeded(name: str) -> nn.Module:
    torch.manual_seed(0)
    return TOY_MODELS[name]()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hugging_face_round_trip_every_format_is_lossless(name: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = seeded(name)
    x = toy_inputs(name)
    captured = capture(model, x)
    plan = every_format_plan(captured)
    assert {d.spec.kind for d in plan.decisions} >= {"lowrank", "kronecker", "doped", "blocksparse"}
    small = kronc.apply(captured, plan)
    save(small, tmp_path / name)

    loaded = load(tmp_path / name)  # rebuilt from config.json: no model argument
    assert type(loaded) is type(model)
    assert loaded.kronc_plan == plan
    with torch.no_grad():
        assert torch.equal(logits(loaded(x)), logits(small(x)))
    if name != "bert":
        kw = {"max_new_tokens": 4, "do_sample": False}
        assert torch.equal(loaded.generate(x[:1, :4], **kw), small.generate(x[:1, :4], **kw))
    if name == "gpt2":  # the tied embedding / LM head site is compressed and must stay one object
        assert "tied" in captured.site("transformer.wte.weight").tags
        assert loaded.lm_head.weight_format is loaded.transformer.wte.weight_format


@pytest.mark.slow
def test_gpt2_dense_tied_head_stays_tied(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = seeded("gpt2")
    captured = capture(model, toy_inputs("gpt2"))
    plan = every_format_plan(captured, only=lambda s: s.kind == "conv1d")
    save(kronc.apply(captured, plan), tmp_path)
    loaded = load(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    names = json.loads((tmp_path / MANIFEST).read_text())["weights"]["tensors"]
    assert names == len(set(map(id, [*loaded.parameters(), *loaded.buffers()])))  # tied tensors stored once


@pytest.mark.slow
@pytest.mark.parametrize("how", ["factory", "instance", "source"])
def test_lstm_language_model_round_trip(how: str, tmp_path: Path) -> None:
    model = seeded("lstm")
    x = toy_inputs("lstm")
    captured = capture(model)
    small = kronc.apply(captured, every_format_plan(captured))
    save(small, tmp_path, source="toy:lstm" if how == "source" else None)
    arg = {"factory": LSTMLanguageModel, "instance": LSTMLanguageModel(), "source": None}[how]
    loaded = load(tmp_path, arg)
    assert type(loaded) is LSTMLanguageModel
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_graph_module_output_round_trips_with_a_factory(tmp_path: Path) -> None:
    model = seeded("mlp")
    x = toy_inputs("mlp")
    captured = capture(model)
    small = kronc.apply(captured, every_format_plan(captured), output="graph")
    assert isinstance(small, fx.GraphModule)
    save(small, tmp_path)
    loaded = load(tmp_path, model=FunctionalMLP)
    assert isinstance(loaded, fx.GraphModule)
    assert not hasattr(loaded, "w2"), "the dense functional weight must not come back"
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert torch.equal(load(tmp_path, model="toy:mlp")(x), small(x))


@pytest.mark.slow
def test_double_precision_round_trip_keeps_dtype(tmp_path: Path) -> None:
    model = seeded("lstm").double()
    x = toy_inputs("lstm")
    captured = capture(model)
    small = kronc.apply(captured, every_format_plan(captured))
    save(small, tmp_path)
    loaded = load(tmp_path, LSTMLanguageModel)  # built in float32, converted to the saved dtype
    assert next(loaded.parameters()).dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


@pytest.mark.slow
def test_compile_then_save_keeps_plan_and_policy_and_loading_never_fits(tmp_path: Path, monkeypatch) -> None:
    model = seeded("lstm")
    x = toy_inputs("lstm")
    policy = {"budget": "4x", "default_formats": [{"kind": "lowrank"}, {"kind": "kronecker"}]}
    small = kronc.compile(model, policy=policy)
    kronc.save(small, tmp_path, source="toy:lstm")

    def no_svd(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading must not refit (SVD)")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    loaded = kronc.load(tmp_path)
    assert loaded.kronc_plan == small.kronc_plan
    assert loaded.kronc_policy == small.kronc_policy
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_sparse_positions_come_from_the_file_not_the_placeholders(tmp_path: Path) -> None:
    model = seeded("lstm")
    captured = capture(model)
    plan = every_format_plan(captured)
    small = kronc.apply(captured, plan)
    save(small, tmp_path)
    loaded = load(tmp_path, LSTMLanguageModel)
    indices = {n: m for n, m in small.named_modules() if isinstance(m, SparseIndex)}
    assert indices, "the plan must include sparse formats"
    for name, index in indices.items():
        got = loaded.get_submodule(name)
        assert got.encoding == index.encoding and got.nnz == index.nnz
        for a, b in zip(got.decode(), index.decode(), strict=True):
            assert torch.equal(a, b)


def test_empty_formats_have_the_fitted_structure() -> None:
    weight = torch.randn(16, 32)
    for spec in SPECS:
        fitted, empty = kronc.formats.fit(weight, spec), empty_format(spec, (16, 32))
        assert {k: v.shape for k, v in fitted.state_dict().items()} == {k: v.shape for k, v in empty.state_dict().items()}
        assert empty.nbytes() == fitted.nbytes()


# --------------------------------------------------------------------------- errors


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    model = seeded("lstm")
    captured = capture(model)
    return save(kronc.apply(captured, every_format_plan(captured)), tmp_path / "saved", source="toy:lstm")


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def test_loads_clean(saved: Path) -> None:
    assert isinstance(load(saved), LSTMLanguageModel)


def test_wrong_version_is_refused(saved: Path) -> None:
    data = _manifest(saved)
    data["format_version"] = FORMAT_VERSION + 1
    (saved / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(KroncFileError, match=r"format version 2, written by a newer kronc.*reads version 1"):
        load(saved)
    data["format_version"] = "one"
    (saved / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(KroncFileError, match="no valid format_version"):
        load(saved)


def test_truncated_manifest_is_refused(saved: Path) -> None:
    text = (saved / MANIFEST).read_text()
    (saved / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(KroncFileError, match=r"kronc.json is corrupted or truncated"):
        load(saved)


def test_truncated_weights_are_refused(saved: Path) -> None:
    blob = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(blob[: len(blob) - 100])
    with pytest.raises(KroncFileError, match=r"model.safetensors is truncated: \d+ bytes, the manifest says \d+"):
        load(saved)
    data = _manifest(saved)  # without the size and checksum, safetensors itself notices
    del data["weights"]
    (saved / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(KroncFileError, match=r"no SHA-256 checksum"):  # a missing checksum is an error...
        load(saved)
    with pytest.raises(KroncFileError, match=r"model.safetensors is corrupted or truncated"):
        load(saved, verify=False)  # ...unless the check is skipped


def test_corrupted_weights_are_refused(saved: Path) -> None:
    blob = bytearray((saved / WEIGHTS).read_bytes())
    blob[-20] ^= 0xFF  # a flipped byte inside the tensor data: only the checksum can tell
    (saved / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(KroncFileError, match="corrupted: its SHA-256 does not match"):
        load(saved)
    blob[:8] = b"\xff" * 8  # a garbage header length
    (saved / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(KroncFileError, match="corrupted or truncated"):
        load(saved, verify=False)


def test_corrupted_sparse_index_is_refused(saved: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / WEIGHTS))
    key = next(k for k in state if k.endswith(".index.col") or k.endswith(".index.bitmap"))
    t = state[key].clone()
    t[0] = t[0] + 100 if key.endswith("col") else ~t[0]
    state[key] = t
    save_file(state, str(saved / WEIGHTS))
    data = _manifest(saved)
    del data["weights"]  # as if the file had been written this way: no size or checksum to catch it
    (saved / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(KroncFileError, match="sparse index .* is corrupted"):
        load(saved, verify=False)


def test_missing_files_and_wrong_architectures_are_refused(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(KroncFileError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(KroncFileError, match="kronc.json is missing"):
        load(tmp_path)
    with pytest.raises(KroncFileError, match=r"is 64x64 in this LSTMLanguageModel but 64x32 in the saved plan"):
        load(saved, lambda: LSTMLanguageModel(embed=64))
    data = _manifest(saved)
    data["source"] = None
    (saved / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(KroncFileError, match=r"cannot rebuild by itself.*model="):
        load(saved)
    (saved / WEIGHTS).unlink()
    with pytest.raises(KroncFileError, match="model.safetensors is missing"):
        load(saved, LSTMLanguageModel)


def test_saving_an_uncompressed_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="carries no kronc plan"):
        save(LSTMLanguageModel(), tmp_path)
