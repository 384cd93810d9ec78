"""storage.py on the local filesystem and on a real S3 endpoint (moto server)."""
from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import yaml

from selfalign.stages.runtime import builtin, storage
from selfalign.stages.text.records import RecordError, load_seeds
from selfalign.stages.text.sft_data import parse_kept
from selfalign.stages.runtime.storage import StorageError
from tests.fixtures.s3 import free_port, moto_server


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    """A writable storage prefix of each kind."""
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_whole_objects_round_trip(root):
    storage.write_bytes(f"{root}/a.bin", b"\x00\x01")
    storage.write_text(f"{root}/b/c.txt", "héllo\n")
    storage.write_json(f"{root}/d.json", {"x": [1, 2], "y": "ü"})

    assert storage.read_bytes(f"{root}/a.bin") == b"\x00\x01"
    assert storage.read_text(f"{root}/b/c.txt") == "héllo\n"
    assert storage.read_json(f"{root}/d.json") == {"x": [1, 2], "y": "ü"}
    assert storage.exists(f"{root}/d.json")
    assert not storage.exists(f"{root}/nope.json")
    assert storage.list_uris(root) == [f"{root}/a.bin", f"{root}/b/c.txt", f"{root}/d.json"]
    assert storage.list_uris(f"{root}/b") == [f"{root}/b/c.txt"]


def test_jsonl_streams_with_line_numbers(root):
    rows = ({"i": i, "text": f"row {i}"} for i in range(5))  # a generator: written as it comes
    assert storage.write_jsonl(f"{root}/rows.jsonl", rows) == 5
    assert list(storage.iter_jsonl(f"{root}/rows.jsonl")) == [(i + 1, {"i": i, "text": f"row {i}"}) for i in range(5)]

    storage.write_text(f"{root}/gaps.jsonl", '{"a": 1}\n\n  \n{"a": 2}\n')
    assert list(storage.iter_jsonl(f"{root}/gaps.jsonl")) == [(1, {"a": 1}), (4, {"a": 2})]


def test_jsonl_line_splitting_survives_chunk_boundaries():
    chunks = [b'{"a"', b': 1}\n{"a": 2', b"}\n", b'{"a": 3}']
    assert [json.loads(line) for line in storage._split_lines(chunks)] == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_broken_json_names_the_uri(root):
    storage.write_text(f"{root}/m.json", '{"a": ')
    with pytest.raises(RecordError, match=f"^{root}/m.json: invalid JSON"):
        storage.read_json(f"{root}/m.json")


@pytest.mark.parametrize("content, why", [
    ('{"a": 1}\n{"a": \n', "invalid JSON"),
    ('{"a": 1}\n[1, 2]\n', "expected a JSON object"),
])
def test_broken_jsonl_line_names_uri_and_line(root, content, why):
    uri = f"{root}/bad.jsonl"
    storage.write_text(uri, content)
    with pytest.raises(RecordError, match=f"^{uri}:2: {why}"):
        list(storage.iter_jsonl(uri))


def test_missing_object_names_the_uri(root):
    uri = f"{root}/missing.json"
    for read in (storage.read_bytes, storage.read_json, lambda u: list(storage.iter_jsonl(u))):
        with pytest.raises(StorageError, match=f"missing object: {uri}"):
            read(uri)


def test_missing_bucket_names_the_uri(s3_server):
    with pytest.raises(StorageError, match="missing bucket: s3://no-such-bucket/x"):
        storage.read_text("s3://no-such-bucket/x")
    with pytest.raises(StorageError, match="missing bucket: s3://no-such-bucket/y"):
        storage.write_text("s3://no-such-bucket/y", "text")


