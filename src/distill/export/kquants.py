"""GGML K-quant (Q2_K..Q6_K), non-linear 4-bit (IQ4_NL, IQ4_XS) and importance-weighted legacy (Q4_0..Q5_1)
block quantizers in numpy.

The `gguf` package dequantizes these types but cannot write them. This is llama.cpp's own algorithm
(ggml-quants.c: `quantize_row_qN_K_ref` without an importance matrix, `quantize_row_qN_K_impl` with one; the
search helpers `make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`, `make_qkx3_quants`, `make_qp_quants`;
`quantize_iq4_nl`/`quantize_iq4_xs` through `quantize_row_iq4_nl_impl`, with an importance matrix or without)
vectorised over blocks, in float32 like the C code, into llama.cpp's block layout byte for byte. Sums run in C's
order (`_sum`: numpy's own sum is pairwise, which flipped near-ties between candidate scales in 0-3% of blocks),
so every block equals llama.cpp's in the tests.

An importance matrix is one non-negative weight per input column (the mean squared activation that column
sees); with one, every type is quantized by llama.cpp's weighted path, which minimises the weighted error.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

Q = GGMLQuantizationType
QK_K = 256
K_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
WEIGHTED_LEGACY = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
IQ4_TYPES = (Q.IQ4_NL, Q.IQ4_XS)
GROUP_MAX_EPS = np.float32(1e-15)
CHUNK_ELEMENTS = 1 << 21  # rows quantized at once: bounds the temporaries to a few hundred MB
f32 = np.float32


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """data (rows x columns, float) in qtype as uint8 of `gguf.quants`' byte shape; imatrix: one weight per column."""
    data = np.asarray(data, dtype=np.float32)
    rows = data.reshape(-1, data.shape[-1])
    block, type_size = GGML_QUANT_SIZES[qtype]
    if qtype not in K_TYPES + IQ4_TYPES and (imatrix is None or qtype not in WEIGHTED_LEGACY):
        return quants.quantize(data, qtype)
    if rows.shape[1] % block:
        raise ValueError(f"row of {rows.shape[1]} is not a multiple of the {qtype.name} block size {block}")
    weights = None if imatrix is None else np.asarray(imatrix, dtype=np.float32).reshape(-1)
    if weights is not None and weights.shape[0] != rows.shape[1]:
        raise ValueError(f"importance matrix of {weights.shape[0]} values for rows of {rows.shape[1]}")
    out = np.empty((rows.shape[0], rows.shape[1] // block * type_size), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    with np.errstate(all="ignore"):  # the searches divide by empty ranges (flat blocks), then mask those results
        for start in range(0, rows.shape[0], step):
            out[start:start + step] = _quantize_rows(rows[start:start + step], qtype, weights)
    return out.reshape(*data.shape[:-1], -1)


def _quantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType, weights: Optional[np.ndarray]) -> np.ndarray:
    n_rows, n_cols = rows.shape
    if qtype in WEIGHTED_LEGACY:
        return _LEGACY[qtype](rows, weights).reshape(n_rows, -1)
    block = GGML_QUANT_SIZES[qtype][0]
    x = rows.reshape(-1, block)
    qw = None if weights is None else np.broadcast_to(weights.reshape(1, -1), rows.shape).reshape(-1, block)
    return _BLOCK_QUANTIZERS[qtype](x, qw).reshape(n_rows, -1)


# ------------------------------------------------------------------------------------------- helpers


def _rint(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int (round half to even), kept in float32."""
    return np.rint(v)


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v as the block's fp16 bytes, and the float32 value it stores."""
    half = np.asarray(v, dtype=np.float32).astype(np.float16)
    return half.view(np.uint8).reshape(*half.shape, 2), half.astype(np.float32)


def _sum(v: np.ndarray) -> np.ndarray:
    """Sum over the last (short) axis one value after another as C does, in float32: the same sums as llama.cpp,
    so a near-tie between two trial scales falls the same way (numpy's sum is pairwise; a loop of whole-array adds
    is 2x faster than np.cumsum here)."""
    v = np.asarray(v, dtype=np.float32)
    total = v[..., 0].copy()
    for i in range(1, v.shape[-1]):
        total += v[..., i]
    return total


def _signed_peak(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's value of largest magnitude (1 for an all-but-zero row, so dividing by it is safe) and whether
    the row is all but zero (llama.cpp's GROUP_MAX_EPS)."""
    ax = np.abs(x)
    pick = ax.argmax(axis=-1)[:, None]
    zero = np.take_along_axis(ax, pick, -1)[:, 0] < GROUP_MAX_EPS
    return np.where(zero, f32(1), np.take_along_axis(x, pick, -1)[:, 0]), zero


def _make_qx_quants(x: np.ndarray, nmax: int, qw: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale per row of x (levels -nmax..nmax-1) by weighted least squares over 19 trial scales."""
    top, zero = _signed_peak(x)
    w = x * x if qw is None else qw

    def trial(iscale):
        l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        return l, _sum(w * x * l), _sum(w * l * l)

    l, sumlx, suml2 = trial(f32(-nmax) / top)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    levels = l + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(-(f32(nmax) + f32(0.1) * f32(step)) / top)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = np.where(better[:, None], l + nmax, levels)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, f32(1)), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, f32(0), scale), np.where(zero[:, None], f32(0), levels)


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K's symmetric scale per row of x: rounding, then five passes moving single levels (weights x^2)."""
    top, zero = _signed_peak(x)
    levels = np.clip(_rint((f32(-nmax) / top)[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = _sum(w * x * levels), _sum(w * levels * levels)
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], levels[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            usable = slx > 0
            new = np.clip(_rint(xi * sl2 / np.where(usable, slx, f32(1))), -nmax, nmax - 1)
            slx_new, sl2_new = slx + wi * xi * new, sl2 + wi * new * new
            take = usable & (new != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            levels[:, i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx_new, sumlx), np.where(take, sl2_new, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    return np.where(zero, f32(0), scale), np.where(zero[:, None], f32(0), levels + nmax)


def _make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale and min per row of x (levels 0..nmax): make_qkx2/3_quants. Returns (scale, -min, levels)."""
    low = np.minimum(x.min(axis=-1), f32(0))
    high = x.max(axis=-1)
    flat = high <= low
    sum_w = _sum(w)
    sum_x = _sum(w * x)

    def error(scale, low, levels):
        diff = scale[:, None] * levels + low[:, None] - x
        return _sum(w * (np.abs(diff) if use_mad else diff * diff))

    width = np.where(flat, f32(1), high - low)
    iscale = f32(nmax) / width
    scale = f32(1) / iscale
    levels = np.clip(_rint(iscale[:, None] * (x - low[:, None])), 0, nmax)
    best = error(scale, low, levels)
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (high - low)
        v = iscale[:, None] * (x - low[:, None])
        trial = np.where(v > 0, _rint(np.minimum(v, f32(nmax))), f32(0))  # inf/nan where low reached high
        sum_l, sum_l2, sum_xl = _sum(w * trial), _sum(w * trial * trial), _sum(w * trial * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = np.where(det > 0, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_min = np.where(positive, f32(0), this_min)
        current = error(this_scale, this_min, trial)
        better = (det > 0) & (current < best)
        levels = np.where(better[:, None], trial, levels)
        best = np.where(better, current, best)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)
    return np.where(flat, f32(0), scale), -low, np.where(flat[:, None], f32(0), levels)


def _make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale for non-negative x (the sub-block scales or mins) on levels 0..nmax, weighted by qw."""
    top = np.maximum(x.max(axis=-1), f32(0))
    zero = top < GROUP_MAX_EPS
    top = np.where(zero, f32(1), top)
    iscale = f32(nmax) / top
    levels = _rint(iscale[:, None] * x)
    scale = f32(1) / iscale
    best = _sum(qw * np.square(x - scale[:, None] * levels))
    for step in range(-4, 5):
        if step == 0:
            continue
        trial_iscale = (f32(0.1) * f32(step) + f32(nmax)) / top
        trial = np.minimum(f32(nmax), _rint(trial_iscale[:, None] * x))
        mse = _sum(qw * np.square(x - (f32(1) / trial_iscale)[:, None] * trial))
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, trial_iscale, iscale)
    levels = np.minimum(f32(nmax), _rint(iscale[:, None] * x))
    sumlx, suml2 = _sum(qw * x * levels), _sum(qw * levels * levels)
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = qw[:, i], x[:, i], levels[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            usable = (slx > 0) & (sl2 > 0)
            new = np.minimum(f32(nmax), _rint(xi * sl2 / np.where(usable, slx, f32(1))))
            slx_new, sl2_new = slx + wi * xi * new, sl2 + wi * new * new
            take = usable & (new != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            levels[:, i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx_new, sumlx), np.where(take, sl2_new, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    return np.where(zero, f32(0), scale), np.where(zero[:, None], f32(0), levels)


def _requantize(x: np.ndarray, d: np.ndarray, offset: np.ndarray, lo: int, hi: int, levels: np.ndarray) -> np.ndarray:
    """Levels of x (blocks x sub-blocks x values) on the stored scales: clip(round((x + offset) / d)), kept where d=0."""
    usable = d != 0
    fresh = np.clip(_rint((x + offset[..., None]) / np.where(usable, d, f32(1))[..., None]), lo, hi)
    return np.where(usable[..., None], fresh, levels)


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """256 levels of 0..3 per block into 64 bytes: four 32-value quarters of each 128 share a byte."""
    q = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins into Q4_K/Q5_K's 12 bytes (get_scale_min_k4's inverse)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _weights_k(x: np.ndarray, qw: Optional[np.ndarray], sub: int, sigma_factor: int) -> np.ndarray:
    """The impl path's error weights: qw * sqrt(sigma2 + x^2), sigma2 = factor * mean(x^2) over the block."""
    sigma2 = f32(sigma_factor) * _sum(x * x) / f32(QK_K)
    return (qw * np.sqrt(sigma2[:, None] + x * x)).reshape(x.shape[0], -1, sub)


# ------------------------------------------------------------------------------------------- K types


def _scales_mins_k(x: np.ndarray, qw: Optional[np.ndarray], nmax: int, ref_search: tuple) -> tuple:
    """Q4_K/Q5_K: per 32-value sub-block levels, then 6-bit scales and mins. Returns (d, dmin, ls, lm, levels)."""
    nb = x.shape[0]
    xs = x.reshape(nb, 8, 32)
    if qw is None:
        av_x = np.sqrt(_sum(xs * xs) / f32(32))
        weights = av_x[..., None] + np.abs(xs)
        scales, mins, levels = _make_qkx_quants(xs.reshape(-1, 32), weights.reshape(-1, 32), nmax, *ref_search)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = np.maximum(scales.max(-1), f32(0))
        max_min = np.maximum(mins.max(-1), f32(0))
        inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
        inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
        # C stores nearest_int into a uint8 before MIN(63, .): a negative scale wraps to a large byte
        ls = np.minimum(63, _rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF)
        lm = np.minimum(63, _rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF)
        d_bytes, d = _fp16(max_scale / f32(63))
        m_bytes, dmin = _fp16(max_min / f32(63))
    else:
        weights = _weights_k(x, qw, 32, 2)
        sw = _sum(weights)
        scales, mins, levels = _make_qkx_quants(xs.reshape(-1, 32), weights.reshape(-1, 32), nmax,
                                                -0.9, 0.05, 36, False)
        d_block, ls = _make_qp_quants(scales.reshape(nb, 8), 63, sw)
        m_block, lm = _make_qp_quants(mins.reshape(nb, 8), 63, sw)
        ls, lm = np.minimum(63, ls.astype(np.int64)), np.minimum(63, lm.astype(np.int64))
        d_bytes, d = _fp16(d_block)
        m_bytes, dmin = _fp16(m_block)
    sub_d = d[:, None] * ls.astype(np.float32)
    sub_m = dmin[:, None] * lm.astype(np.float32)
    levels = _requantize(xs, sub_d, sub_m, 0, nmax, levels.reshape(nb, 8, 32))
    return d_bytes, m_bytes, _pack_k4_scales(ls, lm), levels.astype(np.uint8)


def quantize_q4_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> np.ndarray:
    """Blocks of 256 (rows of x) as block_q4_K: d, dmin, 12 scale bytes, 128 bytes of 4-bit levels."""
    d, dmin, scales, levels = _scales_mins_k(x, qw, 15, (-1.0, 0.1, 20, False))
    pairs = levels.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def quantize_q5_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> np.ndarray:
    """Blocks of 256 as block_q5_K: d, dmin, 12 scale bytes, 32 bytes of high bits, 128 bytes of low nibbles."""
    d, dmin, scales, levels = _scales_mins_k(x, qw, 31, (-0.5, 0.1, 15, False))
    pairs = levels.reshape(-1, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    high = (pairs >> 4).astype(np.uint8)  # (nb, 4, 2, 32): bit 2n + k of qh[j] for pair n, half k
    shifts = (np.arange(4)[:, None] * 2 + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.bitwise_or.reduce(high << shifts[None, :, :, None], axis=(1, 2)).astype(np.uint8)
    return np.concatenate([d, dmin, scales, qh, qs], axis=1)


def quantize_q6_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> np.ndarray:
    """Blocks of 256 as block_q6_K: 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, fp16 d."""
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    scales, levels = _make_qx_quants(xs.reshape(-1, 16), 32, None if qw is None else qw.reshape(-1, 16))
    scales, levels = scales.reshape(nb, 16), levels.reshape(nb, 16, 16)
    pick = np.abs(scales).argmax(-1)[:, None]
    max_abs = np.abs(np.take_along_axis(scales, pick, -1))[:, 0]
    max_scale = np.take_along_axis(scales, pick, -1)[:, 0]
    zero = max_abs < GROUP_MAX_EPS
    iscale = f32(-128) / np.where(zero, f32(1), max_scale)
    d_bytes, d = _fp16(np.where(zero, f32(0), f32(1) / iscale))
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
    levels = _requantize(xs, d[:, None] * sc.astype(np.float32), np.zeros((nb, 16), np.float32), -32, 31,
                         levels - 32) + 32
    q = levels.astype(np.uint8).reshape(nb, 2, 4, 32)  # (block, half of 128, quarter, 32)
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4),
                         q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d_bytes], axis=1)
    out[zero] = 0
    return out


def quantize_q3_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> np.ndarray:
    """Blocks of 256 as block_q3_K: 32 bytes high-bit mask, 64 bytes of 2-bit levels, 12 scale bytes, fp16 d."""
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    if qw is None:
        scales, levels = _make_q3_quants(xs.reshape(-1, 16), 4)
        scales = scales.reshape(nb, 16)
        pick = np.abs(scales).argmax(-1)[:, None]
        max_scale = np.take_along_axis(scales, pick, -1)[:, 0]
        nonzero = max_scale != 0
        iscale = f32(-32) / np.where(nonzero, max_scale, f32(1))
        six = np.where(nonzero[:, None], np.clip(_rint(iscale[:, None] * scales), -32, 31) + 32, f32(0))
        d_bytes, d = _fp16(np.where(nonzero, f32(1) / iscale, f32(0)))
    else:
        weights = _weights_k(x, qw, 16, 2)
        sw = _sum(weights)
        scales, levels = _make_qx_quants(xs.reshape(-1, 16), 4, weights.reshape(-1, 16))
        d_block, six = _make_qx_quants(scales.reshape(nb, 16), 32, sw)
        nonzero = np.ones(nb, dtype=bool)
        d_bytes, d = _fp16(d_block)
    six = six.astype(np.uint8)
    packed = np.zeros((nb, 12), dtype=np.uint8)
    packed[:, 0:8] = (six[:, 0:8] & 0xF) | ((six[:, 8:16] & 0xF) << 4)
    high = (six >> 4).reshape(nb, 4, 4)  # j = 4 * group + position: bits 2 * group of byte 8 + position
    packed[:, 8:12] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    sub_d = d[:, None] * (six.astype(np.float32) - 32) * nonzero[:, None]
    levels = _requantize(xs, sub_d, np.zeros((nb, 16), np.float32), -4, 3, levels.reshape(nb, 16, 16) - 4) + 4
    levels = levels.astype(np.uint8).reshape(nb, 8, 32)  # bit k of hmask[m] is level 32k + m
    hmask = np.bitwise_or.reduce((levels >> 2) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    qs = _pack_2bit(levels.reshape(nb, QK_K) & 3)
    return np.concatenate([hmask.astype(np.uint8), qs, packed, d_bytes], axis=1)


def quantize_q2_k(x: np.ndarray, qw: Optional[np.ndarray] = None) -> np.ndarray:
    """Blocks of 256 as block_q2_K: 16 bytes of 4-bit scale|min, 64 bytes of 2-bit levels, fp16 d and dmin."""
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    if qw is None:
        scales, mins, levels = _make_qkx_quants(xs.reshape(-1, 16), np.abs(xs).reshape(-1, 16), 3,
                                                -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale = np.maximum(scales.max(-1), f32(0))
        max_min = np.maximum(mins.max(-1), f32(0))
        ls = np.where(max_scale[:, None] > 0,
                      _rint((f32(15) / np.where(max_scale > 0, max_scale, f32(1)))[:, None] * scales), f32(0))
        lm = np.where(max_min[:, None] > 0,
                      _rint((f32(15) / np.where(max_min > 0, max_min, f32(1)))[:, None] * mins), f32(0))
        d_bytes, d = _fp16(max_scale / f32(15))
        m_bytes, dmin = _fp16(max_min / f32(15))
    else:
        sigma2 = _sum(x * x) / f32(QK_K)
        weights = (qw * np.sqrt(sigma2[:, None] + x * x)).reshape(nb, 16, 16)
        sw = _sum(weights)
        scales, mins, levels = _make_qkx_quants(xs.reshape(-1, 16), weights.reshape(-1, 16), 3,
                                                -0.9, 0.05, 36, False)
        d_block, ls = _make_qp_quants(scales.reshape(nb, 16), 15, sw)
        m_block, lm = _make_qp_quants(mins.reshape(nb, 16), 15, sw)
        d_bytes, d = _fp16(d_block)
        m_bytes, dmin = _fp16(m_block)
    byte = (ls.astype(np.int64) | (lm.astype(np.int64) << 4)) & 0xFF
    sub_d = d[:, None] * (byte & 0xF).astype(np.float32)
    sub_m = dmin[:, None] * (byte >> 4).astype(np.float32)
    levels = _requantize(xs, sub_d, sub_m, 0, 3, levels.reshape(nb, 16, 16))
    return np.concatenate([byte.astype(np.uint8), _pack_2bit(levels.reshape(nb, QK_K)), d_bytes, m_bytes], axis=1)


# ------------------------------------------------------------------------------------------- legacy, weighted


def _legacy_weights(rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of 32 and their error weights qw * sqrt(sigma2 + x^2), sigma2 the mean square of the whole row."""
    sigma2 = _sum(rows * rows) / f32(rows.shape[1])
    w = weights[None, :] * np.sqrt(sigma2[:, None] + rows * rows)
    return rows.reshape(-1, 32), w.reshape(-1, 32)


def _nibbles(levels: np.ndarray) -> np.ndarray:
    q = levels.astype(np.uint8)
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _high_bits(levels: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 levels as Q5's little-endian uint32 qh."""
    bits = (levels.astype(np.uint32) >> 4) & 1
    qh = (bits << np.arange(32, dtype=np.uint32)[None, :]).sum(axis=1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def quantize_q4_0_weighted(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """block_q4_0 (fp16 d, 16 bytes) by llama.cpp's importance-weighted search."""
    x, w = _legacy_weights(rows, weights)
    d, levels = _make_qx_quants(x, 8, w)
    return np.concatenate([_fp16(d)[0], _nibbles(levels)], axis=1)


def quantize_q5_0_weighted(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """block_q5_0 (fp16 d, 4 bytes qh, 16 bytes) by llama.cpp's importance-weighted search."""
    x, w = _legacy_weights(rows, weights)
    d, levels = _make_qx_quants(x, 16, w)
    return np.concatenate([_fp16(d)[0], _high_bits(levels), _nibbles(levels)], axis=1)


def quantize_q4_1_weighted(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """block_q4_1 (fp16 d, fp16 m, 16 bytes) by llama.cpp's importance-weighted search."""
    x, w = _legacy_weights(rows, weights)
    d, neg_min, levels = _make_qkx_quants(x, w, 15, -0.9, 0.05, 36, False)
    return np.concatenate([_fp16(d)[0], _fp16(-neg_min)[0], _nibbles(levels)], axis=1)


def quantize_q5_1_weighted(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """block_q5_1 (fp16 d, fp16 m, 4 bytes qh, 16 bytes) by llama.cpp's importance-weighted search."""
    x, w = _legacy_weights(rows, weights)
    d, neg_min, levels = _make_qkx_quants(x, w, 31, -0.9, 0.05, 36, False)
    return np.concatenate([_fp16(d)[0], _fp16(-neg_min)[0], _high_bits(levels), _nibbles(levels)], axis=1)


# ------------------------------------------------------------------------------------------- non-linear 4-bit

# llama.cpp's kvalues_iq4nl: the 16 levels the 4-bit indices of IQ4_NL/IQ4_XS point to, denser near zero where
# most weights lie (a fixed table, not learnt per tensor)
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
# quantize_iq4_nl/_xs (what llama-quantize calls, with or without an imatrix) try 2 * 7 + 1 scales around the peak
IQ4_NTRY = 7


# the midpoints between neighbouring levels: the nearest level's index is the number of midpoints at or below a value
IQ4_MIDPOINTS = (KVALUES_IQ4NL[:-1] + KVALUES_IQ4NL[1:]) / f32(2)


def iq4_level_index(v: np.ndarray) -> np.ndarray:
    """Index of the table level nearest each v, as llama.cpp's best_index_int8 (`v - lo < hi - v ? lo : hi`): a
    tie goes to the upper level. The midpoints are exact half-integers, and near one, v - lo and hi - v are exact
    in float32, so comparing v with the midpoint decides as C does."""
    return np.searchsorted(IQ4_MIDPOINTS, v, side="right")


def _iq4_weights(x: np.ndarray, qw: Optional[np.ndarray]) -> np.ndarray:
    """Error weights per value of each super-block row of x: x^2 alone, or with an importance matrix
    qw * sqrt(sigma2 + x^2), sigma2 twice the super-block's mean square (quantize_row_iq4_nl_impl)."""
    if qw is None:
        return x * x
    sigma2 = _sum(x * x) * f32(2 / x.shape[1])
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _iq4_fit(x: np.ndarray, w: np.ndarray, iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sums q.x and q.q of each 32-value row of x on the table levels nearest iscale * x."""
    q = KVALUES_IQ4NL[iq4_level_index(iscale[:, None] * x)]
    return _sum(w * q * x), _sum(w * q * q)


def _iq4_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Scale of each 32-value row of x: the best weighted least-squares fit over a first guess and 2 * IQ4_NTRY + 1
    trial scales that map the row's peak to around the table's end (0 for an all-but-zero row)."""
    peak, zero = _signed_peak(x)
    sumqx, sumq2 = _iq4_fit(x, w, f32(1) / (-peak / KVALUES_IQ4NL[0]))
    scale = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, f32(1)), f32(0))
    best = scale * sumqx
    for step in range(-IQ4_NTRY, IQ4_NTRY + 1):
        sumqx, sumq2 = _iq4_fit(x, w, (f32(step) + KVALUES_IQ4NL[0]) / peak)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(better, sumqx / np.where(better, sumq2, f32(1)), scale)
        best = np.where(better, scale * sumqx, best)
    return np.where(zero, f32(0), scale)


def _inverse(v: np.ndarray) -> np.ndarray:
    """1 / v, 0 where v is 0 (llama.cpp's `d ? 1/d : 0`)."""
    return np.where(v != 0, f32(1) / np.where(v != 0, v, f32(1)), f32(0))


def quantize_iq4_nl(x: np.ndarray, qw: Optional[np.ndarray] = None) -> np.ndarray:
    """Blocks of 32 (rows of x) as block_iq4_nl: fp16 d, 16 bytes of 4-bit indices into KVALUES_IQ4NL."""
    scales = _iq4_scales(x, _iq4_weights(x, qw))
    # the indices are re-picked on the float32 scale the search chose (not on its fp16 copy), as llama.cpp does
    levels = iq4_level_index(_inverse(scales)[:, None] * x)
    return np.concatenate([_fp16(scales)[0], _nibbles(levels)], axis=1)


def quantize_iq4_xs(x: np.ndarray, qw: Optional[np.ndarray] = None) -> np.ndarray:
    """Blocks of 256 as block_iq4_xs: fp16 d, 2 bytes of high and 4 of low bits of eight 6-bit sub-block scales,
    128 bytes of 4-bit indices into KVALUES_IQ4NL."""
    nb = x.shape[0]
    scales = _iq4_scales(x.reshape(-1, 32), _iq4_weights(x, qw).reshape(-1, 32)).reshape(nb, 8)
    max_scale = np.take_along_axis(scales, np.abs(scales).argmax(-1)[:, None], -1)[:, 0]
    # the largest sub-block scale (of either sign) is stored as -32, the end of the signed 6-bit range
    d = -max_scale / f32(32)
    sub = np.clip(_rint(_inverse(d)[:, None] * scales), -32, 31)
    levels = iq4_level_index(_inverse(d[:, None] * sub)[..., None] * x.reshape(nb, 8, 32))
    six = (sub + 32).astype(np.uint16)
    scales_l = (six[:, 0::2] & 0xF) | ((six[:, 1::2] & 0xF) << 4)
    scales_h = np.bitwise_or.reduce((six >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1)
    return np.concatenate([_fp16(d)[0], scales_h.astype("<u2").view(np.uint8).reshape(nb, 2),
                           scales_l.astype(np.uint8), _nibbles(levels.reshape(-1, 32)).reshape(nb, 128)], axis=1)


_BLOCK_QUANTIZERS = {Q.Q2_K: quantize_q2_k, Q.Q3_K: quantize_q3_k, Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k,
                     Q.Q6_K: quantize_q6_k, Q.IQ4_NL: quantize_iq4_nl, Q.IQ4_XS: quantize_iq4_xs}
_LEGACY = {Q.Q4_0: quantize_q4_0_weighted, Q.Q4_1: quantize_q4_1_weighted, Q.Q5_0: quantize_q5_0_weighted,
           Q.Q5_1: quantize_q5_1_weighted}


def weighted_error(data: np.ndarray, packed: np.ndarray, qtype: GGMLQuantizationType,
                   imatrix: Optional[np.ndarray] = None) -> float:
    """Sum over columns of imatrix * squared error of the dequantized tensor (uniform weights without one)."""
    restored = quants.dequantize(packed, qtype).reshape(data.shape)
    err = np.square(restored.astype(np.float64) - data).sum(axis=tuple(range(data.ndim - 1)))
    return float(err @ (np.ones_like(err) if imatrix is None else np.asarray(imatrix, dtype=np.float64)))


__all__ = ["IQ4_MIDPOINTS", "IQ4_TYPES", "KVALUES_IQ4NL", "K_TYPES", "QK_K", "WEIGHTED_LEGACY", "iq4_level_index",
           "quantize", "quantize_iq4_nl", "quantize_iq4_xs", "quantize_q2_k", "quantize_q3_k", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k",
           "weighted_error"]
