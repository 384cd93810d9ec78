"""How well instruction data covers a reference corpus: embeddings, k-NN metrics, gaps, a map.

The engine shared by the coverage stage (every round of a run) and `selfalign coverage` (any
instruction dataset, outside a run). AITP (METHODS.md section 3) looks for pre-training regions an
SFT set leaves empty with a Gaussian kernel density in a 2-D PCA projection: O(N^2), and the
projection loses most of the geometry. Here the same question is answered with k-nearest-neighbour
search in the full embedding space (faiss). All similarities are cosines of normalized sentence
embeddings.

- coverage: the share of reference documents whose nearest instruction item is at least as
  similar as the document's own nearest other reference document (its neighbour), or, when
  `similarity` is set, at least that similar; reported with and without the newest data
  (before/after a round). The neighbour is the default because one fixed cosine means different
  things across a corpus: with all-MiniLM-L6-v2 on the packaged reference, a document's neighbour
  lies at 0.27 to 0.81 (10th to 90th percentile), and instruction-style text rarely reaches 0.5 of
  a passage, so at 0.5 the 150 seed tasks covered 0.3% and a round of gap rewrites moved it by
  one document, while at the neighbour the seeds cover 10% and the rewrites show
  (docs/architecture.md, "A real model").
- SFT density of a reference document: the share of instruction items among its k nearest
  neighbours in reference + instructions (the document itself excluded). It is the k-NN estimate of
  how much of the data near the document is instruction data, the k-NN form of AITP's density
  ratio; a uniform mix would give the base rate m / (n + m - 1). Unweighted, so it reads as a
  fraction: cosines between neighbours lie in a narrow band, so weighting by them barely moves the
  ranking. Ties (density 0: no instruction item among the neighbours, the common case in a real
  gap) are broken by the nearest item's similarity, lowest first.
- gaps: the documents to rewrite next: drawn from the 2n lowest-density documents, clustered with
  k-means, then taken round-robin across clusters (each cluster lowest density first), so one
  dense gap region cannot fill the whole quota.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from matplotlib.figure import Figure
from pydantic import ValidationError
from tqdm import tqdm

from selfalign.operator.spec import Coverage

from ..text import records
from ..runtime import storage
from ..runtime.context import StageError
from .embeddings import Embedder, embed
from .knn import Neighbours, nearest
from ..text.records import RecordError

log = logging.getLogger(__name__)

GAP_POOL_FACTOR = 2  # gaps are drawn from the 2n lowest-density documents
PLOT_POINTS = 20_000  # per set: a scatter of millions of points shows nothing more
SEED = 0


# --- inputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """The reference corpus, one entry per document in file order."""

    uri: str
    path: Path  # local copy, re-read for the gap rows so a large corpus is not held twice
    texts: list[str]
    ids: list[str]
    domains: list[str | None]
    lines: list[int]  # 1-based line of each document


@dataclass(frozen=True)
class InstructionSet:
    uri: str
    texts: list[str]
    new: bool  # the data under assessment: counted in "after" only


def read_reference(uri: str, scratch: str | Path) -> Reference:
    """Documents from JSONL ({text, id?, domain?} a line), or one per non-blank line of a .txt."""
    path = storage.local_path(uri, scratch)
    plain = path.suffix == ".txt"
    texts, ids, domains, lines = [], [], [], []
    with path.open("rb") as f:
        for number, raw in enumerate(tqdm(f, desc="read reference", unit=" lines"), start=1):
            if not raw.strip():
                continue
            where = f"{uri}:{number}"
            text, doc_id, domain = _document(_parse_line(raw, where, plain), where)
            texts.append(text)
            ids.append(doc_id or f"line-{number}")
            domains.append(domain)
            lines.append(number)
    if not texts:
        raise RecordError(f"{uri}: no reference documents: the file is empty")
    return Reference(uri, path, texts, ids, domains, lines)


def _parse_line(raw: bytes, where: str, plain: bool) -> dict:
    try:
        if plain:
            return {"text": raw.decode("utf-8").strip()}
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{where}: invalid {'UTF-8' if plain else 'JSON'}: {exc}") from None
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object on each line")
    return row


def _document(row: dict, where: str) -> tuple[str, str | None, str | None]:
    text = row.get("text")
    if not isinstance(text, str):
        problem = "missing" if text is None else "expected string"
        raise RecordError(f"{where}: field 'text': {problem}")
    if not text.strip():
        raise RecordError(f"{where}: field 'text': empty")
    doc_id, domain = row.get("id"), row.get("domain")
    if doc_id is not None and not isinstance(doc_id, (str, int)):
        raise RecordError(f"{where}: field 'id': expected string or integer")
    if domain is not None and not isinstance(domain, str):
        raise RecordError(f"{where}: field 'domain': expected string")
    return text, None if doc_id is None else str(doc_id), domain


def reference_rows(reference: Reference, picks: list[int]) -> list[dict]:
    """The picked documents' rows as the corpus gives them (an `id` added where it has none)."""
    wanted = {reference.lines[i]: i for i in picks}
    rows: dict[int, dict] = {}
    with reference.path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number in wanted:
                doc = wanted[number]
                row = _parse_line(raw, f"{reference.uri}:{number}", reference.path.suffix == ".txt")
                rows[doc] = {"id": reference.ids[doc], **row}
    return [rows[i] for i in picks]


