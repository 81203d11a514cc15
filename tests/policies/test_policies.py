"""Policies: shipped files validate, bad files fail with clear messages, round trips, precedence, scope."""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml

from kronc.policies import (
    ALL_FORMATS,
    DenseChoice,
    DopedChoice,
    KroneckerChoice,
    LowRankChoice,
    Policy,
    PolicyError,
    PolicyWarning,
    Rule,
    Scope,
    describe_choice,
    dump_policy,
    dumps_policy,
    explain,
    in_scope,
    list_policies,
    load_policy,
    pattern_matches,
    policy_data,
    resolve,
)
from kronc.policies import schema as policy_schema
from kronc.policies.loader import SHIPPED_DIR, read_policy_file
from kronc.policies.model import ScopeKind
from kronc.sites import Site, SiteKind

SHIPPED = sorted(p for p in SHIPPED_DIR.iterdir() if p.suffix in (".yaml", ".yml", ".toml", ".json")
                 and not p.name.endswith(".schema.json"))


def site(name: str, kind: SiteKind = "linear", shape: tuple[int, int] = (64, 64), tags: tuple[str, ...] = (),
         aliases: tuple[str, ...] = ()) -> Site:
    owner, _, attr = name.rpartition(".")
    return Site(name=name, kind=kind, shape=shape, dtype=torch.float32, owner=owner, attr=attr,
                tags=frozenset(tags), aliases=aliases)


def gpt2_sites() -> list[Site]:
    return [
        site("transformer.wte.weight", "embedding", (50257, 64), ("embedding", "lm_head", "tied"), ("lm_head.weight",)),
        site("transformer.wpe.weight", "embedding", (1024, 64), ("embedding",)),
        site("transformer.h.0.attn.c_attn.weight", "conv1d", (192, 64)),
        site("transformer.h.0.attn.c_proj.weight", "conv1d"),
        site("transformer.h.0.mlp.c_fc.weight", "conv1d", (256, 64)),
        site("transformer.h.0.mlp.c_proj.weight", "conv1d", (64, 256)),
    ]


def llama_sites() -> list[Site]:
    layer = "model.layers.0"
    return [
        site("model.embed_tokens.weight", "embedding", (1000, 64), ("embedding",)),
        *(site(f"{layer}.self_attn.{p}_proj.weight") for p in "qkvo"),
        *(site(f"{layer}.mlp.{p}_proj.weight", shape=s) for p, s in
          [("gate", (128, 64)), ("up", (128, 64)), ("down", (64, 128))]),
        site("lm_head.weight", "linear", (1000, 64), ("lm_head",)),
    ]


def lstm_sites() -> list[Site]:
    return [
        site("encoder.weight", "embedding", (1000, 32), ("embedding",)),
        site("rnn.weight_ih_l0", "lstm", (128, 32), ("lstm_ih",)),
        site("rnn.weight_hh_l0", "lstm", (128, 32), ("lstm_hh",)),
        site("rnn.weight_ih_l1", "lstm", (128, 32), ("lstm_ih",)),
        site("rnn.weight_hh_l1", "lstm", (128, 32), ("lstm_hh",)),
        site("decoder.weight", "linear", (1000, 32), ("lm_head",)),
    ]


def quiet_resolve(policy: Policy, sites: list[Site]):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyWarning)
        return resolve(policy, sites)


# --- shipped policies --------------------------------------------------------------------------


def test_the_three_shipped_policies_exist_and_load_by_name() -> None:
    assert {"edge-25x", "server-4x", "lstm-25x"} <= set(list_policies())
    assert str(load_policy("edge-25x").budget) == "25x"
    assert str(load_policy("server-4x").budget) == "4x"
    lstm = load_policy("lstm-25x.yaml")
    assert str(lstm.budget) == "25x" and "lstm" in lstm.scope.kinds