def test_file_writes_are_atomic(tmp_path):
    uri = (tmp_path / "out.jsonl").as_uri()
    storage.write_jsonl(uri, [{"old": True}])

    def dies_half_way():
        yield {"new": 1}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        storage.write_jsonl(uri, dies_half_way())
    assert list(storage.iter_jsonl(uri)) == [(1, {"old": True})]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_unreachable_endpoint_names_it(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(StorageError, match=f"storage endpoint unreachable: {endpoint}"):
        storage.read_text("s3://bucket/key.txt")


def test_refused_credentials_say_so(monkeypatch):
    """moto checks keys against its IAM users once INITIAL_NO_AUTH_ACTION_COUNT runs out."""
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        with pytest.raises(StorageError, match=r"storage credentials refused \(InvalidAccessKeyId\)"):
            storage.write_text("s3://bucket/key.txt", "x")


def test_absent_credentials_say_which_variables(monkeypatch, tmp_path, s3_server):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match=r"no storage credentials .* AWS_ACCESS_KEY_ID"):
        storage.read_text("s3://bucket/key.txt")


def test_dirs_upload_and_download(tmp_path, root):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"w" * 1000)
    storage.upload_dir(src, f"{root}/model")
    assert storage.list_uris(f"{root}/model") == [f"{root}/model/config.json", f"{root}/model/sub/weights.bin"]

    storage.download_dir(f"{root}/model", tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "weights.bin").read_bytes() == b"w" * 1000
    with pytest.raises(StorageError, match=f"missing object: {root}/none"):
        storage.download_dir(f"{root}/none", tmp_path / "dst2")


def test_delete_dir_removes_the_folder_and_nothing_beside_it(tmp_path, root, monkeypatch):
    monkeypatch.setattr(storage, "S3_DELETE_BATCH", 1)  # each key its own request: every batch is sent
    for name in ("run/checkpoint-1/a.bin", "run/checkpoint-1/sub/b.bin", "run/checkpoint-10/a.bin"):
        storage.write_text(f"{root}/{name}", name)
    storage.delete_dir(f"{root}/run/checkpoint-1")
    assert storage.list_uris(f"{root}/run") == [f"{root}/run/checkpoint-10/a.bin"]
    storage.delete_dir(f"{root}/run/checkpoint-1")  # already gone: nothing to do


def test_local_path_downloads_s3_once(tmp_path, s3_bucket, sent):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"k": 1}')
    storage.upload_dir(src, f"{s3_bucket}/models/m")
    storage.write_text(f"{s3_bucket}/corpus.jsonl", '{"text": "t"}\n')

    model = storage.local_path(f"{s3_bucket}/models/m", tmp_path / "scratch")
    corpus = storage.local_path(f"{s3_bucket}/corpus.jsonl", tmp_path / "scratch")
    assert (model / "config.json").read_text() == '{"k": 1}'
    assert model.parent == tmp_path / "scratch" / "cache"
    assert corpus.read_text() == '{"text": "t"}\n'

    sent.clear()  # a second call only looks at what the URI holds now: nothing is read again
    assert storage.local_path(f"{s3_bucket}/models/m", tmp_path / "scratch") == model
    assert storage.local_path(f"{s3_bucket}/corpus.jsonl", tmp_path / "scratch") == corpus
    assert {operation for operation, _ in sent} == {"ListObjectsV2", "HeadObject"}
    assert (model / "config.json").read_text() == '{"k": 1}'


def test_a_model_written_again_under_its_uri_is_downloaded_again(tmp_path, s3_bucket):
    """The cache is keyed by content (keys, sizes, ETags): a persistent cache never serves a stale copy."""
    storage.write_text(f"{s3_bucket}/models/m/config.json", '{"k": 1}')
    first = storage.local_path(f"{s3_bucket}/models/m", tmp_path)
    storage.write_text(f"{s3_bucket}/models/m/config.json", '{"k": 2}')
    second = storage.local_path(f"{s3_bucket}/models/m", tmp_path)
    assert second != first
    assert (first / "config.json").read_text() == '{"k": 1}'  # a reader of the old copy keeps it
    assert (second / "config.json").read_text() == '{"k": 2}'


