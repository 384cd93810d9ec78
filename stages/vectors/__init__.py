"""Embeddings and k-nearest-neighbour search, and the coverage analysis built on them."""
