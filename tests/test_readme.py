"""The README's quickstart runs as written and its compressed toy model is close to the original."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_stays_close(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # it saves "small-llama" into the working directory
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code.group(1), "README quickstart", "exec"), {})
    finally:
        os.chdir(cwd)
    m = re.search(r"4x smaller; logits off by ([0-9.]+), same next token (\d+)%", out.getvalue())
    assert m is not None, out.getvalue()[-500:]
    assert float(m.group(1)) < 0.1 and int(m.group(2)) >= 85
    assert m.group(0) in section  # the README quotes what it prints
    assert (tmp_path / "small-llama").is_dir()