def test_local_path_of_a_missing_s3_model_names_it(tmp_path, s3_bucket):
    with pytest.raises(StorageError, match=f"missing object: {s3_bucket}/models/absent"):
        storage.local_path(f"{s3_bucket}/models/absent", tmp_path)


def test_local_path_redoes_an_unfinished_download(tmp_path, s3_bucket):
    storage.write_text(f"{s3_bucket}/m/config.json", "{}")
    first = storage.local_path(f"{s3_bucket}/m", tmp_path)
    (first / storage.COMPLETE_MARKER).unlink()  # as if the pod died before the marker
    (first / "partial.tmp").write_text("junk")
    again = storage.local_path(f"{s3_bucket}/m", tmp_path)
    assert again == first
    assert sorted(p.name for p in again.iterdir()) == [storage.COMPLETE_MARKER, "config.json"]


def test_local_path_other_schemes(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    assert storage.local_path((tmp_path / "m").as_uri(), tmp_path) == tmp_path / "m"
    with pytest.raises(StorageError, match="missing object: file://"):
        storage.local_path((tmp_path / "absent").as_uri(), tmp_path)
    with pytest.raises(StorageError, match="looked in /mnt/pvc/claim/models/m"):
        storage.local_path("pvc://claim/models/m", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StorageError, match="cannot download hf://org/name"):
        storage.local_path("hf://org/name", tmp_path)
    with pytest.raises(StorageError, match="unsupported model URI"):
        storage.local_path("ftp://host/m", tmp_path)


def test_builtin_models(tmp_path, monkeypatch):
    minilm = storage.local_path("builtin://all-minilm-l6-v2", tmp_path)
    assert (minilm / "config.json").is_file()
    with pytest.raises(StorageError, match="unknown builtin 'gpt-9'; known: all-minilm-l6-v2, smollm2-135m-instruct, tiny-llama, self-instruct-seeds"):
        storage.local_path("builtin://gpt-9", tmp_path)
    assert storage.local_path("builtin://reference-sample", tmp_path).is_file()

    tiny = storage.local_path("builtin://tiny-llama", tmp_path)
    assert tiny == tmp_path / "builtin" / "tiny-llama"
    assert (tiny / "config.json").is_file() and (tiny / "tokenizer.json").is_file()

    def no_rebuild(_):
        raise AssertionError("built twice")

    monkeypatch.setattr("selfalign.stages.models.tiny_model.build_tiny_llama", no_rebuild)
    assert builtin.materialize("tiny-llama", tmp_path) == tiny


def test_the_packaged_seeds_split_into_150_train_tasks_and_25_held_out_rows():
    """Every 7th seed task (lines 7, 14, ..., 175) is held out as an Alpaca row from its first
    instance; the train seeds are the other 150 lines, unchanged: disjoint, nothing lost."""
    tasks = [row for _, row in storage.iter_jsonl("builtin://self-instruct-seeds")]
    train = [row for _, row in storage.iter_jsonl("builtin://self-instruct-seeds-train")]
    heldout = [row for _, row in storage.iter_jsonl("builtin://self-instruct-heldout")]
    assert (len(train), len(heldout)) == (150, 25)
    assert train == [task for i, task in enumerate(tasks) if i % 7 != 6]
    assert heldout == [{"instruction": task["instruction"], "input": task["instances"][0]["input"],
                        "output": task["instances"][0]["output"]} for task in tasks[6::7]]
    assert not {row["instruction"] for row in heldout} & {task["instruction"] for task in train}
    assert parse_kept(enumerate(heldout, 1), "heldout")  # rows the evaluation reads


def test_the_smol_example_evaluates_on_rows_disjoint_from_its_seeds():
    spec = yaml.safe_load((Path(__file__).parents[1] / "examples" / "smol.yaml").read_text())["spec"]
    seeds = {seed.instruction for seed in load_seeds(spec["seeds"])}
    heldout = [row["instruction"] for _, row in storage.iter_jsonl(spec["evaluate"]["data"])]
    assert len(heldout) == 25 and not set(heldout) & seeds


def test_packaged_data_and_mounted_claims_read_like_files(tmp_path, monkeypatch):
    seeds = load_seeds("builtin://self-instruct-seeds")
    assert len(seeds) == 175
    reference = list(storage.iter_jsonl("builtin://reference-sample"))
    assert len(reference) == 335 and {"id", "domain", "text"} <= reference[0][1].keys()
    assert len({row["domain"] for _, row in reference}) == 29
    monkeypatch.setattr(storage, "PVC_ROOT", tmp_path)
    (tmp_path / "claim" / "data").mkdir(parents=True)
    (tmp_path / "claim" / "data" / "x.jsonl").write_text('{"a": 1}\n')
    assert storage.exists("pvc://claim/data/x.jsonl")
    assert list(storage.iter_jsonl("pvc://claim/data/x.jsonl")) == [(1, {"a": 1})]
    with pytest.raises(storage.StorageError, match="unknown builtin data"):
        storage.read_bytes("builtin://nope")


def _fetch_model(uri: str, scratch: str, start, downloads, results) -> None:
    """One rank of a node: wait for the others, then ask for the model at once (a spawned process)."""
    real = storage._download_s3

    def counted(*args, **kwargs):
        with downloads.get_lock():
            downloads.value += 1
        return real(*args, **kwargs)

    storage._download_s3 = counted
    start.wait()
    try:
        path = storage.local_path(uri, scratch)
        results.put(("ok", str(path), sorted((p.name, p.read_bytes()) for p in path.iterdir())))
    except Exception as exc:  # reported to the test, which names it
        results.put(("error", f"{type(exc).__name__}: {exc}", []))


def test_ranks_of_one_node_share_one_download(tmp_path, s3_bucket):
    """Eight ranks ask for the same s3:// model at once: one downloads, the others wait and reuse it."""
    import multiprocessing

    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"shard-{i:02d}.bin").write_bytes(bytes([i]) * 200_000)
    storage.upload_dir(src, f"{s3_bucket}/models/m")
    expected = sorted((p.name, p.read_bytes()) for p in src.iterdir())

    spawn = multiprocessing.get_context("spawn")
    ranks = 8
    start, downloads, results = spawn.Barrier(ranks), spawn.Value("i", 0), spawn.Queue()
    procs = [spawn.Process(target=_fetch_model, args=(f"{s3_bucket}/models/m", str(tmp_path / "scratch"),
                                                      start, downloads, results)) for _ in range(ranks)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)

    assert [status for status, _, _ in outcomes] == ["ok"] * ranks, [why for _, why, _ in outcomes]
    assert len({path for _, path, _ in outcomes}) == 1
    assert all(files == sorted(expected + [(storage.COMPLETE_MARKER, b"")]) for _, _, files in outcomes)
    assert downloads.value == 1
    cache = tmp_path / "scratch" / "cache"
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [Path(outcomes[0][1]).name]  # no staging left


