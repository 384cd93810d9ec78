"""k-nearest-neighbour search by cosine similarity (faiss, on every visible GPU with faiss-gpu):
exact up to a size limit, above it an IVF index whose recall is measured, not assumed."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)

TARGET_RECALL = 0.95  # an approximate index probes more lists until recall@k reaches this
RECALL_SAMPLE = 1000  # queries whose approximate neighbours are checked against exact search
MAX_NPROBE = 2048  # faiss-gpu's limit on lists probed per query
SEED = 0  # the recall sample


@dataclass(frozen=True)
class Neighbours:
    similarities: np.ndarray  # (queries, k), best first
    ids: np.ndarray  # (queries, k): rows of the base; -1 where an approximate index found fewer
    search: dict  # how: index kind, device, and for an approximate index its measured recall@k


def on_device(index: faiss.Index) -> faiss.Index:
    """The index on every visible GPU with faiss-gpu, else the CPU index unchanged."""
    return faiss.index_cpu_to_all_gpus(index) if faiss.get_num_gpus() > 0 else index


def _device() -> str:
    return "gpu" if faiss.get_num_gpus() > 0 else "cpu"


def _flat(base: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index


def nearest(base: np.ndarray, queries: np.ndarray, k: int, exact_limit: int) -> Neighbours:
    """The k most similar rows of `base` for each query: exact up to `exact_limit` base vectors,
    above it an IVF index whose probe count is widened until recall@k reaches TARGET_RECALL."""
    k = min(k, len(base))
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return Neighbours(empty.astype(np.float32), empty.astype(np.int64),
                          {"index": "none", "vectors": 0})
    if len(base) <= exact_limit:
        similarities, ids = on_device(_flat(base)).search(queries, k)
        return Neighbours(similarities, ids,
                          {"index": "flat", "vectors": len(base), "device": _device()})
    return _approximate(base, queries, k)


def _approximate(base: np.ndarray, queries: np.ndarray, k: int) -> Neighbours:
    dims = base.shape[1]
    # ~4 sqrt(n) lists, as the faiss guidelines suggest, with >= 39 training points per list.
    nlist = max(1, min(int(4 * math.sqrt(len(base))), len(base) // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dims), dims, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    index.add(base)
    rng = np.random.default_rng(SEED)
    sample = queries[rng.choice(len(queries), min(RECALL_SAMPLE, len(queries)), replace=False)]
    _, exact = on_device(_flat(base)).search(sample, k)
    nprobe = 1
    while True:
        index.nprobe = nprobe
        recall = recall_at_k(exact, index.search(sample, k)[1])
        if recall >= TARGET_RECALL or nprobe >= min(nlist, MAX_NPROBE):
            break
        nprobe = min(2 * nprobe, nlist, MAX_NPROBE)
    log.info("approximate index tuned vectors=%d nlist=%d nprobe=%d recall_at_k=%.4f",
             len(base), nlist, nprobe, recall)
    similarities, ids = on_device(index).search(queries, k)  # a GPU copy keeps nprobe
    similarities[ids < 0] = -np.inf
    return Neighbours(similarities, ids, {
        "index": "ivf-flat", "vectors": len(base), "device": _device(), "nlist": nlist,
        "nprobe": nprobe, "recall_at_k": round(recall, 4), "recall_sample": len(sample), "k": k})


def recall_at_k(exact: np.ndarray, found: np.ndarray) -> float:
    """Mean share of each query's exact k neighbours that the approximate search returned."""
    hits = [len(set(e) & set(f[f >= 0])) for e, f in zip(exact.tolist(), found, strict=True)]
    return float(np.mean(hits) / exact.shape[1])