def instruction_text(instruction: str, input: str, output: str) -> str:
    """What a fine-tuned model sees of an item: the whole exchange."""
    return "\n".join(part for part in (instruction, input, output) if part)


def seed_set(uri: str, new: bool, output_required: bool = True) -> InstructionSet:
    """Self-Instruct, Alpaca or chat JSONL (whatever records.load_seeds reads)."""
    seeds = records.load_seeds(uri, output_required)
    texts = [instruction_text(s.instruction, s.input, s.output) for s in seeds]
    return InstructionSet(uri, texts, new)


def alpaca_set(uri: str, new: bool) -> InstructionSet:
    texts = [instruction_text(row["instruction"], row.get("input", ""), row.get("output", ""))
             for row in records.read_instruction_file(uri)]
    return InstructionSet(uri, texts, new)


# --- metrics -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scores:
    nearest: np.ndarray  # per document: similarity of its nearest instruction item
    nearest_before: np.ndarray  # the same without the new data (-inf where there was none)
    neighbour: np.ndarray  # per document: similarity of its nearest other reference document
    density: np.ndarray  # per document: SFT density (module docstring)
    k: int  # neighbours the density counted (k, or fewer when both sets together are smaller)
    search: dict


def score(reference: np.ndarray, before: np.ndarray, new: np.ndarray, k: int,
          exact_limit: int) -> Scores:
    """Each set is indexed once; the k nearest of the union are merged from the three searches."""
    found = {
        "reference": nearest(reference, reference, k + 1, exact_limit),
        "instructions_before": nearest(before, reference, k, exact_limit),
        "instructions_new": nearest(new, reference, k, exact_limit),
    }
    others = _without_self(found["reference"])
    items = np.hstack([found["instructions_before"].similarities,
                       found["instructions_new"].similarities])
    similarities = np.hstack([others, items])
    is_instruction = np.concatenate([np.zeros(others.shape[1]), np.ones(items.shape[1])])
    k_used = min(k, similarities.shape[1])
    top = np.argsort(-similarities, axis=1, kind="stable")[:, :k_used]
    density = is_instruction[top].mean(axis=1) if k_used else np.zeros(len(reference))
    nearest_before = _best(found["instructions_before"])
    neighbour = others[:, 0] if others.shape[1] else np.ones(len(reference), np.float32)  # alone: exact match
    return Scores(nearest=np.maximum(nearest_before, _best(found["instructions_new"])),
                  nearest_before=nearest_before, neighbour=neighbour, density=density, k=k_used,
                  search={name: n.search for name, n in found.items()})


def thresholds(scores: Scores, similarity: float | None) -> np.ndarray:
    """Per document, how similar an instruction item must be to cover it (module docstring)."""
    return scores.neighbour if similarity is None else np.full(len(scores.nearest), similarity, np.float32)


