"""Progress of a recovery run: a tqdm bar when tqdm is installed, else one log line per update."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("kronc.recover")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class Progress:
    """Shows step, loss parts, tokens/s and scheme metrics every ``log_every`` steps.

    With ``enabled`` it draws a tqdm bar (or prints plain lines to stderr without tqdm); either way it
    logs each update to the ``kronc.recover`` logger at INFO.
    """

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.bar, self.plain = total, None, False
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.plain = True
            else:
                self.bar = tqdm(total=total, initial=initial, desc="recover", unit="step", dynamic_ncols=True)

    def step(self, step: int, values: dict[str, float], tokens_per_s: float, show: bool) -> None:
        """Advance by one step; with ``show`` display ``values`` (loss parts, metrics) too."""
        if self.bar is not None:
            self.bar.update(1)
        if not show:
            return
        shown = {k: _fmt(v) for k, v in values.items()}
        shown["tok/s"] = f"{tokens_per_s:.0f}"
        line = " ".join(f"{k}={v}" for k, v in shown.items())
        log.info("step %d/%d %s", step + 1, self.total, line)
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        elif self.plain:
            print(f"[kronc.recover] step {step + 1}/{self.total} {line}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        log.info(message)
        if self.bar is not None:
            self.bar.write(f"[kronc.recover] {message}", file=sys.stderr)
        elif self.plain:
            print(f"[kronc.recover] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
