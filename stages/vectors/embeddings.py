"""Sentence embeddings with a content-keyed cache in storage: an unchanged corpus (the reference,
an earlier round's data) is embedded once per storage, whichever run or command asks."""
from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from ..runtime import storage

log = logging.getLogger(__name__)

BATCH_SIZE = 128


class Embedder:
    """A sentence-transformers model (on the GPU when torch sees one); `identity` keys the cache."""

    def __init__(self, uri: str, scratch: str | Path):
        from sentence_transformers import SentenceTransformer  # loads torch: only when embedding

        self.uri = uri
        self.model = SentenceTransformer(str(storage.local_path(uri, scratch)))

    @property
    def identity(self) -> str:
        return f"{self.uri} max_seq_length={self.model.max_seq_length} normalized"

    @property
    def dimensions(self) -> int:
        return self.model.get_embedding_dimension()

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def content_key(identity: str, texts: list[str]) -> str:
    """sha256 of the embedder identity and the texts (length-prefixed, so no two lists collide)."""
    digest = hashlib.sha256(identity.encode())
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def embed(embedder: Embedder, texts: list[str], cache: str,
          scratch: str | Path) -> tuple[np.ndarray, bool]:
    """Embeddings of `texts` and whether they came from the cache, which keeps them by content key,
    so an unchanged corpus (the reference, an earlier round's data) is embedded once per storage."""
    if not texts:
        return np.zeros((0, embedder.dimensions), np.float32), False
    uri = storage.join(cache, f"{content_key(embedder.identity, texts)}.npy")
    if storage.exists(uri):
        vectors = np.load(storage.local_path(uri, scratch))
        if vectors.shape == (len(texts), embedder.dimensions):
            log.info("embeddings from cache texts=%d uri=%s", len(texts), uri)
            return vectors, True
        log.warning("cached embeddings of the wrong shape; embedding again uri=%s shape=%s",
                    uri, vectors.shape)
    log.info("embedding texts=%d embedder=%s", len(texts), embedder.uri)
    vectors = embedder.encode(texts)
    # From a file, so a large cache goes up in parts (a single PUT stops at 5 GB).
    Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".npy") as local:
        np.save(local, vectors)
        local.flush()
        storage.upload_file(local.name, uri)
    return vectors, False
