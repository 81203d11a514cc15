"""Fuzzing policy files (issue 17): whatever a policy file or dict holds, loading it either gives a
`Policy` or raises `PolicyError`, never another exception (and never hangs).

Two generators: a seeded one that mutates the shipped policies (values swapped for hostile ones,
keys dropped or invented, text bytes flipped, deleted, duplicated or truncated, in YAML, TOML and
JSON), and hypothesis strategies over arbitrary JSON-like data and text. Each valid result is also
resolved against a small model's sites, which runs every pattern.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kronc.policies import Policy, PolicyError, load_policy, resolve
from kronc.policies.loader import SHIPPED_DIR, dumps_policy, parse_text, validate_policy
from kronc.sites import Site

SITES = [
    Site(name=f"model.layers.{i}.{part}.weight", kind="linear", shape=(32, 32), dtype=torch.float32, owner=f"model.layers.{i}.{part}",
         attr="weight")
    for i in range(3) for part in ("self_attn.q_proj", "mlp.up_proj")
]
SHIPPED = [load_policy(p) for p in sorted(SHIPPED_DIR.glob("*.yaml"))]
HOSTILE: list[Any] = [
    None, True, 0, -1, 1.5, 10**30, -(10**30), math.nan, math.inf, -math.inf, "", " ", "x" * 5000, "re:(", "re:",
    "re:(.*.*)*X", "re:(a|aa)*b", "*", "[", "0x", "nanx", "1e400x", "0MB", "-5 params", "25x", "kronecker", "dense",
    [], [None], [[[]]], {}, {"kind": "nope"}, {"kind": "lowrank", "rank_min": -3}, {"kind": "doped", "base": "doped"},
    {"kind": "kronecker", "a_shape": [0, 0]}, {"kind": "blocksparse", "block": [[1]]}, "\x00", "é",
]


def check(load: Any) -> Policy | None:
    """Run ``load``: a Policy (then resolved against `SITES`) or a PolicyError; anything else fails."""
    try:
        policy = load()
    except PolicyError as e:
        assert str(e).strip(), "a PolicyError must say what is wrong"
        return None
    assert isinstance(policy, Policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(PolicyError):  # e.g. a regex too slow on a name: still a PolicyError
            resolve(policy, SITES)
    return policy


def leaves(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every value inside ``data`` (dict keys and list indices)."""
    out = [path]
    if isinstance(data, dict):
        for k, v in data.items():
            out += leaves(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += leaves(v, (*path, i))
    return out


def mutate_data(data: dict[str, Any], rng: random.Random) -> Any:
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in leaves(data) if p]
        if not paths:
            return rng.choice(HOSTILE)
        path = rng.choice(paths)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.6:
            parent[path[-1]] = copy.deepcopy(rng.choice(HOSTILE))
        elif action < 0.8:
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "Budget", "rules ", "kind", "match", 7])] = copy.deepcopy(rng.choice(HOSTILE))
        else:
            parent.append(copy.deepcopy(parent[path[-1]]))
    return data


def mutate_text(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        if not chars:
            break
        i = rng.randrange(len(chars))
        action = rng.random()
        if action < 0.3:
            del chars[i]
        elif action < 0.6:
            chars.insert(i, rng.choice(list(":-[]{}\"'#&*!|>%@`\\\n\t ,=.0x") + ["\x00", "é", "!!python/object:os.system"]))
        elif action < 0.8:
            chars[i:i] = chars[i:i + rng.randint(1, 40)]
        else:
            chars = chars[: i]
    return "".join(chars)


@pytest.mark.parametrize("seed", range(4))
def test_mutated_shipped_policies_raise_only_policy_errors(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    results = {"valid": 0, "invalid": 0}
    for n in range(150):
        base = rng.choice(SHIPPED)
        data = json.loads(dumps_policy(base, "json", full=rng.random() < 0.3))
        mutated = mutate_data(data, rng)
        ok = check(lambda m=mutated: validate_policy(m, "<fuzz>"))
        results["valid" if ok else "invalid"] += 1
        fmt = rng.choice(["yaml", "toml", "json"])
        text = mutate_text(dumps_policy(base, fmt), rng)
        check(lambda t=text, f=fmt: validate_policy(parse_text(t, f, "<fuzz>"), "<fuzz>"))
        if n % 10 == 0:  # through a file too: read, size checks, suffix
            file = tmp_path / f"p{n}.{fmt}"
            file.write_text(text, encoding="utf-8")
            check(lambda f=file: load_policy(f))
            try:
                raw = yaml.safe_dump(mutated, allow_unicode=True)
            except yaml.YAMLError:
                continue
            file = tmp_path / f"d{n}.yaml"
            file.write_text(raw, encoding="utf-8")
            check(lambda f=file: load_policy(f))
    assert results["invalid"] > 0  # the mutations do reach the validators


def test_hostile_top_level_values_raise_only_policy_errors() -> None:
    for value in [*HOSTILE, 123, b"budget: 4x", object(), Path("/nonexistent/policy.yaml")]:
        check(lambda v=value: load_policy(v))
        check(lambda v=value: validate_policy(v))


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

KEYS = ["budget", "name", "description", "scope", "rules", "default_formats", "objective", "solver", "recovery",
        "kinds", "include", "exclude", "include_embeddings", "include_lm_head", "match", "formats", "kind", "base",
        "rank_min", "rank_max", "terms_max", "density_min", "density_max", "block", "a_shape", "method", "steps",
        "lr", "checkpoint_path", "sensitivity_batches", "sensitivity", "blockwise"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["4x", "25x", "40MB", "3M params", "lowrank", "kronecker", "doped", "dense",
                                           "blocksparse", "data", "weight", "re:.*", "*.mlp.*", "linear", "lstm"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8),
                                                                         inner, max_size=5)),
    max_leaves=25,
)


@pytest.mark.slow
@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_hypothesis_policy_data_raises_only_policy_errors(data: dict[str, Any]) -> None:
    check(lambda: validate_policy(data, "<hypothesis>"))


@pytest.mark.slow
@hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
@hypothesis.given(st.text(max_size=300), st.sampled_from(["yaml", "toml", "json"]))
def test_hypothesis_policy_text_raises_only_policy_errors(text: str, fmt: str) -> None:
    check(lambda: validate_policy(parse_text(text, fmt, "<hypothesis>"), "<hypothesis>"))  # type: ignore[arg-type]