def test_shipped_policies_are_package_data_and_the_repo_folder_links_to_them() -> None:
    import kronc

    tomllib = pytest.importorskip("tomllib")
    assert SHIPPED_DIR.is_relative_to(Path(kronc.__file__).resolve().parent)  # found from a wheel install too
    root = Path(__file__).resolve().parents[2]  # the repository (this file is tests/policies/)
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["kronc.policies"]
    assert all(any(f.relative_to(SHIPPED_DIR.parent).match(g) for g in globs) for f in SHIPPED)
    assert (root / "policies").resolve() == SHIPPED_DIR


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_policy_validates(path: Path) -> None:
    policy = load_policy(path)
    assert policy.name == path.stem
    assert policy.description
    if path.suffix in (".yaml", ".yml"):
        assert path.read_text().startswith("# yaml-language-server: $schema=policy.schema.json\n")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_follow_the_json_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(policy_schema.policy_json_schema())
    assert list(validator.iter_errors(read_policy_file(path))) == []


def test_shipped_policies_prefer_what_they_say() -> None:
    edge = load_policy("edge-25x")
    for rule in edge.rules:
        assert isinstance(rule.formats[0], DopedChoice) and rule.formats[0].base == "kronecker"
    server = load_policy("server-4x")
    kinds = {f.kind for r in server.rules for f in r.formats} | {f.kind for f in server.default_formats}
    assert kinds == {"lowrank", "blocksparse", "dense"}


def test_shipped_policies_fit_their_models_without_warnings() -> None:
    edge = quiet_resolve(load_policy("edge-25x"), gpt2_sites())
    assert edge["transformer.h.0.attn.c_attn.weight"].rule == "attention"
    assert edge["transformer.h.0.mlp.c_proj.weight"].rule == "mlp"
    assert not edge["transformer.wte.weight"].in_scope and not edge["transformer.wpe.weight"].in_scope
    server = quiet_resolve(load_policy("server-4x"), llama_sites())
    assert server["model.layers.0.self_attn.q_proj.weight"].rule == "attention"
    assert server["model.layers.0.mlp.down_proj.weight"].rule == "mlp"
    assert not server["lm_head.weight"].in_scope
    lstm = quiet_resolve(load_policy("lstm-25x"), lstm_sites())
    assert [r.rule for r in lstm.in_scope] == ["input", "recurrent", "input", "recurrent"]
    assert not lstm["decoder.weight"].in_scope and not lstm["encoder.weight"].in_scope


# --- bad files ---------------------------------------------------------------------------------