def _without_self(neighbours: Neighbours) -> np.ndarray:
    """Each document's neighbours minus itself (or minus the last one where the index missed it)."""
    rows = len(neighbours.ids)
    keep = neighbours.ids != np.arange(rows)[:, None]
    keep[keep.all(axis=1), -1] = False
    return neighbours.similarities[keep].reshape(rows, -1)


def _best(neighbours: Neighbours) -> np.ndarray:
    if neighbours.similarities.shape[1] == 0:
        return np.full(len(neighbours.similarities), -np.inf, np.float32)
    return neighbours.similarities[:, 0]


# --- gaps --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gaps:
    docs: list[int]  # reference rows, in pick order
    clusters: list[int]  # the k-means cluster of each pick
    pool: int  # lowest-density documents they were drawn from
    cluster_count: int


def select_gaps(vectors: np.ndarray, density: np.ndarray, nearest_similarity: np.ndarray,
                n: int) -> Gaps:
    """n documents from the 2n lowest-density ones, taken round-robin across k-means clusters
    (about sqrt(pool) of them, cosine k-means), each cluster lowest density first."""
    order = np.lexsort((nearest_similarity, density))  # lowest density, then farthest from any item
    pool = order[: min(len(order), GAP_POOL_FACTOR * n)]
    if len(pool) == 0:
        return Gaps([], [], 0, 0)
    count = max(1, min(len(pool), round(math.sqrt(len(pool)))))
    kmeans = faiss.Kmeans(vectors.shape[1], count, niter=20, seed=SEED, spherical=True,
                          min_points_per_centroid=1)  # small pools are fine: no warning
    kmeans.train(vectors[pool])
    labels = kmeans.index.search(vectors[pool], 1)[1][:, 0]
    queues: dict[int, list[tuple[int, int]]] = defaultdict(list)  # ordered by their best member
    for doc, label in zip(pool.tolist(), labels.tolist(), strict=True):
        queues[label].append((doc, label))
    turns = itertools.zip_longest(*queues.values())
    picks = [pick for turn in turns for pick in turn if pick is not None][:n]
    return Gaps([doc for doc, _ in picks], [label for _, label in picks], len(pool), count)


# --- picture -----------------------------------------------------------------------------------