@pytest.fixture
def sent(monkeypatch):
    """(operation, headers) of every request the storage client sends, recorded as it goes out."""
    requests: list[tuple[str, dict]] = []

    def record(request, event_name, **_):
        requests.append((event_name.rsplit(".", 1)[-1], {k.lower(): v for k, v in request.headers.items()}))

    clients = []
    real = storage._client_for

    def recording(settings):
        client = real(settings)
        if client not in clients:
            client.meta.events.register("before-send.s3", record)
            clients.append(client)
        return client

    monkeypatch.setattr(storage, "_client_for", recording)
    yield requests
    for client in clients:
        client.meta.events.unregister("before-send.s3", record)


def _checksum_headers(headers: dict) -> list[str]:
    return [k for k in headers if k.startswith("x-amz-checksum") or k in ("x-amz-sdk-checksum-algorithm", "x-amz-trailer")]


def test_a_custom_endpoint_gets_no_checksum_headers_and_large_objects_go_in_parts(tmp_path, s3_bucket, sent,
                                                                                  monkeypatch):
    """MinIO and Ceph RGW refuse boto3's default CRC32 headers: none is sent to a custom endpoint."""
    from boto3.s3.transfer import TransferConfig

    part = 5 * 1024 * 1024  # S3's smallest part
    monkeypatch.setattr(storage, "TRANSFER", TransferConfig(multipart_threshold=part, multipart_chunksize=part))
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (2 * part + 10))
    storage.write_json(f"{s3_bucket}/small.json", {"a": 1})
    storage.upload_file(big, f"{s3_bucket}/big.bin")
    storage.write_jsonl(f"{s3_bucket}/rows.jsonl", ({"i": i} for i in range(3)))
    storage.download_dir(s3_bucket, tmp_path / "copy")
    storage.delete_dir(s3_bucket)

    operations = [op for op, _ in sent]
    assert {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "GetObject",
            "DeleteObjects"} <= set(operations)
    assert operations.count("UploadPart") == 3  # the big file in three parts, never one PUT
    assert (tmp_path / "copy" / "big.bin").read_bytes() == big.read_bytes()
    uploads = [(op, headers) for op, headers in sent if op in ("PutObject", "UploadPart", "CreateMultipartUpload")]
    assert [(op, _checksum_headers(headers)) for op, headers in uploads] == [(op, []) for op, _ in uploads]
    assert all("x-amz-checksum-mode" not in headers for op, headers in sent if op == "GetObject")
    # DeleteObjects needs a body checksum: Content-MD5, which every S3-compatible store knows, goes too.
    assert all("content-md5" in headers for op, headers in sent if op == "DeleteObjects")