GOOD_RULE = "  - match: '*.mlp.*'\n    formats: [{kind: lowrank}]\n"
BAD_FILES = {
    "unknown key": ("budget: 25x\nscoop: {}\n", ["scoop: unknown key 'scoop'", "did you mean 'scope'?", "allowed: budget, "]),
    "unknown nested key": (
        "budget: 25x\nrules:\n  - match: x\n    formats: [{kind: lowrank, rank_mx: 4}]\n",
        ["rules[0].formats[0].rank_mx: unknown key 'rank_mx'", "did you mean 'rank_max'?"],
    ),
    "density 1.5": (
        "budget: 25x\nrules:\n" + GOOD_RULE * 2 + "  - match: x\n    formats:\n      - kind: doped\n        density_max: 1.5\n",
        ["rules[2].formats[0].density_max: must be in (0, 1], got 1.5"],
    ),
    "bad format kind": (
        "budget: 25x\nrules:\n  - match: x\n    formats: [{kind: kron}]\n",
        ["rules[0].formats[0].kind: unknown kind 'kron'", "allowed: dense, lowrank, kronecker, doped, blocksparse"],
    ),
    "missing format kind": (
        "budget: 25x\ndefault_formats: [{rank_min: 4}]\n",
        ["default_formats[0].kind: required key is missing (allowed: dense, lowrank"],
    ),
    "bad site kind": (
        "budget: 25x\nscope:\n  kinds: [linear, lstmm]\n",
        ["scope.kinds[1]: 'lstmm' is not allowed", "allowed: linear, conv1d, functional, lstm"],
    ),
    "bad budget": ("budget: 25y\n", ["budget: cannot read budget '25y'"]),
    "numeric budget": ("budget: 25\n", ["budget: write the budget as a string, e.g. '25x'"]),
    "missing budget": ("rules: []\n", ["budget: required key is missing"]),
    "wrong type int": (
        "budget: 4x\nrules:\n  - match: x\n    formats: [{kind: lowrank, rank_min: abc}]\n",
        ["rules[0].formats[0].rank_min: expected an integer, got 'abc'"],
    ),
    "wrong type list": ("budget: 4x\nrules: {}\n", ["rules: expected a list, got {} (a mapping)"]),
    "wrong union": (
        "budget: 4x\ndefault_formats: [{kind: kronecker, a_shapes: some}]\n",
        ["default_formats[0].a_shapes: expected 'auto' or a list, got 'some'"],
    ),
    "bad regex": ("budget: 4x\nscope:\n  exclude: ['re:(']\n", ["scope.exclude[0]: pattern 're:(' is not a valid regular"]),
    "bad rule regex": (
        "budget: 4x\nrules:\n  - match: [a, 're:[']\n    formats: [{kind: dense}]\n",
        ["rules[0].match: pattern 're:[' is not a valid regular expression"],
    ),
    "inverted range": (
        "budget: 4x\nrules:\n  - match: a\n    formats: [{kind: lowrank, rank_min: 16, rank_max: 8}]\n",
        ["rules[0].formats[0]: rank_max (8) must be >= rank_min (16)"],
    ),
    "duplicate rule name": (
        "budget: 4x\nrules:\n  - {match: a, name: x, formats: [{kind: dense}]}\n  - {match: b, name: x, formats: [{kind: dense}]}\n",
        ["rules[1].name: duplicate rule name 'x' (also rules[0])"],
    ),
    "bad rule bits": (
        "budget: 4x\nrules:\n  - {match: a, bits: [4, 5], formats: [{kind: dense}]}\n",
        ["rules[0].bits[1]", "2, 3, 4, 8, 16, 32"],
    ),
    "bad rule group size": (
        "budget: 4x\nrules:\n  - {match: a, group_sizes: [48], formats: [{kind: dense}]}\n",
        ["rules[0].group_sizes[0]", "16, 32, 64, 128", "row"],
    ),
    "rule limits leave nothing": (
        "budget: 4x\nrules:\n  - {match: a, name: k, bits: [2], group_sizes: [128], formats: [{kind: dense}]}\n",
        ["rules[0]", "rule 'k': bits [2] and group_sizes [128] leave none of the formats (dense) a precision",
         "allowed bits: [2, 3, 4, 8, 16, 32]"],
    ),
    "empty file": ("", ["the policy is empty"]),
    "not a mapping": ("- budget: 4x\n", ["expected a mapping of policy keys at the top level, got list"]),
    "yaml syntax": ("budget: 25x\nrules:\n  - match: [a, b\n    formats: []\n", ["bad.yaml:4:12: YAML syntax error: expected ',' or ']'"]),
    "yaml alias": ("budget: 25x\nrules:\n  - match: *.mlp.*\n", ["bad.yaml:3:13: YAML syntax error", "quote patterns"]),
    "yaml duplicate key": ("budget: 25x\nbudget: 4x\n", ["bad.yaml:2:1: YAML syntax error: duplicate key 'budget'"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_fail_with_one_clear_line(case: str, tmp_path: Path) -> None:
    text, expected = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert len(info.value.problems) == 1, message
    assert message.startswith(f"{path}:"), message
    for part in expected:
        assert part in message, message
    assert "\n" not in message and "pydantic" not in message and "Traceback" not in message
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text("budget: 25y\nfoo: 1\nscope: {kinds: [x]}\nrules:\n  - match: a\n    formats: [{kind: doped, density_max: 1.5}]\n")
    with pytest.raises(PolicyError) as info:
        load_policy(str(path))
    lines = str(info.value).splitlines()
    assert len(lines) == 4 and all(line.startswith(f"{path}: ") for line in lines)
    assert {p.path for p in info.value.problems} == {"budget", "foo", "scope.kinds[0]", "rules[0].formats[0].density_max"}


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("bad.toml", 'budget = "25x"\nrules = [\n', "bad.toml:3:1: TOML syntax error: Invalid value (at end of file)"),
    ("bad.toml", 'budget = "25x"\nobjective = data\n', "bad.toml:2:13: TOML syntax error: Invalid value"),
    ("bad.json", '{"budget": "25x",\n "rules": [}\n', "bad.json:2:12: JSON syntax error"),
    ("dup.json", '{"budget": "25x", "budget": "4x"}', "dup.json: JSON error: duplicate key 'budget'"),
    ("bad.toml", 'budget = "25x"\n[[rules]]\nmatch = "x"\n[[rules.formats]]\nkind = "doped"\ndensity_max = 1.5\n',
     "bad.toml: rules[0].formats[0].density_max: must be in (0, 1]"),
    ("bad.json", '{"budget": "25x", "solver": {"sensitivity": "greedy"}}', "bad.json: solver.sensitivity: 'greedy' is not allowed"),
    ("bad.txt", "budget: 25x", "bad.txt: unsupported file type '.txt'"),
])
def test_toml_and_json_errors(name: str, text: str, expected: str, tmp_path: Path) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(PolicyError, match=None) as info:
        load_policy(tmp_path / name)
    assert expected in str(info.value)


def test_missing_files_and_unknown_names() -> None:
    with pytest.raises(PolicyError, match="no-such-dir/p.yaml: file not found"):
        load_policy("no-such-dir/p.yaml")
    with pytest.raises(PolicyError, match="edge-25 is not a policy|no such policy") as info:
        load_policy("edge-25")
    assert "edge-25x" in str(info.value)  # the available names are listed


def test_dict_sources_are_validated_too() -> None:
    with pytest.raises(PolicyError, match=r"^<dict>: solver.sensitivity_batches: must be >= 1, got 0$"):
        load_policy({"budget": "4x", "solver": {"sensitivity_batches": 0}})


# --- loading by name, round trips ----------------------------------------------------------------


def test_kronc_policy_path_is_searched_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "edge-25x.toml").write_text('budget = "10x"\nname = "mine"\n')
    monkeypatch.setenv("KRONC_POLICY_PATH", str(tmp_path))
    assert load_policy("edge-25x").name == "mine"
    assert list_policies()["server-4x"].parent == SHIPPED_DIR


