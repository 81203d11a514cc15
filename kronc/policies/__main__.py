"""``python -m kronc.policies FILE_OR_NAME...``: validate policies, one line per problem, no traceback."""

from __future__ import annotations

import sys

from .errors import PolicyError
from .loader import list_policies, load_policy


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("shipped and KRONC_POLICY_PATH policies: " + ", ".join(list_policies()))
        return 0
    failed = 0
    for source in args:
        try:
            policy = load_policy(source)
        except PolicyError as e:
            print(e, file=sys.stderr)
            failed += 1
        else:
            print(f"{source}: ok ({policy.budget}, {len(policy.rules)} rules)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
