"""Deduplication: exact (hash of normalized text) and near (MinHash signatures + locality-sensitive hashing).

MinHash (Broder 1997): for a random hash function h, P[min h(A) = min h(B)] = |A & B| / |A | B| (the Jaccard
similarity of two shingle sets), so the fraction of equal entries in two signatures of `num_perm` minima estimates
it. Each "permutation" is a universal hash h(x) = (a x + b) mod (2^61 - 1) of a stable 64-bit shingle hash
(blake2b of each word, combined per word n-gram), with a, b drawn from `seed`: signatures are identical across runs
and machines. LSH (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3) cuts a signature into b bands
of r rows; two documents become candidates when any band is equal, with probability 1 - (1 - J^r)^b, an S-curve
around the threshold. b, r minimise the integrated false positive + false negative probability (as datasketch does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from functools import lru_cache

import numpy as np

from llmkit.errors import LlmkitError

MERSENNE_PRIME = (1 << 61) - 1  # modulus of the universal hash family
_PRIME = np.uint64(MERSENNE_PRIME)
_LOW_32 = np.uint64(0xFFFFFFFF)
_LOW_29 = np.uint64((1 << 29) - 1)
_SHINGLE_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd constant combining word hashes into an n-gram hash
_SHINGLE_CHUNK = 4096  # shingles hashed at once: temporaries stay (num_perm, 4096) uint64
_INTEGRATION_POINTS = 1001


def normalize_text(text: str) -> str:
    """Lowercase with runs of whitespace collapsed to one space: what exact deduplication compares."""
    return " ".join(text.lower().split())


class ExactDeduplicator:
    """Remembers a 128-bit blake2b digest of each normalized text it has seen (16 bytes per document)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        """True when an equal text (ignoring case and whitespace) was seen before; otherwise remember this one."""
        digest = hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False

    def __len__(self) -> int:
        return len(self._seen)


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents of Jaccard `similarity` share at least one LSH band) = 1 - (1 - s^rows)^bands."""
    return 1 - (1 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


def optimal_bands(
    threshold: float, num_perm: int, false_positive_weight: float = 0.5, false_negative_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted areas of false positives (below the
    threshold) and false negatives (above it) under the candidate S-curve."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    bands, rows = pairs[:, :1], pairs[:, 1:]  # (pairs, 1) each, broadcast against the similarity grid

    def area(low: float, high: float, negative: bool) -> np.ndarray:
        grid = np.linspace(low, high, _INTEGRATION_POINTS)
        probability = candidate_probability(grid, bands, rows)  # (pairs, points)
        values = 1 - probability if negative else probability
        return (values[:, 1:] + values[:, :-1]).sum(axis=1) * (high - low) / (2 * (_INTEGRATION_POINTS - 1))

    error = false_positive_weight * area(0.0, threshold, False) + false_negative_weight * area(threshold, 1.0, True)
    best = int(np.argmin(error))  # first minimum: the fewest bands among equals
    return int(pairs[best, 0]), int(pairs[best, 1])


class MinHashDeduplicator:
    """Near-duplicate finder: MinHash signatures of word n-gram shingles, indexed by LSH bands.

    Keeps every signature it has added (num_perm * 8 bytes per kept document) to confirm candidates.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 0) -> None:
        if not 0 < threshold <= 1:
            raise LlmkitError(f"near-duplicate threshold must be in (0, 1], not {threshold}: e.g. 0.8 (Jaccard similarity)")
        if num_perm < 2 or ngram < 1:
            raise LlmkitError(f"MinHash needs num_perm >= 2 and ngram >= 1 (got num_perm={num_perm}, ngram={ngram})")
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, MERSENNE_PRIME, size=(num_perm, 1), dtype=np.uint64)  # (num_perm, 1)
        self._b = rng.integers(0, MERSENNE_PRIME, size=(num_perm, 1), dtype=np.uint64)
        self._band_mixers = rng.integers(1, 1 << 63, size=self.rows, dtype=np.uint64) | np.uint64(1)
        self._buckets: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self._signatures: list[np.ndarray] = []
        self._keys: list[Hashable] = []

    def shingles(self, text: str) -> np.ndarray:
        """Sorted unique 61-bit hashes of the lowercased word n-grams (one shingle of all words when fewer than n)."""
        words = text.lower().split()
        if not words:
            return np.zeros(0, dtype=np.uint64)
        n = min(self.ngram, len(words))
        word_hashes = np.fromiter(map(_word_hash, words), dtype=np.uint64, count=len(words))
        hashes = word_hashes[: len(words) - n + 1].copy()  # hashes[i] identifies words[i : i + n]
        for offset in range(1, n):
            hashes = hashes * _SHINGLE_MULTIPLIER + word_hashes[offset: len(words) - n + 1 + offset]
        return np.unique(_mod_prime(_mix64(hashes)))

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint64 minima of the hashed shingles; all 2^61 - 1 for a text without words."""
        shingles = self.shingles(text)
        signature = np.full(self.num_perm, MERSENNE_PRIME, dtype=np.uint64)
        for start in range(0, shingles.size, _SHINGLE_CHUNK):
            chunk = shingles[None, start: start + _SHINGLE_CHUNK]  # (1, chunk)
            hashed = _add_mod_prime(_mul_mod_prime(self._a, chunk), self._b)  # (num_perm, chunk)
            np.minimum(signature, hashed.min(axis=1), out=signature)
        return signature

    @staticmethod
    def estimated_jaccard(signature_a: np.ndarray, signature_b: np.ndarray) -> float:
        """Fraction of equal minima: an unbiased estimate of the shingle sets' Jaccard similarity."""
        if signature_a.shape != signature_b.shape:
            raise LlmkitError(f"signatures differ in length ({signature_a.shape} vs {signature_b.shape}): "
                              "make both with the same num_perm")
        return float(np.mean(signature_a == signature_b))

    def add_or_find(self, text: str, key: Hashable) -> Hashable | None:
        """The key of an added document whose estimated Jaccard with `text` reaches the threshold; if there is
        none, add `text` under `key` and return None. Texts without words are never near-duplicates."""
        if not text.split():
            return None
        signature = self.signature(text)
        band_keys = self._band_keys(signature)
        candidates = sorted({index for band, band_key in enumerate(band_keys)
                             for index in self._buckets[band].get(band_key, ())})  # fmt: skip
        if candidates:
            similarity = (np.stack([self._signatures[index] for index in candidates]) == signature).mean(axis=1)
            best = int(np.argmax(similarity))  # earliest added among the most similar
            if similarity[best] >= self.threshold:
                return self._keys[candidates[best]]
        index = len(self._keys)
        self._keys.append(key)
        self._signatures.append(signature)
        for band, band_key in enumerate(band_keys):
            self._buckets[band].setdefault(band_key, []).append(index)
        return None

    def __len__(self) -> int:
        return len(self._keys)

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        """One 64-bit key per band (rows mixed by odd multipliers); a collision only adds a candidate to confirm."""
        bands = signature[: self.bands * self.rows].reshape(self.bands, self.rows)  # (bands, rows)
        return (bands * self._band_mixers).sum(axis=1).tolist()


@lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the 64 output bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mod_prime(x: np.ndarray) -> np.ndarray:
    """x mod (2^61 - 1) for any uint64 x, using 2^61 = 1 (mod 2^61 - 1)."""
    x = (x & _PRIME) + (x >> np.uint64(61))  # < 2^61 + 8
    return np.where(x >= _PRIME, x - _PRIME, x)


def _mul_mod_prime(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """a * x mod (2^61 - 1) for a, x < 2^61 - 1, exact in uint64: split both into 32-bit halves and fold
    2^64 = 8 and 2^61 = 1 (mod 2^61 - 1) so no partial sum overflows."""
    a_high, a_low = a >> np.uint64(32), a & _LOW_32  # a_high < 2^29
    x_high, x_low = x >> np.uint64(32), x & _LOW_32
    high = (a_high * x_high) << np.uint64(3)  # weight 2^64 = 8; < 2^61
    middle = a_high * x_low + a_low * x_high  # weight 2^32; < 2^62
    low = a_low * x_low  # weight 1; < 2^64
    total = (high + (middle >> np.uint64(29)) + ((middle & _LOW_29) << np.uint64(32))
             + (low & _PRIME) + (low >> np.uint64(61)))  # < 2^63: fits  # fmt: skip
    return _mod_prime(total)


def _add_mod_prime(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _mod_prime(x + y)  # both < 2^61 - 1, so the sum fits in 64 bits