def full_python_policy() -> Policy:
    return Policy(
        name="every-feature",
        description="unicode ✓, quotes \" and ' and a backslash \\",
        budget="3M params",
        scope=Scope(kinds=["linear", "lstm"], include_embeddings=True, include=["re:.*\\.layers\\.\\d+\\..*"],
                    exclude=["*.k_proj"]),
        rules=[
            Rule(name="keep", match="model.layers.0.self_attn.q_proj", formats=[DenseChoice()]),
            Rule(match=["*.mlp.*", "re:.*up_proj"], formats=[
                KroneckerChoice(a_shapes=[(2, 4), (4, 8)], terms_max=3),
                DopedChoice(base="lowrank", density_min=1e-5, density_max=0.5, densities=3),
                LowRankChoice(rank_max=None, rank_min=4),
            ]),
        ],
        default_formats=[DenseChoice()],
        objective="data",
        solver={"sensitivity": "none", "sensitivity_batches": 3},
    )


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_file_round_trip_is_lossless(path: Path, fmt: str, tmp_path: Path) -> None:
    policy = load_policy(path)
    assert policy_data(policy) == read_policy_file(path)  # exactly the keys the file wrote
    out = dump_policy(policy, tmp_path / f"out.{fmt}")
    again = load_policy(out)
    assert again == policy and policy_data(again) == policy_data(policy)


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
@pytest.mark.parametrize("full", [False, True])
def test_python_policy_round_trip_is_lossless(fmt: str, full: bool, tmp_path: Path) -> None:
    policy = full_python_policy()
    out = dump_policy(policy, tmp_path / f"p.{fmt}", full=full)
    again = load_policy(out)
    assert again == policy
    assert dumps_policy(again, fmt, full=full) == out.read_text()  # text is stable too
    if fmt == "json" and not full:
        assert json.loads(out.read_text())["rules"][1]["formats"][0] == {"kind": "kronecker", "a_shapes": [[2, 4], [4, 8]],
                                                                          "terms_max": 3}


