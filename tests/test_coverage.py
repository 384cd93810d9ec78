"""Coverage stage and `selfalign coverage` core, on real T0 passages with the real MiniLM embedder.

The reference is 8 domains x 25 passages of tests/data/t0-passages.jsonl; the
instruction set is made from other passages of 4 of those domains only (first sentence asked
about, the passage as the answer), so the other 4 are the gaps a correct scorer must find.
Embeddings land in one module-wide cache: the reference is embedded once for the whole module.
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from selfalign.operator.lineage import stage_uri
from selfalign.operator.spec import Coverage, dump_spec, parse_spec
from selfalign.stages.vectors import coverage_report as cr
from selfalign.stages.vectors import embeddings, knn
from selfalign.stages.runtime import storage
from selfalign.stages.runtime.context import StageContext, StageError
from selfalign.stages.text.records import RecordError
from selfalign.stages.synthesize import read_gaps

REPO = Path(__file__).resolve().parents[1]
PASSAGES = REPO / "tests" / "data" / "t0-passages.jsonl"
PRESENT = ("imdb", "cnn_dailymail", "dbpedia_14", "adversarial_qa")
MISSING = ("quarel", "glue_qqp", "ropes", "app_reviews")
DOCS = 25  # per domain in the reference; the next DOCS passages of a domain become instructions
GAPS = 40
EMBEDDER = "builtin://all-minilm-l6-v2"


def by_domain() -> dict[str, list[dict]]:
    grouped = collections.defaultdict(list)
    for line in PASSAGES.read_text().splitlines():
        row = json.loads(line)
        grouped[row["domain"]].append(row)
    return grouped


def as_instruction(passage: dict) -> dict:
    """An Alpaca item made from a passage: its first sentence asked about, the passage as answer."""
    first = re.split(r"(?<=[.!?])\s", passage["text"].strip(), maxsplit=1)[0].rstrip(".?!")
    return {"instruction": f"What can you tell me about this: {first}?", "input": "",
            "output": passage["text"]}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path.as_uri()


class CountingEmbedder:
    """The real embedder, recording every list of texts it is asked to embed."""

    def __init__(self, inner: embeddings.Embedder):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode(texts)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The module's files: reference, instructions from PRESENT, items from one missing domain."""
    root = tmp_path_factory.mktemp("coverage")
    passages = by_domain()
    reference_rows = [row for domain in PRESENT + MISSING for row in passages[domain][:DOCS]]
    present_items = [as_instruction(p) for d in PRESENT for p in passages[d][DOCS:2 * DOCS]]
    quarel_items = [as_instruction(p) for p in passages["quarel"][DOCS:2 * DOCS]]
    home = root / "xdg-cache"  # $XDG_CACHE_HOME of the command tests: they share the module cache
    return SimpleNamespace(
        root=root,
        reference_rows=reference_rows,
        present_items=present_items,
        reference=write_jsonl(root / "reference.jsonl", reference_rows),
        present=write_jsonl(root / "present.jsonl", present_items),
        quarel=write_jsonl(root / "quarel.jsonl", quarel_items),
        home=home,
        cache=(home / "selfalign" / "embeddings").as_uri(),
        scratch=str(root / "scratch"),
    )


@pytest.fixture(scope="module")
def embedder(ws):
    return CountingEmbedder(embeddings.Embedder(EMBEDDER, ws.scratch))


def analyse(ws, embedder, sets, reference=None, cache=None, **settings):
    settings = {"gap_docs_per_round": GAPS, **settings}
    config = Coverage(reference=reference or ws.reference, **settings)
    return cr.analyse(cr.read_reference(config.reference, ws.scratch), sets, embedder, config,
                      cache or ws.cache, ws.scratch)


@pytest.fixture(scope="module")
def present_only(ws, embedder):
    """The analysis of the instruction set that lacks the MISSING domains."""
    return analyse(ws, embedder, [cr.alpaca_set(ws.present, new=True)])