def draw_map(reference: np.ndarray, instructions: np.ndarray, covered: np.ndarray,
             gap_docs: list[int], title: str) -> bytes:
    """PNG scatter of both sets in the reference's first two principal components (AITP fits its
    PCA on the pre-training side too), gaps circled; large sets are subsampled for drawing."""
    rng = np.random.default_rng(SEED)
    shown_ref, shown_ins = _subsample(len(reference), rng), _subsample(len(instructions), rng)
    fitted = reference[shown_ref]
    mean = fitted.mean(axis=0)
    _, eigenvectors = np.linalg.eigh((fitted - mean).T @ (fitted - mean))
    axes = eigenvectors[:, [-1, -2]]
    ref_2d, ins_2d = (fitted - mean) @ axes, (instructions[shown_ins] - mean) @ axes
    gaps_2d = (reference[np.asarray(gap_docs, dtype=np.int64)] - mean) @ axes
    cov = covered[shown_ref]

    figure = Figure(figsize=(9, 7), dpi=110)
    ax = figure.add_subplot()
    ax.scatter(*ref_2d[cov].T, s=6, c="#9aa5b1", alpha=0.5, linewidths=0,
               label=f"reference, covered ({int(covered.sum()):,})")
    ax.scatter(*ref_2d[~cov].T, s=6, c="#f4a261", alpha=0.8, linewidths=0,
               label=f"reference, not covered ({int((~covered).sum()):,})")
    ax.scatter(*ins_2d.T, s=6, c="#1d4ed8", alpha=0.5, linewidths=0,
               label=f"instruction items ({len(instructions):,})")
    ax.scatter(*gaps_2d.T, s=42, facecolors="none", edgecolors="#c1121f", linewidths=1.2,
               label=f"gap documents ({len(gap_docs):,})")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("principal component 1 (fitted on the reference)")
    ax.set_ylabel("principal component 2")
    ax.legend(loc="upper right", markerscale=2, fontsize=8, framealpha=0.9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _subsample(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= PLOT_POINTS else np.sort(rng.choice(n, PLOT_POINTS, replace=False))


# --- the report --------------------------------------------------------------------------------

UNLABELLED = "(no domain)"


@dataclass(frozen=True)
class Analysis:
    report: dict
    gap_rows: list[dict]
    picture: bytes


def analyse(reference: Reference, sets: list[InstructionSet], embedder: Embedder, config: Coverage,
            cache: str, scratch: str | Path) -> Analysis:
    """Embed (through the cache), score, pick the gaps and draw the map."""
    if not any(s.texts for s in sets):
        raise StageError(f"no instruction items in {', '.join(s.uri for s in sets)}")
    ref_vectors, ref_cached = embed(embedder, reference.texts, cache, scratch)
    embedded = [embed(embedder, s.texts, cache, scratch) for s in sets]
    vectors = [v for v, _ in embedded]
    before = _stack(vectors, sets, False, embedder.dimensions)
    new = _stack(vectors, sets, True, embedder.dimensions)
    scores = score(ref_vectors, before, new, config.k, config.exact_search_limit)
    gaps = select_gaps(ref_vectors, scores.density, scores.nearest, config.gap_docs_per_round)
    cached = [ref_cached] + [c for _, c in embedded]
    report = build_report(reference, sets, scores, gaps, config, embedder, cached)
    picture = draw_map(ref_vectors, np.vstack([before, new]),
                       scores.nearest >= thresholds(scores, config.similarity), gaps.docs, map_title(report))
    log.info("coverage measured coverage=%.4f coverage_before=%.4f docs=%d items=%d gaps=%d",
             report["coverage"], report["coverage_before"], len(reference.texts),
             report["instructions"]["items"], len(gaps.docs))
    return Analysis(report, reference_rows(reference, gaps.docs), picture)


def _stack(vectors: list[np.ndarray], sets: list[InstructionSet], new: bool,
           dims: int) -> np.ndarray:
    """The vectors of the new sets, or of the others, as one array."""
    parts = [v for v, s in zip(vectors, sets, strict=True) if s.new == new]
    return np.vstack(parts) if parts else np.zeros((0, dims), np.float32)


def build_report(reference: Reference, sets: list[InstructionSet], scores: Scores, gaps: Gaps,
                 config: Coverage, embedder: Embedder, cached: list[bool]) -> dict:
    """Every metric; `cached`: for the reference, then each set, whether embeddings were reused."""
    needed = thresholds(scores, config.similarity)
    covered = scores.nearest >= needed
    covered_before = scores.nearest_before >= needed
    docs = len(reference.texts)
    items = sum(len(s.texts) for s in sets)
    items_before = sum(len(s.texts) for s in sets if not s.new)
    sources = [{"uri": s.uri, "items": len(s.texts), "new": s.new, "embeddings_cached": c}
               for s, c in zip(sets, cached[1:], strict=True)]
    return {
        "coverage": _round(covered.mean()),
        "coverage_before": _round(covered_before.mean()),
        "coverage_gain": _round(covered.mean() - covered_before.mean()),
        "similarity": config.similarity,
        "k": config.k,
        "reference": {"uri": reference.uri, "docs": docs, "embeddings_cached": cached[0],
                      "domains": len({d for d in reference.domains if d})},
        "instructions": {"items": items, "items_before": items_before,
                         "items_new": items - items_before, "sources": sources},
        "embedder": {"uri": embedder.uri, "identity": embedder.identity,
                     "dimensions": embedder.dimensions},
        "nearest_similarity": _distribution(scores.nearest),
        "neighbour_similarity": _distribution(scores.neighbour),
        "sft_density": {**_distribution(scores.density), "k_used": scores.k,
                        "base_rate": _round(items / max(1, docs + items - 1)),
                        "zero_share": _round(np.mean(scores.density == 0))},
        "per_domain": per_domain(reference.domains, covered, covered_before, scores.density,
                                 gaps.docs),
        "gaps": gap_summary(reference, scores, gaps, config.gap_docs_per_round),
        "search": scores.search,
    }


def gap_summary(reference: Reference, scores: Scores, gaps: Gaps, requested: int) -> dict:
    picked = np.asarray(gaps.docs, dtype=np.int64)
    domains = Counter(reference.domains[i] or UNLABELLED for i in gaps.docs)
    return {
        "requested": requested, "selected": len(gaps.docs), "pool": gaps.pool,
        "clusters": gaps.cluster_count,
        "mean_sft_density": _round(scores.density[picked].mean()) if len(picked) else None,
        "mean_nearest_similarity": _round(scores.nearest[picked].mean()) if len(picked) else None,
        "domains": dict(domains.most_common()),
        "ids": [reference.ids[i] for i in gaps.docs],
        "clusters_of_ids": gaps.clusters,
    }


def per_domain(domains: list[str | None], covered: np.ndarray, covered_before: np.ndarray,
               density: np.ndarray, gap_docs: list[int]) -> dict | None:
    """Coverage per reference domain, least covered first; None when the corpus has no domains."""
    if not any(domains):
        return None
    members: dict[str, list[int]] = defaultdict(list)
    for i, domain in enumerate(domains):
        members[domain or UNLABELLED].append(i)
    gap_counts = Counter(domains[i] or UNLABELLED for i in gap_docs)
    table = {name: {"docs": len(rows), "coverage": _round(covered[rows].mean()),
                    "coverage_before": _round(covered_before[rows].mean()),
                    "sft_density": _round(density[rows].mean()), "gaps": gap_counts[name]}
             for name, rows in members.items()}
    return dict(sorted(table.items(), key=lambda item: (item[1]["coverage"], item[0])))


def _distribution(values: np.ndarray) -> dict:
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"mean": _round(values.mean()), "p10": _round(p10), "p50": _round(p50),
            "p90": _round(p90)}


def _round(value: float) -> float:
    return round(float(value), 4)


def map_title(report: dict) -> str:
    items = report["instructions"]
    before = f" (before: {report['coverage_before']:.1%})" if items["items_before"] else ""
    at = "each document's neighbour" if report["similarity"] is None else f"cosine ≥ {report['similarity']:g}"
    return (f"Coverage {report['coverage']:.1%} at {at}{before}\n"
            f"{report['reference']['docs']:,} reference documents, "
            f"{items['items']:,} instruction items, {report['gaps']['selected']:,} gap documents")


def write_outputs(out: str, analysis: Analysis) -> dict[str, str]:
    """report.json, gaps.jsonl and coverage.png under `out`; returns name -> URI."""
    outputs = {"report": storage.join(out, "report.json"), "gaps": storage.join(out, "gaps.jsonl"),
               "map": storage.join(out, "coverage.png")}
    storage.write_jsonl(outputs["gaps"], analysis.gap_rows)
    storage.write_bytes(outputs["map"], analysis.picture)
    storage.write_json(outputs["report"], analysis.report)
    return outputs


# --- the user command --------------------------------------------------------------------------

def coverage_command(reference: str, instructions: str, out_dir: str, gaps: int, similarity: float | None,
                     k: int, embedder: str) -> dict:
    """`selfalign coverage`: the report for any instruction dataset (Self-Instruct, Alpaca or chat
    JSONL) against a reference corpus, written to out_dir; returns the report. Arguments are
    paths or URIs. Embeddings are cached by content under $XDG_CACHE_HOME/selfalign (default
    ~/.cache/selfalign), so auditing another dataset against the same corpus embeds only the
    dataset. "Before" is the corpus without this dataset: coverage_before is 0."""
    config = _coverage_config(reference=as_uri(reference), embedder=as_uri(embedder),
                              similarity=similarity, k=k, gap_docs_per_round=gaps)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfalign"
    corpus = read_reference(config.reference, home)
    dataset = seed_set(as_uri(instructions), new=True, output_required=False)
    analysis = analyse(corpus, [dataset], Embedder(config.embedder, home), config,
                       (home / "embeddings").as_uri(), home)
    write_outputs(as_uri(out_dir), analysis)
    return analysis.report


def as_uri(location: str) -> str:
    """A URI as given; a local path as file://."""
    return location if "://" in location else Path(location).resolve().as_uri()


def _coverage_config(**fields) -> Coverage:
    try:
        return Coverage(**fields)
    except ValidationError as exc:
        raise StageError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                   for e in exc.errors(include_url=False))) from None