def test_minimal_dump_keeps_kind_and_skips_unset_defaults() -> None:
    data = policy_data(Policy(budget="4x", rules=[Rule(match="x", formats=[LowRankChoice()])]))
    assert data == {"budget": "4x", "rules": [{"match": "x", "formats": [{"kind": "lowrank"}]}]}
    full = policy_data(Policy(budget="4x"), full=True)
    assert full["default_formats"] == [policy_data(f, full=True) for f in ALL_FORMATS]  # type: ignore[arg-type]
    assert load_policy(full) == Policy(budget="4x")


# --- patterns and precedence ---------------------------------------------------------------------


Q = site("model.layers.0.self_attn.q_proj.weight")


@pytest.mark.parametrize(("pattern", "hit"), [
    ("model.layers.0.self_attn.q_proj.weight", True),
    ("model.layers.0.self_attn.q_proj", True),  # module name form
    ("model.layers.0.self_attn.q_proj.bias", False),
    ("q_proj", False),  # exact names are whole names
    ("*q_proj", True),
    ("*.layers.?.self_attn.*", True),  # '*' crosses dots
    ("model.layers.[0-3].self_attn.[qk]_proj", True),
    ("model.layers.[1-3].*", False),
    ("*.Q_PROJ", False),  # case-sensitive
    (r"re:model\.layers\.\d+\.self_attn\.(q|k)_proj", True),
    ("re:q_proj", False),  # fullmatch, not search
    ("re:.*q_proj", True),
])
def test_pattern_syntax(pattern: str, hit: bool) -> None:
    assert pattern_matches(pattern, Q) is hit


def test_tied_aliases_match() -> None:
    wte = gpt2_sites()[0]
    assert pattern_matches("lm_head", wte) and pattern_matches("lm_head.weight", wte)
    assert pattern_matches("transformer.wte", wte)


def rules_policy(*rules: tuple[str | list[str], str]) -> Policy:
    return Policy(budget="10x", rules=[Rule(match=m, name=n, formats=[LowRankChoice()]) for m, n in rules])


def test_first_match_wins_whatever_the_pattern_syntax() -> None:
    sites = [Q, site("model.layers.0.self_attn.k_proj.weight"), site("model.layers.0.mlp.up_proj.weight")]
    # A glob written first beats a later exact name.
    res = resolve(rules_policy(("*.self_attn.*", "glob"), ("model.layers.0.self_attn.q_proj", "exact")), sites, warn=False)
    assert res[Q.name].rule == "glob" and res.unmatched_rules == (1,)
    # The exact name written first wins for its site; the glob takes the rest.
    res = quiet_resolve(rules_policy(("model.layers.0.self_attn.q_proj.weight", "exact"), ("*.self_attn.*", "glob")), sites)
    assert [r.rule for r in res.sites] == ["exact", "glob", "default_formats"]
    # A regex first beats both.
    res = resolve(rules_policy(("re:.*_proj", "regex"), ("*.self_attn.*", "glob"), (Q.module_name, "exact")), sites, warn=False)
    assert [r.rule for r in res.sites] == ["regex"] * 3 and res.unmatched_rules == (1, 2)
    assert res[Q.name].rule_index == 0


def test_any_pattern_of_a_rule_matches_and_unnamed_rules_get_an_index_label() -> None:
    sites = [Q, site("model.layers.0.mlp.up_proj.weight"), site("x.weight")]
    policy = Policy(budget="10x", rules=[Rule(match=["nope", "*.mlp.*", Q.module_name], formats=[DenseChoice()])])
    res = quiet_resolve(policy, sites)
    assert [r.rule for r in res.sites] == ["rules[0]", "rules[0]", "default_formats"]
    assert res[Q.name].dense and not res["x.weight"].dense
    assert res["x.weight"].formats == tuple(ALL_FORMATS)