def test_gaps_come_from_the_domains_the_instructions_lack(present_only):
    gap_domains = [row["domain"] for row in present_only.gap_rows]
    assert len(gap_domains) == GAPS
    assert sum(d in MISSING for d in gap_domains) / GAPS >= 0.8, collections.Counter(gap_domains)
    table = present_only.report["per_domain"]
    missing_density = max(table[d]["sft_density"] for d in MISSING)
    assert missing_density < min(table[d]["sft_density"] for d in PRESENT)
    least_covered = sorted(MISSING, key=lambda d: (table[d]["coverage"], d))
    assert list(table)[:len(MISSING)] == least_covered


def test_gap_rows_are_the_reference_rows_as_given(ws, present_only):
    given = {row["id"]: row for row in ws.reference_rows}
    assert present_only.gap_rows == [given[doc_id] for doc_id in present_only.report["gaps"]["ids"]]
    assert len(set(present_only.report["gaps"]["ids"])) == GAPS


def test_coverage_rises_when_a_missing_domain_is_added(ws, embedder, present_only):
    sets = [cr.alpaca_set(ws.present, new=False), cr.alpaca_set(ws.quarel, new=True)]
    report = analyse(ws, embedder, sets).report
    assert report["coverage_before"] == present_only.report["coverage"]
    assert report["coverage"] > report["coverage_before"]
    gain = report["coverage"] - report["coverage_before"]
    assert report["coverage_gain"] == pytest.approx(gain, abs=1e-4)
    quarel = report["per_domain"]["quarel"]
    assert quarel["coverage"] > quarel["coverage_before"] == 0
    assert quarel["gaps"] < present_only.report["per_domain"]["quarel"]["gaps"]
    assert report["instructions"]["items_before"] == DOCS * len(PRESENT)
    assert report["instructions"]["items_new"] == DOCS


def test_metrics_match_a_brute_force_computation(ws, embedder, present_only):
    """coverage and SFT density recomputed from the (cached) embeddings with plain numpy."""
    texts = cr.read_reference(ws.reference, ws.scratch).texts
    reference, cached = embeddings.embed(embedder, texts, ws.cache, ws.scratch)
    items, _ = embeddings.embed(embedder, cr.alpaca_set(ws.present, new=True).texts, ws.cache, ws.scratch)
    assert cached
    report = present_only.report
    nearest = (reference @ items.T).max(axis=1)
    union = np.hstack([reference @ reference.T, reference @ items.T])
    np.fill_diagonal(union[:, :len(reference)], -np.inf)  # a document is not its own neighbour
    top = np.argsort(-union, axis=1)[:, :report["k"]]
    density = (top >= len(reference)).mean(axis=1)

    own = reference @ reference.T
    np.fill_diagonal(own, -np.inf)
    neighbour = own.max(axis=1)
    assert report["similarity"] is None  # the default: each document's neighbour
    assert report["coverage"] == pytest.approx(np.mean(nearest >= neighbour), abs=1e-4)
    assert report["neighbour_similarity"]["mean"] == pytest.approx(neighbour.mean(), abs=1e-3)
    fixed = analyse(ws, embedder, [cr.alpaca_set(ws.present, new=True)], similarity=0.5).report
    assert fixed["coverage"] == pytest.approx(np.mean(nearest >= 0.5), abs=1e-4)
    assert report["nearest_similarity"]["mean"] == pytest.approx(nearest.mean(), abs=1e-3)
    assert report["sft_density"]["mean"] == pytest.approx(density.mean(), abs=1e-3)
    base_rate = len(items) / (len(reference) + len(items) - 1)
    assert report["sft_density"]["base_rate"] == pytest.approx(base_rate, abs=1e-4)


def test_a_document_is_covered_by_an_item_as_close_as_its_own_neighbour():
    """A document in a dense region needs a closer item than a lone one; a fixed cosine treats
    both alike."""
    scores = cr.Scores(nearest=np.array([0.8, 0.3], np.float32), nearest_before=np.array([0.1, 0.1], np.float32),
                       neighbour=np.array([0.9, 0.2], np.float32), density=np.zeros(2), k=1, search={})
    assert (scores.nearest >= cr.thresholds(scores, None)).tolist() == [False, True]
    assert (scores.nearest >= cr.thresholds(scores, 0.5)).tolist() == [True, False]


