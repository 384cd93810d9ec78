"""Exact ROUGE-L near-duplicate removal, with the decisions of the `rouge_score` reference, fast.

Self-Instruct and I-SHEEP drop an instruction whose ROUGE-L F1 against any instruction already
in the pool is > 0.7, re-tokenizing both strings for every pair (about 70 us a pair: hours at
50K). Here each text is tokenized once, exactly as rouge_score does without stemming, and its
tokens become one character each, so an instruction is a short string. For a new text:

1. an inverted index over (token, occurrence) keys gives, for every pool item at once, the size of
   the token multiset intersection, an upper bound on the LCS; with F = 2*LCS/(m+n), items whose
   bound cannot exceed the threshold (including every length mismatch: LCS <= min(m, n)) are
   skipped;
2. the survivors' LCS comes from rapidfuzz's bit-parallel LCSseq (Hyyro's algorithm, in C++);
3. precision, recall and F are computed with rouge_score's own float expressions, so the
   `F > threshold` decision is bit-for-bit the reference's.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from tqdm import tqdm

from . import records
from ..runtime import storage

log = logging.getLogger(__name__)
_TOKEN = re.compile(r"[a-z0-9]+")
_UNKNOWN = "\x00"  # a token no pool item has: it can never be part of a common subsequence
_SURROGATES, _MAX_CODE = 0xD800, 0x10FFFF
_SLACK = 1e-9  # pruning keeps pairs whose bound is within float noise of the threshold


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's tokenizer without stemming: lower-case, then runs of [a-z0-9] (ASCII only)."""
    return _TOKEN.findall(text.lower())


def fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """ROUGE-L F1 exactly as rouge_score computes it (its _score_lcs and scoring.fmeasure)."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F1 of two texts, equal to RougeScorer(["rougeL"]).score(target, prediction) fmeasure."""
    vocabulary = _Vocabulary()
    a, b = (vocabulary.encode(rouge_tokens(text), grow=True) for text in (target, prediction))
    return fmeasure(LCSseq.similarity(a, b), len(a), len(b))


class _Vocabulary:
    """Token -> one character, so a text is a str that rapidfuzz reads without hashing anything."""

    def __init__(self):
        self._chars: dict[str, str] = {}

    def encode(self, tokens: list[str], grow: bool) -> str:
        """The text as characters; a token first seen is added when `grow`, else it becomes
        _UNKNOWN (which matches nothing in the pool, all the LCS needs)."""
        if not grow:
            return "".join(self._chars.get(token, _UNKNOWN) for token in tokens)
        for token in tokens:
            if token not in self._chars:
                code = len(self._chars) + 1  # 0 is _UNKNOWN
                code += 0x800 if code >= _SURROGATES else 0  # lone surrogates are not valid in str
                if code > _MAX_CODE:
                    raise ValueError("more distinct tokens than Unicode has characters (about 1.1M)")
                self._chars[token] = chr(code)
        return "".join(self._chars[token] for token in tokens)


class _Column:
    """A growable int32 array: appends are amortized O(1), `view` is a numpy slice without copying."""

    def __init__(self):
        self._data = np.empty(8, dtype=np.int32)
        self._size = 0

    def append(self, value: int) -> None:
        if self._size == len(self._data):
            self._data = np.resize(self._data, 2 * len(self._data))
        self._data[self._size] = value
        self._size += 1

    def view(self) -> np.ndarray:
        return self._data[: self._size]


