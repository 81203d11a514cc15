"""The JSON schema of policy files, kept in ``policies/policy.schema.json`` for editors.

``python -m kronc.policies.schema`` rewrites the file; ``--check`` exits 1 when it is stale (the
tests run the same check). YAML files point editors at it with a first line
``# yaml-language-server: $schema=policy.schema.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .loader import SHIPPED_DIR
from .model import Policy

SCHEMA_PATH = SHIPPED_DIR / "policy.schema.json"


def _require_kind(schema: dict[str, Any]) -> None:
    """pydantic leaves ``kind`` optional (it has a default) but a policy file must write it."""
    for definition in schema.get("$defs", {}).values():
        kind = definition.get("properties", {}).get("kind", {})
        if "const" in kind:
            required = definition.setdefault("required", [])
            if "kind" not in required:
                required.insert(0, "kind")


def policy_json_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) that policy files follow."""
    schema = Policy.model_json_schema(mode="validation")
    _require_kind(schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kronc compression policy",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def schema_text() -> str:
    return json.dumps(policy_json_schema(), indent=2, ensure_ascii=False) + "\n"


def is_current(path: Path = SCHEMA_PATH) -> bool:
    """Whether ``path`` holds exactly the schema the code would write."""
    return path.is_file() and path.read_text(encoding="utf-8") == schema_text()


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    path.write_text(schema_text(), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kronc.policies.schema", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the schema file is stale, write nothing")
    parser.add_argument("--path", type=Path, default=SCHEMA_PATH, help=f"schema file (default {SCHEMA_PATH})")
    args = parser.parse_args(argv)
    if args.check:
        if is_current(args.path):
            print(f"{args.path} is current")
            return 0
        print(f"{args.path} is stale: run `python -m kronc.policies.schema` to rewrite it", file=sys.stderr)
        return 1
    print(f"wrote {write_schema(args.path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
