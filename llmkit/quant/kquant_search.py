"""The scale searches of llama.cpp's reference K-quant quantizer (ggml-quants.c, `quantize_row_q{4,5,6}_K_ref`, the
path `llama-quantize` takes without an importance matrix), written from their description and vectorised over
sub-blocks: every function takes a (n_sub_blocks, n) float32 array and treats each row on its own.

Arithmetic is float32 in the C order of operations (products left to right, sums accumulated one element after the
other with `np.add.accumulate`, not numpy's pairwise `sum`), and C's `nearest_int` (float32 round half to even) is
`np.rint`, so a row takes the same decisions as the C loop does (see `kquants` for what that buys and its limits).

- `min_scale_search` (llama.cpp's `make_qkx2_quants`), for Q4_K and Q5_K: an asymmetric grid x ~ scale * l + min with
  l in [0, nmax] and min <= 0. Start from the min/max grid, then try nstep + 1 inverse scales
  (nmax + rmin + rdelta * i) / (max - min); for each, round the codes and solve the weighted least squares for scale
  and min (min clamped to 0, then scale = sum w l x / sum w l^2); keep the fit with the lowest sum w (x - x_hat)^2.
  The best min so far replaces the starting min in later tries (as in C).
- `symmetric_scale_search` (llama.cpp's `make_qx_quants`, rmse_type 1), for Q6_K: a symmetric grid x ~ scale * l with
  l in [-nmax, nmax - 1], the largest |x| mapped to -nmax; try the inverse scales -(nmax + 0.1 i) / max for i in
  -9..9 and keep the one whose least-squares scale sum w x l / sum w l^2 (w = x^2) explains most, sum(w x l)^2 / sum w l^2.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml's "all zero" threshold for a group's largest |x|


def seq_sum(values: np.ndarray) -> np.ndarray:
    """Sum over the last axis in float32, one element after the other from the first (C's `s += v` loop)."""
    return np.add.accumulate(values, axis=-1, dtype=F32)[..., -1]


def round_clamp(values: np.ndarray, low: int, high: int) -> np.ndarray:
    """C's MAX(low, MIN(high, nearest_int(v))) as float32; NaN (a degenerate fit) goes to `low`. Clamping before
    rounding is the same for integer bounds and keeps huge values in range."""
    return np.rint(np.clip(np.nan_to_num(values, nan=low), low, high)).astype(F32)


def min_scale_search(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, -min, codes) per row of `x` (n_rows, n) for the grid scale * l + min, l in 0..nmax (see module doc).

    Returns float32 scale (n_rows,), float32 the_min = -min >= 0 (n_rows,) and uint8 codes (n_rows, n). nstep < 1 gives
    the plain min/max grid (round to nearest, no search). Rows whose max equals their min (min clamped to <= 0) get
    scale 0, codes 0 and the_min = -min, as in C."""
    x = x.astype(F32, copy=False)
    w = weights.astype(F32, copy=False)
    low = np.minimum(x.min(axis=-1), F32(0))  # (n_rows,), "min" in C, updated by the search
    high = x.max(axis=-1)
    sum_w, sum_x = seq_sum(w), seq_sum(w * x)
    flat = high == low
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = np.where(flat, F32(1), high - low)
        inverse = F32(nmax) / span
        scale = F32(1) / inverse
        codes = round_clamp(inverse[:, None] * (x - low[:, None]), 0, nmax)
        diff = scale[:, None] * codes + low[:, None] - x
        best = seq_sum(w * (diff * diff))
        for step in range(nstep + 1 if nstep >= 1 else 0):
            inverse = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (high - low)
            trial = round_clamp(inverse[:, None] * (x - low[:, None]), 0, nmax)
            wl = w * trial
            sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * trial), seq_sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0  # the grid must reach down to 0: drop the offset, refit the scale alone
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            diff = this_scale[:, None] * trial + this_min[:, None] - x
            error = seq_sum(w * (diff * diff))
            better = ~flat & (det > 0) & (error < best)
            codes = np.where(better[:, None], trial, codes)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    scale = np.where(flat, F32(0), scale).astype(F32)
    codes = np.where(flat[:, None], F32(0), codes)
    return scale, (-low).astype(F32), codes.astype(np.uint8)


def symmetric_scale_search(x: np.ndarray, nmax: int, search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scale, codes + nmax) per row of `x` (n_rows, n) for the grid scale * l, l in -nmax..nmax-1 (see module doc).

    Returns float32 scale (n_rows,), signed (its sign maps the largest |x| to -nmax), and uint8 codes l + nmax
    (n_rows, n). search=False gives the plain absmax grid, scale = max / -nmax. Rows with max |x| < 1e-15 get scale 0
    and codes 0, as in C."""
    x = x.astype(F32, copy=False)
    rows = np.arange(x.shape[0])
    peak = x[rows, np.abs(x).argmax(axis=-1)]  # signed value of largest magnitude, first one on ties ("max" in C)
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = F32(-nmax) / peak
        codes = round_clamp(inverse[:, None] * x, -nmax, nmax - 1)
        if not search:
            return np.where(zero, F32(0), F32(1) / inverse), np.where(zero[:, None], 0, codes + nmax).astype(np.uint8)
        sum_lx, sum_l2 = seq_sum(w * x * codes), seq_sum(w * codes * codes)
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, F32(0))
        best = scale * sum_lx
        for step in (*range(-9, 0), *range(1, 10)):
            inverse = -(F32(nmax) + F32(0.1) * F32(step)) / peak
            trial = round_clamp(inverse[:, None] * x, -nmax, nmax - 1)
            sum_lx, sum_l2 = seq_sum(w * x * trial), seq_sum(w * trial * trial)
            better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
            codes = np.where(better[:, None], trial, codes)
            scale = np.where(better, sum_lx / sum_l2, scale)
            best = np.where(better, scale * sum_lx, best)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, codes + nmax).astype(np.uint8)