class _Sent(Exception):
    """Raised by a before-send hook: the request was built and recorded, and goes nowhere."""


@pytest.mark.parametrize("endpoint, override, checksummed", [
    (None, None, True),  # AWS itself: boto3's default CRC32
    ("http://minio.storage:9000", None, False),
    ("http://minio.storage:9000", "when_supported", True),  # the AWS_* variable still decides
])
def test_checksums_follow_the_endpoint_unless_the_environment_says(monkeypatch, endpoint, override, checksummed):
    for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_REQUEST_CHECKSUM_CALCULATION", override)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    headers = {}

    def capture(request, **_):
        headers.update({k.lower(): v for k, v in request.headers.items()})
        raise _Sent

    client = storage._client()
    client.meta.events.register("before-send.s3", capture)
    try:
        with pytest.raises(_Sent):
            storage.write_bytes("s3://bucket/key", b"data")
    finally:
        client.meta.events.unregister("before-send.s3", capture)
    assert bool(_checksum_headers(headers)) is checksummed, headers


def test_the_embedding_cache_goes_up_from_a_file(tmp_path, s3_bucket, monkeypatch):
    import numpy as np

    from selfalign.stages.vectors import embeddings

    class Embedder:
        uri, identity, dimensions = "builtin://fake", "fake", 3

        def encode(self, texts):
            return np.ones((len(texts), 3), np.float32)

    uploaded = []
    real = storage.upload_file
    monkeypatch.setattr(storage, "upload_file", lambda path, uri: (uploaded.append(uri), real(path, uri)))
    monkeypatch.setattr(storage, "write_bytes", None)  # one PUT from memory: not used
    vectors, cached = embeddings.embed(Embedder(), ["a", "b"], f"{s3_bucket}/cache", tmp_path)
    assert not cached and len(uploaded) == 1
    again, cached = embeddings.embed(Embedder(), ["a", "b"], f"{s3_bucket}/cache", tmp_path)
    assert cached and (again == vectors).all()