# --- scope -------------------------------------------------------------------------------------


def test_scope_defaults_leave_out_embeddings_and_lm_head() -> None:
    res = resolve(Policy(budget="4x"), gpt2_sites() + llama_sites(), warn=False)
    out = {r.site.name: r.reason for r in res.sites if not r.in_scope}
    assert set(out) == {"transformer.wte.weight", "transformer.wpe.weight", "model.embed_tokens.weight", "lm_head.weight"}
    assert "include_lm_head" in out["lm_head.weight"] and "include_embeddings" in out["transformer.wpe.weight"]
    assert all(r.formats == () and r.dense for r in res.sites if not r.in_scope)


def test_scope_can_bring_embeddings_and_head_in() -> None:
    sites = {s.name: s for s in gpt2_sites() + llama_sites()}
    emb = Scope(include_embeddings=True)
    assert in_scope(emb, sites["transformer.wpe.weight"])[0]
    assert not in_scope(emb, sites["transformer.wte.weight"])[0]  # tied to the head: needs both flags
    assert not in_scope(emb, sites["lm_head.weight"])[0]
    both = Scope(include_embeddings=True, include_lm_head=True)
    assert all(in_scope(both, s)[0] for s in sites.values())
    assert in_scope(Scope(include_lm_head=True), sites["lm_head.weight"])[0]


