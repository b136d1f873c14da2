"""The latent space of the val samples: standardising, a 2-D map, unsupervised clusters,
their medoids and representatives, and nearest neighbours ("fetch similars").

Everything here works on arrays in memory of shape (samples, latent dims): one pooled
vector per image (a few thousand floats), never a per-pixel map, so 40k images fit.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.cluster import HDBSCAN, KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import pairwise_distances_chunked, silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

NOISE = -1                 # HDBSCAN's label for samples in no cluster
SILHOUETTE_SAMPLE = 4000   # silhouette is O(n^2): scored on a seeded subset beyond this


def standardise(latents: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance per dimension (constant dimensions stay 0)."""
    return StandardScaler().fit_transform(np.asarray(latents, np.float64)).astype(np.float32)


def reduce(scaled: np.ndarray, max_dims: int, seed: int) -> np.ndarray:
    """PCA to at most max_dims components (fewer when there are fewer samples)."""
    pca = _pca(scaled, max_dims, seed)
    return scaled if pca is None else pca.fit_transform(scaled)


def _pca(scaled: np.ndarray, max_dims: int, seed: int) -> PCA | None:
    """The PCA reduce() fits, or None when it would keep every dimension."""
    n_components = int(min(max_dims, scaled.shape[0] - 1, scaled.shape[1]))
    if n_components >= scaled.shape[1]:
        return None
    return PCA(n_components=max(n_components, 1), random_state=seed)


def fit_space(latents: np.ndarray, max_dims: int,
              seed: int) -> tuple[np.ndarray, np.ndarray, Callable]:
    """standardise(latents) and reduce() of it, and a function putting other vectors (the
    train split's) through the same fitted scaler and PCA, returning (standardised,
    reduced): train images are counted and measured in the space the val images were
    clustered in."""
    scaler = StandardScaler().fit(np.asarray(latents, np.float64))
    scaled = scaler.transform(np.asarray(latents, np.float64)).astype(np.float32)
    pca = _pca(scaled, max_dims, seed)
    reduced = scaled if pca is None else pca.fit_transform(scaled)

    def transform(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(vectors):   # scikit-learn refuses zero rows
            return (np.empty((0, scaled.shape[1]), np.float32),
                    np.empty((0, reduced.shape[1]), np.float32))
        other = scaler.transform(np.asarray(vectors, np.float64)).astype(np.float32)
        return other, other if pca is None else pca.transform(other)

    return scaled, reduced, transform


def project(scaled: np.ndarray, reduced: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates: PCA of the standardised vectors, or t-SNE / UMAP of the reduced ones."""
    n = len(scaled)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(scaled)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (n - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca",
                    random_state=seed).fit_transform(reduced)
    if method == "umap":
        import umap  # imported on demand: numba compiles on first import (seconds)

        return umap.UMAP(n_components=2, n_neighbors=int(min(15, n - 1)), random_state=seed,
                         n_jobs=1,
                         init="random" if n < 10 else "spectral").fit_transform(reduced)
    raise ValueError(f"analyze.projection: unknown method {method!r}")


def kmeans_by_silhouette(points: np.ndarray, k_min: int, k_max: int,
                         seed: int) -> tuple[np.ndarray, dict[int, float]]:
    """k-means for every k in [k_min, k_max] (capped at n - 1); the labels of the k with
    the highest silhouette score, and every k's score."""
    n = len(points)
    ks = [k for k in range(k_min, min(k_max, n - 1) + 1)] or [min(k_min, n)]
    scored: dict[int, float] = {}
    best_labels, best = None, -np.inf
    for k in ks:
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(points)
        if len(np.unique(labels)) < 2:
            score = -1.0
        else:
            score = float(silhouette_score(points, labels,
                                           sample_size=min(n, SILHOUETTE_SAMPLE),
                                           random_state=seed))
        scored[k] = score
        if score > best:
            best_labels, best = labels, score
    return best_labels, scored


def hdbscan_labels(points: np.ndarray, min_cluster_size: int) -> np.ndarray:
    size = int(max(2, min(min_cluster_size, len(points))))
    return HDBSCAN(min_cluster_size=size, copy=True).fit_predict(points)


def medoid(points: np.ndarray) -> int:
    """Index (into points) of the member with the smallest sum of Euclidean distances to
    the others; row blocks keep memory bounded for large clusters."""
    totals = np.concatenate([block.sum(axis=1) for block in
                             pairwise_distances_chunked(points, working_memory=256)])
    return int(np.argmin(totals))


def representatives(points: np.ndarray, n: int) -> list[int]:
    """The medoid first, then the members nearest to it (indices into points)."""
    centre = medoid(points)
    distance = np.linalg.norm(points - points[centre], axis=1)
    order = [i for i in np.argsort(distance, kind="stable") if i != centre]
    return [centre, *order[: max(0, n - 1)]]


def nearest_neighbours(vectors: np.ndarray, queries: list[int],
                       k: int) -> list[list[tuple[int, float]]]:
    """For each query index, its k nearest other samples by cosine distance."""
    k = int(min(k, len(vectors) - 1))
    if k < 1 or not queries:
        return [[] for _ in queries]
    index = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(vectors)
    distances, neighbours = index.kneighbors(vectors[queries])
    result = []
    for query, dist, idx in zip(queries, distances, neighbours):
        pairs = [(int(i), float(d)) for i, d in zip(idx, dist) if i != query][:k]
        result.append(pairs)
    return result


def unit_vectors(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to length 1 (float32), and which rows have a direction (non-zero). Between
    unit vectors, cosine distance = squared Euclidean / 2, and a Euclidean search of
    NearestNeighbors runs in scikit-learn's chunked reductions (memory per chunk of
    queries), where metric="cosine" holds up to working_memory (1 GiB) of distances at once:
    1.4 GiB peak for 12k vectors, against a few MiB."""
    vectors = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    has_direction = norms > 0
    unit = np.divide(vectors, norms[:, None], out=np.zeros_like(vectors),
                     where=has_direction[:, None])
    return unit.astype(np.float32), has_direction