class RougeDeduper:
    """A pool of texts that answers "is this a near-duplicate of anything in the pool?"."""

    def __init__(self, threshold: float = 0.7, pool: Iterable[str] = ()):
        if not 0 <= threshold <= 1:
            raise ValueError(f"ROUGE-L threshold must lie in [0, 1], got {threshold}")
        self.threshold = threshold
        self._vocabulary = _Vocabulary()
        self._texts: list[str] = []  # pool items as token-character strings
        self._lengths = _Column()
        self._postings: dict[tuple[str, int], _Column] = {}  # (token, k-th occurrence) -> items
        for text in pool:
            self.add(text)

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> None:
        """Put `text` in the pool, whatever it resembles."""
        self._add_encoded(self._vocabulary.encode(rouge_tokens(text), grow=True))

    def is_duplicate(self, text: str) -> tuple[bool, float, int | None]:
        """(ROUGE-L F1 > threshold against some pool item?, the best F1 among the pairs that could
        exceed the threshold (0.0 when none could), the pool index of that best match when it is
        a duplicate, else None)."""
        return self._check(self._vocabulary.encode(rouge_tokens(text), grow=False))

    def offer(self, text: str) -> bool:
        """Keep `text` (add it to the pool and return True) unless it duplicates a pool item.

        Offering a batch in order gives Self-Instruct's semantics: earlier accepted items of the
        same batch count against later ones.
        """
        tokens = rouge_tokens(text)
        duplicate, _, _ = self._check(self._vocabulary.encode(tokens, grow=False))
        if not duplicate:
            self._add_encoded(self._vocabulary.encode(tokens, grow=True))
        return not duplicate

    def _add_encoded(self, encoded: str) -> None:
        index = len(self._texts)
        self._texts.append(encoded)
        self._lengths.append(len(encoded))
        for key in _occurrence_keys(encoded):
            self._postings.setdefault(key, _Column()).append(index)

    def _check(self, encoded: str) -> tuple[bool, float, int | None]:
        m = len(encoded)
        hits = [self._postings[key].view() for key in _occurrence_keys(encoded) if key in self._postings]
        if not hits:  # nothing shared (or an empty text, which rouge_score scores 0)
            return False, 0.0, None
        overlap = np.bincount(np.concatenate(hits), minlength=len(self._texts))
        lengths = self._lengths.view()
        # F = 2*LCS/(m+n) <= 2*overlap/(m+n): skip pairs that cannot exceed the threshold.
        candidates = np.flatnonzero(2 * overlap >= (self.threshold - _SLACK) * (m + lengths))
        if not len(candidates):
            return False, 0.0, None
        lcs = process.cdist([encoded], [self._texts[i] for i in candidates], scorer=LCSseq.similarity,
                            dtype=np.int32, workers=1)[0]
        # rouge_score's float expressions, elementwise (IEEE float64, same operation order);
        # target = the pool item, prediction = the new text.
        precision = lcs / m
        recall = lcs / lengths[candidates]
        total = precision + recall
        scores = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
        best = int(np.argmax(scores))
        duplicate = bool(scores[best] > self.threshold)
        return duplicate, float(scores[best]), int(candidates[best]) if duplicate else None


def _occurrence_keys(encoded: str) -> list[tuple[str, int]]:
    """(token, 1), (token, 2), ... per token: items sharing k keys share k tokens as multisets."""
    return [(char, k) for char, count in Counter(encoded).items() for k in range(1, count + 1)]


def dedup_file(pool_uri: str | None, candidates_uri: str, out_uri: str, threshold: float) -> dict:
    """Write the candidates (JSONL with `instruction`) that are no near-duplicate of the pool or of
    an earlier kept candidate, unchanged and in order; return the counts."""
    pool = records.read_instruction_file(pool_uri) if pool_uri else []
    candidates = records.read_instruction_file(candidates_uri)
    deduper = RougeDeduper(threshold, (row["instruction"] for row in pool))
    kept = [row for row in tqdm(candidates, desc="dedup", unit="item") if deduper.offer(row["instruction"])]
    storage.write_jsonl(out_uri, kept)
    counts = {"candidates": len(candidates), "kept": len(kept), "duplicates": len(candidates) - len(kept),
              "pool": len(pool)}
    log.info("dedup done candidates=%d kept=%d duplicates=%d pool=%d threshold=%s out=%s",
             *counts.values(), threshold, out_uri)
    return counts
