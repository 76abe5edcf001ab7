"""Exact and near-duplicate images, within a split and across train and test (leakage).

Exact: the same pixels after decoding (a SHA-256 of the decoded array), whatever the file
format, name or metadata. Near: a 64-bit DCT perceptual hash (`imagehash.phash`) of the whole
image and of its centred 90% and 80% squares; two images are near-duplicates when the whole of
one is within NEAR_BITS bits of the whole, or of a centred crop, of the other. A JPEG re-encode
or a resize moves the whole-image hash by 0-2 bits; a centred crop of up to about 10% per side
lands within a few bits of one of the crops' hashes, where the whole-image hash alone drifts
10-20 bits (measured on the flowers photos, bench/audit.py).

Why hashes rather than a model's embeddings: they need no model (the audit runs before there
is one), they find copies rather than look-alikes (two different daisies are close in any good
embedding, and a CIFAR-10 model's features say little about photos), and they are 8 bytes an
image. The pair search compares packed 64-bit hashes in blocks with a vectorised popcount:
still all pairs, but about 10 ns a pair in numpy (0.5 s of CPU for 10,000 images), so 50,000
take about 12 s, not hours.
"""

from __future__ import annotations

import numpy as np

NEAR_BITS = 8  # Hamming distance (of 64) at or below which two hashes mark a near-duplicate
BLOCK_CELLS = 1 << 22  # hash pairs compared per numpy step: (rows x N) uint64, about 32 MB


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element, as uint8."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    as_bytes = x.view(np.uint8).reshape(*x.shape, 8)
    return _BYTE_BITS[as_bytes].sum(axis=-1, dtype=np.uint8)


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def exact_groups(digests: list[bytes]) -> list[list[int]]:
    """Indices of images with identical pixels, groups of two or more, in index order."""
    by_digest: dict[bytes, list[int]] = {}
    for i, d in enumerate(digests):
        by_digest.setdefault(d, []).append(i)
    return sorted((g for g in by_digest.values() if len(g) > 1), key=lambda g: g[0])


def near_pairs(hashes: np.ndarray, max_bits: int = NEAR_BITS) -> list[tuple[int, int, int]]:
    """(i, j, bits) with i < j for every pair whose hashes are within `max_bits`.

    hashes: (N, K) uint64, column 0 the whole image, the others centred crops. A pair's
    distance is the least over (whole i, any of j) and (any of i, whole j).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n, k = hashes.shape
    whole = hashes[:, 0]
    rows = max(1, BLOCK_CELLS // max(1, n * k))
    found: list[tuple[int, int, int]] = []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        # (rows, N - start): this block's whole hash against every hash of this and every later
        # image, and every hash of this block against their whole hash (pairs i < j only).
        later, later_whole = hashes[start:], whole[start:, None].T
        block = _popcount(whole[start:stop, None] ^ later_whole)
        for c in range(1, k):
            np.minimum(block, _popcount(whole[start:stop, None] ^ later[None, :, c]), out=block)
            np.minimum(block, _popcount(hashes[start:stop, c, None] ^ later_whole), out=block)
        i, j = np.nonzero(block <= max_bits)
        keep = j > i
        i, j = i[keep], j[keep]
        found += zip((i + start).tolist(), (j + start).tolist(), block[i, j].tolist(),
                     strict=True)
    return found


def find_duplicates(digests: list[bytes], hashes: np.ndarray, splits: list[str],
                    max_bits: int = NEAR_BITS) -> dict[str, list]:
    """{"exact": groups of indices, "near": [(i, j, bits)] not already exact,
    "leakage": [(train index, test index, bits)], 0 bits for exact copies}."""
    exact = exact_groups(digests)
    same = {i: g[0] for g in exact for i in g}  # image -> first of its exact group
    near = [(i, j, d) for i, j, d in near_pairs(hashes, max_bits)
            if same.get(i, i) != same.get(j, j)]
    leaks: set[tuple[int, int, int]] = set()
    for group in exact:
        for i in group:
            for j in group:
                if splits[i] == "train" and splits[j] == "test":
                    leaks.add((i, j, 0))
    for i, j, d in near:
        if {splits[i], splits[j]} == {"train", "test"}:
            leaks.add((i, j, d) if splits[i] == "train" else (j, i, d))
    return {"exact": exact, "near": near, "leakage": sorted(leaks)}