def test_scope_kinds_include_and_exclude() -> None:
    sites = lstm_sites() + llama_sites()
    only_lstm = resolve(Policy(budget="4x", scope=Scope(kinds=["lstm"])), sites, warn=False)
    assert {r.site.kind for r in only_lstm.in_scope} == {"lstm"}
    scope = Scope(include=["re:.*\\.layers\\..*", "rnn.*"], exclude=["*.o_proj", "*_hh_l1"])
    res = resolve(Policy(budget="4x", scope=scope), sites, warn=False)
    assert [r.site.name for r in res.in_scope] == [
        "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1",
        *(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"),
        *(f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    ]
    assert res["model.layers.0.self_attn.o_proj.weight"].reason == "excluded by scope.exclude '*.o_proj'"


def test_scope_kinds_cover_every_site_kind_but_embedding() -> None:
    assert set(get_args(ScopeKind)) == set(get_args(SiteKind)) - {"embedding"}


# --- warnings ------------------------------------------------------------------------------------


def test_rules_that_apply_to_no_site_warn() -> None:
    policy = Policy(
        budget="4x",
        scope=Scope(exclude=["*.o_proj"], include=["nothing-*", "model.*"]),
        rules=[
            Rule(name="typo", match="*.slef_attn.*", formats=[DenseChoice()]),
            Rule(name="attn", match="*.self_attn.*", formats=[DenseChoice()]),
            Rule(name="shadowed", match="*.q_proj", formats=[DenseChoice()]),
            Rule(name="out", match=["lm_head", "*.o_proj"], formats=[DenseChoice()]),
        ],
    )
    with pytest.warns(PolicyWarning) as record:
        res = resolve(policy, llama_sites())
    messages = [str(w.message) for w in record]
    assert res.unmatched_rules == (0, 2, 3) and messages == list(res.warnings)
    assert messages[0] == "rules[0] ('typo') '*.slef_attn.*': matches no site"
    assert "earlier rules already claim" in messages[1]
    assert "matches only out-of-scope sites (e.g. model.layers.0.self_attn.o_proj.weight)" in messages[2]
    assert len(messages) == 3  # scope.include matches something, scope.exclude too
    with pytest.warns(PolicyWarning, match=r"scope.exclude \['\*.nope'\]: matches no site"):
        resolve(Policy(budget="4x", scope=Scope(exclude=["*.nope"])), llama_sites())


# --- schema ------------------------------------------------------------------------------------


def test_schema_file_is_current() -> None:
    assert policy_schema.is_current(), "policies/policy.schema.json is stale: run `python -m kronc.policies.schema`"
    assert policy_schema.main(["--check"]) == 0


def test_schema_check_fails_when_stale(tmp_path: Path) -> None:
    stale = tmp_path / "policy.schema.json"
    stale.write_text("{}\n")
    assert policy_schema.main(["--check", "--path", str(stale)]) == 1
    assert policy_schema.main(["--path", str(stale)]) == 0 and policy_schema.is_current(stale)


def test_every_key_is_documented_and_kind_is_required() -> None:
    schema = policy_schema.policy_json_schema()
    models = {"Policy": schema, **schema["$defs"]}
    for name, definition in models.items():
        assert definition.get("description"), name
        for key, prop in definition.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{key} has no docstring"
        if "kind" in definition.get("properties", {}):
            assert "kind" in definition["required"], name


def test_schema_rejects_what_the_models_reject() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(policy_schema.policy_json_schema())
    assert validator.is_valid({"budget": "4x", "default_formats": [{"kind": "doped", "density_max": 0.5}]})
    assert not validator.is_valid({"budget": "4x", "default_formats": [{"kind": "doped", "density_max": 1.5}]})
    assert not validator.is_valid({"budget": "4x", "scoop": {}})
    assert not validator.is_valid({"budget": "4x", "default_formats": [{"rank_min": 3}]})


# --- explain -----------------------------------------------------------------------------------


def test_explain_table_on_site_lists() -> None:
    with pytest.warns(PolicyWarning, match="rules\\[1\\] \\('ghost'\\)"):
        ex = explain({"budget": "25x", "rules": [
            {"name": "mlp", "match": "*.mlp.*", "formats": [{"kind": "doped", "density_max": 0.02}, {"kind": "dense"}]},
            {"name": "ghost", "match": "nothing", "formats": [{"kind": "dense"}]},
        ]}, gpt2_sites())
    table = ex.table()
    lines = table.splitlines()
    assert lines[0].split() == ["site", "kind", "shape", "in", "scope", "rule", "formats", "allowed"]
    row = next(line for line in lines if line.startswith("transformer.h.0.mlp.c_fc.weight"))
    assert "conv1d" in row and "256x64" in row and " yes " in row and " mlp " in row
    assert "doped(kronecker auto, terms<=2, density 0.001-0.02); dense" in row
    attn = next(line for line in lines if line.startswith("transformer.h.0.attn.c_attn.weight"))
    assert "default_formats" in attn and "lowrank(rank 1-max, x8)" in attn and "blocksparse(32x32,16x16" in attn
    wte = next(line for line in lines if line.startswith("transformer.wte.weight"))
    assert "no: tied embedding/LM head" in wte
    assert lines[-1] == "warning: rules[1] ('ghost') 'nothing': matches no site"
    assert str(ex) == table


def test_explain_accepts_names_captured_models_and_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    sites = lstm_sites()
    by_name = explain("lstm-25x", types.SimpleNamespace(sites=sites))  # a Captured-like object
    assert [r.rule for r in by_name.resolution.sites][1:3] == ["input", "recurrent"]
    calls = []

    def fake_capture(model: torch.nn.Module, example_inputs: object = None) -> types.SimpleNamespace:
        calls.append(model)
        return types.SimpleNamespace(sites=sites)

    monkeypatch.setattr(sys.modules["kronc.policies.explain"], "capture", fake_capture)
    module = torch.nn.Linear(2, 2)
    assert explain(load_policy("lstm-25x"), module).table() == by_name.table() and calls == [module]


def test_describe_choice() -> None:
    assert describe_choice(KroneckerChoice(a_shapes=[(2, 4)], terms_max=2)) == "kronecker(2x4, terms<=2)"
    assert describe_choice(DopedChoice(base="none")) == "doped(none, density 0.001-0.05)"
    assert describe_choice(LowRankChoice(rank_min=8, rank_max=64)) == "lowrank(rank 8-64, x8)"
    assert describe_choice(DenseChoice()) == "dense"


def test_python_policies_pass_through_and_validate_on_assignment() -> None:
    policy = full_python_policy()
    assert load_policy(policy) is policy
    with pytest.raises(ValueError, match="cannot read budget"):
        policy.budget = "lots"
    assert yaml.safe_load(dumps_policy(policy))["budget"] == "3M params"


def test_rule_bits_and_group_sizes_narrow_every_format() -> None:
    """``bits``/``group_sizes`` on a rule: a dense format without precisions searches the default ones
    within the limits, listed precisions and quantlr bases are narrowed, ``explain`` shows the limits."""
    from kronc.policies.choices import DEFAULT_PRECISIONS
    from kronc.values import Precision

    rule = Rule(match="*", bits=[4, 8], group_sizes=[32, "row"], formats=[{"kind": "dense"}])
    (dense,) = rule.allowed_formats()
    assert dense.precisions == ["keep", Precision(dtype="int8"), *[p for p in DEFAULT_PRECISIONS if p.bits == 4 and p.group_size in (32, None)]]
    listed = Rule(match="*", bits=[3], formats=[
        {"kind": "dense", "precisions": ["keep", {"dtype": "int4", "group_size": 32}, {"dtype": "int3", "group_size": 64}]},
        {"kind": "quantlr", "bases": [{"dtype": "int3", "group_size": 64}, {"dtype": "int2", "group_size": 32}]},
    ])
    narrowed = listed.allowed_formats()
    assert narrowed[0].precisions == ["keep", Precision(dtype="int3", group_size=64)]
    assert narrowed[1].bases == [Precision(dtype="int3", group_size=64)]  # type: ignore[attr-defined]
    assert Rule(match="*", formats=[{"kind": "dense"}]).allowed_formats()[0].precisions == ["keep"]  # no limits: as written
    policy = Policy(budget="4x", rules=[rule])
    text = explain(policy, llama_sites()).table()
    assert "rules[0] (bits 4,8; groups 32,row)" in text and "int4g32-hqq" in text and "int4g64" not in text
    again = Policy.model_validate(policy.model_dump(mode="json"))  # a dump and reload means the same
    assert again.rules[0].allowed_formats() == policy.rules[0].allowed_formats()
    shipped = load_policy("int4-kernels")
    assert shipped.rules[0].bits == [4, 8]
    values = {p.describe() for f in shipped.rules[0].allowed_formats() for p in f.precisions if not isinstance(p, str)}
    assert values == {"int8", "int4g32-hqq", "int4g64-hqq", "int4g128-hqq", "int4g64a-hqq", "int4g128a-hqq"}


@pytest.mark.parametrize("text", ["40MB", "25x", "3M params"])
def test_budget_is_typed_and_round_trips_as_written(text: str, tmp_path: Path) -> None:
    from kronc.budget import Budget
    from kronc.plan import Plan

    policy = Policy(budget=text)
    assert isinstance(policy.budget, Budget) and policy.budget == Budget.parse(text)
    assert policy.model_dump(mode="json")["budget"] == text and policy.model_dump()["budget"] == text
    assert f'"budget": "{text}"' in policy.model_dump_json(indent=1).replace('":"', '": "')
    again = load_policy(tmp_path / "p.yaml") if (tmp_path / "p.yaml").write_text(dumps_policy(policy)) else None
    assert again is not None and str(again.budget) == text and again == policy
    assert Policy.model_validate_json(policy.model_dump_json()).budget.text == text

    plan = Plan(decisions=[], budget=Budget.parse(text))
    for suffix in (".json", ".yaml"):
        plan.save(tmp_path / f"plan{suffix}")
        loaded = Plan.load(tmp_path / f"plan{suffix}")
        assert isinstance(loaded.budget, Budget) and str(loaded.budget) == text and loaded == plan


def test_bad_budget_in_code_names_the_key() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"budget\n.*cannot read budget '25y'"):
        Policy(budget="25y")
    with pytest.raises(ValidationError, match=r"budget\n.*write the budget as a string, e.g. '25x'"):
        Policy(budget=25)  # type: ignore[arg-type]