def test_report_has_every_metric(ws, present_only, tmp_path):
    outputs = cr.write_outputs(tmp_path.as_uri(), present_only)
    report = storage.read_json(outputs["report"])
    assert report == present_only.report
    assert set(report) == {
        "coverage", "coverage_before", "coverage_gain", "similarity", "k", "reference",
        "instructions", "embedder", "nearest_similarity", "neighbour_similarity", "sft_density", "per_domain",
        "gaps", "search"}
    assert 0 < report["coverage"] < 1 and report["coverage_before"] == 0  # every item is new here
    assert report["reference"] == {"uri": ws.reference, "docs": len(ws.reference_rows),
                                   "domains": 8, "embeddings_cached": False}  # first in the module
    assert set(report["per_domain"]) == set(PRESENT + MISSING)
    columns = {"docs", "coverage", "coverage_before", "sft_density", "gaps"}
    assert all(row["docs"] == DOCS and set(row) == columns for row in report["per_domain"].values())
    assert sum(row["gaps"] for row in report["per_domain"].values()) == GAPS
    for name in ("nearest_similarity", "sft_density"):
        assert {"mean", "p10", "p50", "p90"} <= set(report[name])
    assert {"base_rate", "zero_share", "k_used"} <= set(report["sft_density"])
    assert report["gaps"]["selected"] == GAPS and report["gaps"]["pool"] == 2 * GAPS
    assert report["gaps"]["clusters"] > 1 and len(report["gaps"]["clusters_of_ids"]) == GAPS
    assert report["embedder"]["dimensions"] == 384
    assert report["search"]["reference"] == {"index": "flat", "vectors": len(ws.reference_rows),
                                             "device": "cpu"}
    written = (tmp_path / "gaps.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in written] == report["gaps"]["ids"]


def test_map_is_a_valid_png(present_only, tmp_path):
    outputs = cr.write_outputs(tmp_path.as_uri(), present_only)
    path = storage.local_path(outputs["map"], tmp_path)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # points drawn, not a blank canvas
    assert f"{present_only.report['coverage']:.1%}" in cr.map_title(present_only.report)


def test_reference_is_embedded_once_then_read_from_the_cache(ws, tmp_path):
    counting = CountingEmbedder(embeddings.Embedder(EMBEDDER, ws.scratch))
    rows = ws.reference_rows[::10]  # 20 documents from all 8 domains
    reference = write_jsonl(tmp_path / "reference.jsonl", rows)
    cache = (tmp_path / "cache").as_uri()
    first_set = cr.alpaca_set(write_jsonl(tmp_path / "a.jsonl", ws.present_items[:4]), new=True)
    second_set = cr.alpaca_set(write_jsonl(tmp_path / "b.jsonl", ws.present_items[4:7]), new=True)

    first = analyse(ws, counting, [first_set], reference, cache, gap_docs_per_round=3)
    assert counting.calls == [[row["text"] for row in rows], first_set.texts]
    assert not first.report["reference"]["embeddings_cached"]
    assert len(storage.list_uris(cache)) == 2

    counting.calls.clear()
    second = analyse(ws, counting, [second_set], reference, cache, gap_docs_per_round=3)
    assert counting.calls == [second_set.texts]  # the reference was not embedded again
    assert second.report["reference"]["embeddings_cached"]
    key = embeddings.content_key(counting.identity, [row["text"] for row in rows])
    assert storage.exists(storage.join(cache, f"{key}.npy"))


def test_cache_key_follows_content_and_embedder():
    key = embeddings.content_key("model-a", ["x", "y"])
    assert key == embeddings.content_key("model-a", ["x", "y"])
    others = {embeddings.content_key("model-b", ["x", "y"]), embeddings.content_key("model-a", ["x", "z"]),
              embeddings.content_key("model-a", ["xy"]), embeddings.content_key("model-a", ["x", "y", ""])}
    assert len(others | {key}) == 5


def test_approximate_search_records_recall_and_agrees_with_exact(ws, embedder, present_only):
    sets = [cr.alpaca_set(ws.present, new=True)]
    approximate = analyse(ws, embedder, sets, exact_search_limit=50).report
    for name in ("reference", "instructions_new"):
        search = approximate["search"][name]
        assert search["index"] == "ivf-flat" and search["recall_sample"] > 0
        assert search["recall_at_k"] >= knn.TARGET_RECALL or search["nprobe"] == search["nlist"]
    exact = present_only.report
    assert approximate["coverage"] == pytest.approx(exact["coverage"], abs=0.02)
    density = exact["sft_density"]["mean"]
    assert approximate["sft_density"]["mean"] == pytest.approx(density, abs=0.02)


def test_recall_at_k_counts_shared_neighbours():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    found = np.array([[2, 1, 9], [3, -1, -1]])
    assert knn.recall_at_k(exact, found) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_gaps_are_spread_across_clusters():
    """Lowest density alone would take all 4 picks from region A; round-robin reaches B too."""
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3]
    regions = np.repeat([0, 1, 2], [5, 4, 8])  # A: 5 docs, B: 4, C: 8
    vectors = centres[regions] + 0.01 * rng.standard_normal((len(regions), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    density = np.array([0.0, 0.1, 0.9])[regions]
    nearest = np.zeros(len(regions))
    gaps = cr.select_gaps(vectors, density, nearest, 4)
    assert len(gaps.docs) == 4 and gaps.pool == 8
    assert set(regions[gaps.docs]) == {0, 1}  # both low-density regions, never the dense one
    assert cr.select_gaps(vectors, density, nearest, 0).docs == []
    assert sorted(cr.select_gaps(vectors, density, nearest, 100).docs) == list(range(len(regions)))


@pytest.mark.parametrize("content, error", [
    ("", "{uri}: no reference documents"),
    ("\n  \n", "{uri}: no reference documents"),
    ('{"text": "a"}\n{"id": 2}\n', "{uri}:2: field 'text': missing"),
    ('{"text": "a"}\n\n{"text": "b"\n', "{uri}:3: invalid JSON"),
    ('{"text": 5}\n', "{uri}:1: field 'text': expected string"),
    ('{"text": "  "}\n', "{uri}:1: field 'text': empty"),
    ('{"text": "a", "domain": 3}\n', "{uri}:1: field 'domain': expected string"),
    ('["a"]\n', "{uri}:1: expected a JSON object"),
])
def test_bad_reference_names_file_and_line(tmp_path, content, error):
    path = tmp_path / "reference.jsonl"
    path.write_text(content)
    with pytest.raises(RecordError, match=f"^{re.escape(error.format(uri=path.as_uri()))}"):
        cr.read_reference(path.as_uri(), tmp_path)


def test_plain_text_reference_is_one_document_a_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first document\n\n  second document  \n")
    reference = cr.read_reference(path.as_uri(), tmp_path)
    assert reference.texts == ["first document", "second document"]
    assert reference.ids == ["line-1", "line-3"] and reference.domains == [None, None]
    assert cr.reference_rows(reference, [1]) == [{"id": "line-3", "text": "second document"}]


def test_command_writes_report_gaps_and_map(ws, tmp_path, monkeypatch, present_only):
    monkeypatch.setenv("XDG_CACHE_HOME", str(ws.home))
    out = tmp_path / "audit"
    report = cr.coverage_command(
        reference=str(ws.root / "reference.jsonl"), instructions=str(ws.root / "present.jsonl"),
        out_dir=str(out), gaps=10, similarity=None, k=10, embedder=EMBEDDER)
    assert report == json.loads((out / "report.json").read_text())
    assert report["reference"]["embeddings_cached"]  # the module's cache, via $XDG_CACHE_HOME
    assert report["coverage"] == present_only.report["coverage"] and report["coverage_before"] == 0
    gaps = [json.loads(line) for line in (out / "gaps.jsonl").read_text().splitlines()]
    assert len(gaps) == 10 and all(set(row) == {"id", "domain", "text"} for row in gaps)
    with Image.open(out / "coverage.png") as image:
        assert image.format == "PNG"


def test_command_rejects_bad_settings(ws, tmp_path):
    with pytest.raises(StageError, match="similarity"):
        cr.coverage_command(reference=ws.reference, instructions=ws.present, out_dir=str(tmp_path),
                            gaps=1, similarity=2.0, k=10, embedder=EMBEDDER)


def test_command_reports_a_bad_reference_line(ws, tmp_path):
    bad = tmp_path / "reference.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(RecordError, match=f"^{re.escape(bad.as_uri())}:2: field 'text': missing"):
        cr.coverage_command(reference=str(bad), instructions=ws.present,
                            out_dir=str(tmp_path / "out"), gaps=1, similarity=0.5, k=10,
                            embedder=EMBEDDER)


# --- the stage, through the real CLI ------------------------------------------------------------

def run_stage(spec: dict, round_: int, run_uri: str, tmp_path: Path):
    """`python -m selfalign.stages coverage ...` as a Job runs it: (process, result summary)."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    result = tmp_path / f"result-{round_}.json"
    command = [sys.executable, "-m", "selfalign.stages", "coverage", "--spec", str(spec_path),
               "--round", str(round_), "--run-uri", run_uri, "--scratch", str(tmp_path / "scratch")]
    env = {**os.environ, "SELFALIGN_RESULT_PATH": str(result)}
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc, json.loads(result.read_text())


def aitp_spec(store: str, seeds: str, reference: str, gaps: int) -> dict:
    return dump_spec(parse_spec({
        "recipe": "aitp", "rounds": 2, "model": {"base": "builtin://tiny-llama"}, "seeds": seeds,
        "storage": {"uri": store}, "coverage": {"reference": reference, "gapDocsPerRound": gaps}}))


def test_stage_embeds_the_reference_once_per_run(tmp_path):
    passages = by_domain()
    store = (tmp_path / "store").as_uri()
    run_uri = f"{store}/default/cov"
    docs = [p for d in ("imdb", "quarel", "glue_qqp") for p in passages[d][:6]]
    seed_rows = [as_instruction(p) for p in passages["imdb"][6:9]]
    seeds = write_jsonl(tmp_path / "seeds.jsonl", seed_rows)
    kept = {0: [as_instruction(p) for p in passages["imdb"][9:12]],
            1: [as_instruction(p) for p in passages["quarel"][6:10]]}
    for k, rows in kept.items():
        storage.write_jsonl(storage.join(stage_uri(run_uri, k, "assess"), "kept.jsonl"), rows)
    spec = aitp_spec(store, seeds, write_jsonl(tmp_path / "ref.jsonl", docs), gaps=4)

    summaries, reports = [], []
    for k in (0, 1):
        proc, summary = run_stage(spec, k, run_uri, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = stage_uri(run_uri, k, "coverage")
        manifest = storage.read_json(storage.join(out, "manifest.json"))
        assert manifest["summary"] == summary
        assert set(manifest["outputs"]) == {"report", "gaps", "map"}
        assert len(list(storage.iter_jsonl(manifest["outputs"]["gaps"]))) == 4
        assert storage.read_bytes(manifest["outputs"]["map"]).startswith(b"\x89PNG")
        summaries.append(summary)
        reports.append(storage.read_json(manifest["outputs"]["report"]))

    assert all(0 <= s["coverage"] <= 1 and s["gapDocs"] == 4 and s["referenceDocs"] == 18
               for s in summaries)
    first, second = reports
    assert not first["reference"]["embeddings_cached"] and second["reference"]["embeddings_cached"]
    sources = [(s["items"], s["new"], s["embeddings_cached"])
               for s in second["instructions"]["sources"]]
    assert sources == [(3, False, True), (3, False, True), (4, True, False)]  # only round 1's
    assert second["coverage_before"] == first["coverage"]
    assert summaries[1]["coverageBefore"] == summaries[0]["coverage"]
    quarel = second["per_domain"]["quarel"]
    assert quarel["coverage"] >= quarel["coverage_before"]
    assert storage.list_uris(storage.join(store, "cache", "embeddings"))

    # round 1's synthesize rewrites round 0's gaps (AITP): its reader takes the rows as written
    next_round = StageContext(stage="synthesize", spec=parse_spec(spec), round=1, run_uri=run_uri,
                              model=None, scratch=str(tmp_path / "scratch"))
    assert [doc.id for doc in read_gaps(next_round)] == first["gaps"]["ids"]


def test_stage_fails_on_a_bad_reference_with_file_and_line(tmp_path):
    store = (tmp_path / "store").as_uri()
    bad = tmp_path / "ref.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    proc, result = run_stage(aitp_spec(store, seeds, bad.as_uri(), gaps=1), 0,
                             f"{store}/default/bad", tmp_path)
    assert proc.returncode == 2
    assert f"{bad.as_uri()}:2: invalid JSON" in result["error"]
