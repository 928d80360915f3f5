"""Numba kernels of the bitpacked binary convolution (see :mod:`qcompress.runtime.binary`).

Data layout, shared by the packing and the convolution kernels (``sh, sw`` = stride):

- packed input, one flat ``uint64`` row per image: ``(word, row_phase, col_phase, y', q)`` with
  ``y = y' * sh + row_phase`` and ``x = q * sw + col_phase`` in the zero-padded image (``Hq * Wq`` words
  per plane) and bit ``c % 64`` of word ``c // 64`` set where channel ``c`` binarizes to +1. Splitting
  rows and columns by phase makes the output pixels of one image a single stream
  ``p = oy * Wq + ox``: tap ``r`` of every output reads word ``p + offsets[r]``, so eight consecutive
  outputs are two consecutive 4-word vectors (the columns ``ox >= OW`` of the stream are discarded).
- packed weights ``(output block of 4, tap r, 4)``: the four words of one tap that are broadcast
  against the pixel vectors.

The vector kernel keeps 8 accumulators (4 output channels x 8 pixels) in registers. It adds
per-byte popcounts of ``x ^ w`` (LLVM's ``ctpop`` on 32 x i8: two ``vpshufb`` nibble look-ups on
AVX2, ``vpopcntb`` with AVX512-BITALG) and folds the bytes into 64-bit lanes every 31 taps (a byte
holds at most 31 x 8 = 248); with ``wide`` it adds 64-bit popcounts every tap instead (one
``vpopcntq`` with AVX512-VPOPCNTDQ). Counts then become floats of the output dtype (exact below
2**24) and the epilogue ``offset + gain * (sums - 2 count)`` runs on 8-lane float vectors. The
portable kernel is plain scalar code with a bit-twiddling popcount, for checking the vector kernel
and for CPUs where the vector code misbehaves. The vector code is LLVM IR written through numba
intrinsics on a ``U64x4`` type, so LLVM picks the instructions for the host (numba compiles for it).
"""

from __future__ import annotations

import llvmlite.binding as llvm_binding
import llvmlite.ir as llir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.extending import intrinsic, models, register_model

LANES = 4  # 64-bit words per vector (256 bits)
BLOCK_OUT = 4  # output channels per register block
BLOCK_PIX = 2 * LANES  # output pixels per register block (two vectors)
BYTE_FLUSH = 31  # taps a byte accumulator can take (31 * 8 = 248 <= 255)
_PACK_PIXELS = 4096  # pixels a packing job covers (about)

_I64 = llir.IntType(64)
_VEC = llir.VectorType(_I64, LANES)
_VEC_BYTES = llir.VectorType(llir.IntType(8), 8 * LANES)
_VEC_I32 = llir.VectorType(llir.IntType(32), LANES)


class _U64VecType(types.Type):
    def __init__(self) -> None:
        super().__init__(name="U64x4")


u64x4 = _U64VecType()


@register_model(_U64VecType)
class _U64VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _VEC)


def _is_u64_vector_array(arr) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.uint64


def _ctpop(builder, value):
    vtype = value.type
    name = f"llvm.ctpop.v{vtype.count}i{vtype.element.width}"
    fn = cgutils.get_or_insert_function(builder.module, llir.FunctionType(vtype, [vtype]), name)
    return builder.call(fn, [value])


def _element_pointer(context, builder, array_type, array, index):
    ary = context.make_array(array_type)(context, builder, array)
    return builder.gep(ary.data, [index])


def _splat(builder, scalar):
    zero = llir.Constant(llir.IntType(32), 0)
    one_lane = builder.insert_element(llir.Constant(_VEC, llir.Undefined), scalar, zero)
    mask = llir.Constant(llir.VectorType(llir.IntType(32), LANES), [0] * LANES)
    return builder.shuffle_vector(one_lane, llir.Constant(_VEC, llir.Undefined), mask)


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return llir.Constant(_VEC, None)

    return u64x4(), codegen


@intrinsic
def vload(typingctx, arr, index):
    """arr[index : index + 4] as one vector (unaligned, no bounds check)."""
    if not _is_u64_vector_array(arr) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(ptr, _VEC.as_pointer()), align=8)

    return u64x4(arr, index), codegen


@intrinsic
def vbroadcast(typingctx, arr, index):
    """arr[index] in every lane (no bounds check)."""
    if not _is_u64_vector_array(arr) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        return _splat(builder, builder.load(ptr))

    return u64x4(arr, index), codegen


@intrinsic
def vxor_popcount_bytes(typingctx, acc, a, b):
    """acc + popcount(a ^ b), counted and added per byte."""

    def codegen(context, builder, sig, args):
        diff = builder.bitcast(builder.xor(args[1], args[2]), _VEC_BYTES)
        total = builder.add(builder.bitcast(args[0], _VEC_BYTES), _ctpop(builder, diff))
        return builder.bitcast(total, _VEC)

    return u64x4(u64x4, u64x4, u64x4), codegen


@intrinsic
def vxor_popcount(typingctx, acc, a, b):
    """acc + popcount(a ^ b) per 64-bit lane."""

    def codegen(context, builder, sig, args):
        return builder.add(args[0], _ctpop(builder, builder.xor(args[1], args[2])))

    return u64x4(u64x4, u64x4, u64x4), codegen


def _host_has_avx2() -> bool:
    # numba compiles for the host CPU unless NUMBA_CPU_NAME names another target
    if numba_config.CPU_NAME not in (None, "host"):
        return False
    return bool(llvm_binding.get_host_cpu_features().get("avx2", False))


_PSADBW = _host_has_avx2()


@intrinsic
def vsum_bytes(typingctx, acc, byte_counts):
    """acc + (sum of the 8 bytes of each 64-bit lane of byte_counts)."""

    def codegen(context, builder, sig, args):
        a = args[1]
        if _PSADBW:  # one vpsadbw against zero
            fnty = llir.FunctionType(_VEC, [_VEC_BYTES, _VEC_BYTES])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.psad.bw")
            return builder.add(
                args[0], builder.call(fn, [builder.bitcast(a, _VEC_BYTES), llir.Constant(_VEC_BYTES, None)])
            )

        def splat(value):
            return llir.Constant(_VEC, [value] * LANES)

        pairs = builder.add(
            builder.and_(a, splat(0x00FF00FF00FF00FF)),
            builder.and_(builder.lshr(a, splat(8)), splat(0x00FF00FF00FF00FF)),
        )
        quads = builder.add(pairs, builder.lshr(pairs, splat(16)))
        whole = builder.and_(builder.add(quads, builder.lshr(quads, splat(32))), splat(0xFFFF))
        return builder.add(args[0], whole)

    return u64x4(u64x4, u64x4), codegen


def _is_float_vector_array(arr) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype in (types.float32, types.float64)


# the 64-bit lanes (small counts) as floats of element's type, through int32
def _lanes_as(builder, value, element):
    return builder.sitofp(builder.trunc(value, _VEC_I32), llir.VectorType(element, LANES))


@intrinsic
def vstore_counts(typingctx, arr, index, value):
    """arr[index : index + 4] = value's lanes as floats (no bounds check)."""
    if not _is_float_vector_array(arr):
        return None

    def codegen(context, builder, sig, args):
        element = context.get_value_type(sig.args[0].dtype)
        ptr = builder.bitcast(
            _element_pointer(context, builder, sig.args[0], args[0], args[1]),
            llir.VectorType(element, LANES).as_pointer(),
        )
        builder.store(_lanes_as(builder, args[2], element), ptr, align=4)
        return context.get_dummy_value()

    return types.void(arr, index, u64x4), codegen


@intrinsic
def vadd_counts(typingctx, arr, index, value):
    """arr[index : index + 4] += value's lanes as floats (no bounds check)."""
    if not _is_float_vector_array(arr):
        return None

    def codegen(context, builder, sig, args):
        element = context.get_value_type(sig.args[0].dtype)
        ptr = builder.bitcast(
            _element_pointer(context, builder, sig.args[0], args[0], args[1]),
            llir.VectorType(element, LANES).as_pointer(),
        )
        total = builder.fadd(builder.load(ptr, align=4), _lanes_as(builder, args[2], element))
        builder.store(total, ptr, align=4)
        return context.get_dummy_value()

    return types.void(arr, index, u64x4), codegen


EPILOGUE_LANES = 8


def _float_vector(context, array_type):
    return llir.VectorType(context.get_value_type(array_type.dtype), EPILOGUE_LANES)


def _load_lanes(context, builder, array_type, array, index):
    ptr = _element_pointer(context, builder, array_type, array, index)
    return builder.load(builder.bitcast(ptr, _float_vector(context, array_type).as_pointer()), align=4)


def _splat_float(builder, vtype, scalar):
    one_lane = builder.insert_element(
        llir.Constant(vtype, llir.Undefined), scalar, llir.Constant(llir.IntType(32), 0)
    )
    mask = llir.Constant(llir.VectorType(llir.IntType(32), EPILOGUE_LANES), [0] * EPILOGUE_LANES)
    return builder.shuffle_vector(one_lane, llir.Constant(vtype, llir.Undefined), mask)


def _same_float_arrays(*arrays) -> bool:
    return all(_is_float_vector_array(a) for a in arrays) and len({a.dtype for a in arrays}) == 1


def _floored(builder, vtype, value, floor):
    """``value`` with the lanes below ``floor`` set to it (ReLU at floor 0; -inf leaves all, NaN stays NaN)."""
    low = _splat_float(builder, vtype, floor)
    return builder.select(builder.fcmp_ordered("<", value, low), low, value)


def _store_lanes(context, builder, array_type, array, index, value):
    ptr = _element_pointer(context, builder, array_type, array, index)
    builder.store(value, builder.bitcast(ptr, value.type.as_pointer()), align=4)


@intrinsic
def vaffine_map(typingctx, dst, d, offset, f, sums, s, counts, c, gain, floor):
    """dst[d:d+8] = max(offset[f:f+8] + gain * (sums[s:s+8] - 2 counts[c:c+8]), floor) (no bounds check)."""
    if not _same_float_arrays(dst, offset, sums, counts):
        return None

    def codegen(context, builder, sig, args):
        dst_t, _, off_t, _, sums_t, _, counts_t, _, _, _ = sig.args
        vtype = _float_vector(context, dst_t)
        counts_v = _load_lanes(context, builder, counts_t, args[6], args[7])
        diff = builder.fsub(
            _load_lanes(context, builder, sums_t, args[4], args[5]), builder.fadd(counts_v, counts_v)
        )
        scaled = builder.fmul(_splat_float(builder, vtype, args[8]), diff)
        value = builder.fadd(_load_lanes(context, builder, off_t, args[2], args[3]), scaled)
        _store_lanes(context, builder, dst_t, args[0], args[1], _floored(builder, vtype, value, args[9]))
        return context.get_dummy_value()

    return types.void(dst, d, offset, f, sums, s, counts, c, dst.dtype, dst.dtype), codegen


@intrinsic
def vaffine_const(typingctx, dst, d, offset, sums, counts, c, gain, floor):
    """dst[d:d+8] = max(offset + gain * (sums - 2 counts[c:c+8]), floor) (no bounds check)."""
    if not _same_float_arrays(dst, counts):
        return None

    def codegen(context, builder, sig, args):
        dst_t, counts_t = sig.args[0], sig.args[4]
        vtype = _float_vector(context, dst_t)
        counts_v = _load_lanes(context, builder, counts_t, args[4], args[5])
        diff = builder.fsub(_splat_float(builder, vtype, args[3]), builder.fadd(counts_v, counts_v))
        scaled = builder.fmul(_splat_float(builder, vtype, args[6]), diff)
        value = builder.fadd(_splat_float(builder, vtype, args[2]), scaled)
        _store_lanes(context, builder, dst_t, args[0], args[1], _floored(builder, vtype, value, args[7]))
        return context.get_dummy_value()

    return types.void(dst, d, dst.dtype, dst.dtype, counts, c, dst.dtype, dst.dtype), codegen


@intrinsic
def vscaled_map(typingctx, dst, d, offset, f, sums, s, counts, c, kmap, k, alpha, floor):
    """dst[d:d+8] = max((sums[s:s+8] - 2 counts[c:c+8]) * kmap[k:k+8] * alpha + offset[f:f+8], floor), rounded
    in that order (no bounds check)."""
    if not _same_float_arrays(dst, offset, sums, counts, kmap):
        return None

    def codegen(context, builder, sig, args):
        dst_t, _, off_t, _, sums_t, _, counts_t, _, kmap_t, _, _, _ = sig.args
        vtype = _float_vector(context, dst_t)
        counts_v = _load_lanes(context, builder, counts_t, args[6], args[7])
        diff = builder.fsub(
            _load_lanes(context, builder, sums_t, args[4], args[5]), builder.fadd(counts_v, counts_v)
        )
        scaled = builder.fmul(builder.fmul(diff, _load_lanes(context, builder, kmap_t, args[8], args[9])),
                              _splat_float(builder, vtype, args[10]))
        value = builder.fadd(scaled, _load_lanes(context, builder, off_t, args[2], args[3]))
        _store_lanes(context, builder, dst_t, args[0], args[1], _floored(builder, vtype, value, args[11]))
        return context.get_dummy_value()

    return types.void(dst, d, offset, f, sums, s, counts, c, kmap, k, dst.dtype, dst.dtype), codegen


@intrinsic
def vscaled_const(typingctx, dst, d, offset, sums, counts, c, kmap, k, alpha, floor):
    """dst[d:d+8] = max((sums - 2 counts[c:c+8]) * kmap[k:k+8] * alpha + offset, floor), rounded in that order (no
    bounds check)."""
    if not _same_float_arrays(dst, counts, kmap):
        return None

    def codegen(context, builder, sig, args):
        dst_t, counts_t, kmap_t = sig.args[0], sig.args[4], sig.args[6]
        vtype = _float_vector(context, dst_t)
        counts_v = _load_lanes(context, builder, counts_t, args[4], args[5])
        diff = builder.fsub(_splat_float(builder, vtype, args[3]), builder.fadd(counts_v, counts_v))
        scaled = builder.fmul(builder.fmul(diff, _load_lanes(context, builder, kmap_t, args[6], args[7])),
                              _splat_float(builder, vtype, args[8]))
        value = builder.fadd(scaled, _splat_float(builder, vtype, args[2]))
        _store_lanes(context, builder, dst_t, args[0], args[1], _floored(builder, vtype, value, args[9]))
        return context.get_dummy_value()

    return types.void(dst, d, dst.dtype, dst.dtype, counts, c, kmap, k, dst.dtype, dst.dtype), codegen


# ------------------------------------------------------------------------------------ packing
@njit(parallel=True, cache=True, fastmath=False)
def pack_input(x, width, mu, scale, pad_top, pad_left, stride_h, stride_w, hq, wq, out):
    """Binarize ``x`` (N, C, H * W) as ``(x - mu) / scale >= 0`` (the fake quantizer's sign, 0 -> +1)
    and write the bits into ``out`` (N, words), zero-filled, in the layout of the module docstring."""
    n_images, channels, pixels = x.shape
    height = pixels // width
    n_words = (channels + 63) // 64
    plane = hq * wq
    rows_per_job = max(1, min(height, _PACK_PIXELS // width))
    chunks = (height + rows_per_job - 1) // rows_per_job
    # each column's place in its row (phase plane, position): no integer division per pixel
    columns = np.empty(width, np.int64)
    for col in range(width):
        xp = col + pad_left
        columns[col] = (xp % stride_w) * plane + xp // stride_w
    for job in prange(n_images * n_words * chunks):
        n = job // (n_words * chunks)
        word = (job // chunks) % n_words
        y0 = (job % chunks) * rows_per_job
        y1 = min(height, y0 + rows_per_job)
        first = y0 * width
        count = (y1 - y0) * width
        octets = np.zeros((8, count), np.uint8)  # octets[b]: channels word * 64 + 8 b ... + 7
        for c in range(word * 64, min(channels, word * 64 + 64)):
            m = mu[c]
            k = scale[c]
            values = x[n, c, first : first + count]
            bit = np.uint8(1) << np.uint8((c - word * 64) % 8)
            octet = octets[(c - word * 64) // 8]
            for i in range(count):
                octet[i] |= bit if (values[i] - m) / k >= 0 else np.uint8(0)
        bits = np.zeros(count, np.uint64)  # the 8 octets side by side, one pass each (vectorised)
        for b in range(8):
            octet = octets[b]
            shift = np.uint64(8 * b)
            for i in range(count):
                bits[i] |= np.uint64(octet[i]) << shift
        dst = out[n]
        for y in range(y0, y1):
            yp = y + pad_top
            row_base = (word * stride_h + yp % stride_h) * stride_w * plane + (yp // stride_h) * wq
            row = bits[(y - y0) * width : (y - y0 + 1) * width]
            if stride_w == 1:
                dst[row_base + pad_left : row_base + pad_left + width] = row
            else:
                for col in range(width):
                    dst[row_base + columns[col]] = row[col]


@njit(parallel=True, cache=True, fastmath=False)
def group_columns(packed, channels, group, out):
    """``out[n, q]`` = the ``channels``-bit words of ``packed[n, q]``, ``packed[n, q + 1]``, ...,
    ``packed[n, q + group - 1]`` side by side (word ``q + s`` shifted by ``s * channels``; words past the end
    are 0): one word then holds ``group`` horizontally adjacent pixels, the layout of a layer whose
    ``channels * kernel width`` bits fit one word (``BinaryConv2d``'s column grouping)."""
    n_images, words = packed.shape
    for n in prange(n_images):
        for q in range(words):
            bits = packed[n, q]
            for s in range(1, min(group, words - q)):
                bits |= packed[n, q + s] << np.uint64(s * channels)
            out[n, q] = bits


# ------------------------------------------------------------------------------- convolution
# The epilogue's two forms, for i < length (``overrun``: whole vectors that write, and read, up to 7 elements
# past ``length``), each floored at ``floor`` (0: the fused ReLU; -inf: none):
# - affine: dst[d + i] = offset[f + i] + gain * (sums[s + i] - 2 counts[c + i]);
# - scaled (XNOR-Net's K(x)): dst[d + i] = (sums[s + i] - 2 counts[c + i]) * kmap[d + i + kd] * alpha + offset[f + i].
# The *_const forms take one number for sums and offset (interior outputs).
@njit(inline="always")
def _output(diff, offset, gain, kmap, k, alpha, on, floor):
    """One output from its integer ``diff`` = sums - 2 counts, in either form (kmap is read only when ``on``)."""
    value = diff * kmap[k] * alpha + offset if on else offset + gain * diff
    return floor if value < floor else value  # noqa: FURB136 (max() need not keep a NaN)


@njit(inline="always")
def _affine(dst, d, offset, f, sums, s, counts, c, gain, length, overrun, kmap, kd, alpha, on, floor):
    i = 0
    end = length if overrun else length - EPILOGUE_LANES + 1
    if on:
        while i < end:
            vscaled_map(dst, d + i, offset, f + i, sums, s + i, counts, c + i, kmap, d + i + kd, alpha, floor)
            i += EPILOGUE_LANES
    else:
        while i < end:
            vaffine_map(dst, d + i, offset, f + i, sums, s + i, counts, c + i, gain, floor)
            i += EPILOGUE_LANES
    while i < length:
        diff = sums[s + i] - (counts[c + i] + counts[c + i])
        dst[d + i] = _output(diff, offset[f + i], gain, kmap, d + i + kd, alpha, on, floor)
        i += 1


@njit(inline="always")
def _affine_const(dst, d, offset, sums, counts, c, gain, length, overrun, kmap, kd, alpha, on, floor):
    i = 0
    end = length if overrun else length - EPILOGUE_LANES + 1
    if on:
        while i < end:
            vscaled_const(dst, d + i, offset, sums, counts, c + i, kmap, d + i + kd, alpha, floor)
            i += EPILOGUE_LANES
    else:
        while i < end:
            vaffine_const(dst, d + i, offset, sums, counts, c + i, gain, floor)
            i += EPILOGUE_LANES
    while i < length:
        diff = sums - (counts[c + i] + counts[c + i])
        dst[d + i] = _output(diff, offset, gain, kmap, d + i + kd, alpha, on, floor)
        i += 1


# Rows oy0..oy1 of output channel o from the popcount sums in acc[j * stride:] (rows row_words
# apart); see conv_vector. Numba loops over rows this short cost more in alias checks, remainders and
# array views than in arithmetic, so whole 8-lane vectors run over each row and on into the next
# ones (which this job writes afterwards; never past its last row), then the border columns are
# rewritten from edge_sums / edge_offset (their few map values stored row after row: no scattered
# cache lines of the maps are read).
@njit(inline="always")
def _epilogue(acc, stride, row_words, j, o, n, oy0, oy1, affine, out, flat, scaled):
    flat_out, flat_sums, flat_offset = flat
    gain, sums_inner, offset_inner, interior, edge_sums, edge_offset = affine[2:]
    kmap, alpha_all, floors, on = scaled
    _, n_out, out_h, width = out.shape
    plane = out_h * width
    g = gain[o]
    alpha = alpha_all[o] if on else g
    floor = floors[0]
    kd = n * plane - (n * n_out + o) * plane  # kmap[d + kd] is the scale of output element d
    row0, row1, col0, col1 = interior[0], interior[1], interior[2], interior[3]
    if row_words == width and row0 <= oy0 and oy1 <= row1 and col0 == 0 and col1 == width:
        d = (n * n_out + o) * plane + oy0 * width
        _affine_const(flat_out, d, offset_inner[o], sums_inner[o], acc, j * stride, g, (oy1 - oy0) * width, False,
                      kmap, kd, alpha, on, floor)
        return
    edges = edge_sums.shape[2]
    for oy in range(oy0, oy1):
        d = (n * n_out + o) * plane + oy * width
        c = j * stride + (oy - oy0) * row_words
        overrun = (oy1 - oy - 1) * width >= EPILOGUE_LANES  # the rows after this one in this job
        if row0 <= oy < row1:
            _affine_const(flat_out, d, offset_inner[o], sums_inner[o], acc, c, g, width, overrun,
                          kmap, kd, alpha, on, floor)
            for e in range(edges):
                col = e if e < col0 else col1 + e - col0
                count = acc[c + col]
                diff = edge_sums[o, oy, e] - (count + count)
                flat_out[d + col] = _output(diff, edge_offset[o, oy, e], g, kmap, d + col + kd, alpha, on, floor)
        else:
            m = o * plane + oy * width
            _affine(flat_out, d, flat_offset, m, flat_sums, m, acc, c, g, width, overrun,
                    kmap, kd, alpha, on, floor)


@njit(parallel=True, cache=True, fastmath=False)
def conv_vector(packed, weights, offsets, row_words, rows_per_job, affine, out, wide, scaled):
    """out[n, o, oy, ox] = offset + gain[o] * (sums - 2 * P) with P the sum over taps r of
    popcount(input word at ``oy * row_words + ox + offsets[r]`` ^ weight word r of o).

    ``packed`` (N, words) and ``weights`` (flat, (blocks, taps, 4)) as in the module docstring.
    ``affine`` = (sums, offset, gain, sums_inner, offset_inner, interior, edge_sums, edge_offset): the
    maps ``sums[o, oy, ox]`` and ``offset[o, oy, ox]`` are the numbers ``sums_inner[o]``,
    ``offset_inner[o]`` at the outputs in ``interior`` = (row0, row1, col0, col1), whose taps all lie in
    the image; ``edge_*[o, oy]`` are the maps' columns left of col0 and right of col1.
    All floats (maps, ``out``) have one dtype; counts travel as floats of it (exact below 2**24).
    ``scaled`` = (kmap, alpha, floor, on): with ``on`` the epilogue is XNOR-Net's spatial form
    ``(sums - 2 P) * kmap[n, oy, ox] * alpha[o] + offset`` instead (``kmap`` flat (N * OH * OW), ``gain``
    unused); every output is floored at ``floor[0]`` (0: a fused ReLU; -inf: none; NaN stays NaN)."""
    n_images, n_out, out_h, _ = out.shape
    taps = offsets.shape[0]
    n_blocks = (n_out + BLOCK_OUT - 1) // BLOCK_OUT
    jobs_per_image = (out_h + rows_per_job - 1) // rows_per_job
    # flat views, made once here: every reshape is a call
    flat = (out.reshape(out.size), affine[0].reshape(affine[0].size), affine[1].reshape(affine[1].size))
    for job in prange(n_images * jobs_per_image):
        n = job // jobs_per_image
        oy0 = (job % jobs_per_image) * rows_per_job
        oy1 = min(out_h, oy0 + rows_per_job)
        start = oy0 * row_words
        n_pix = (oy1 - oy0) * row_words
        span = (n_pix + BLOCK_PIX - 1) // BLOCK_PIX * BLOCK_PIX
        stride = span + EPILOGUE_LANES  # from one output channel's counts to the next
        acc = np.zeros(BLOCK_OUT * stride, out.dtype)
        xs = packed[n]
        for ob in range(n_blocks):
            wbase = ob * taps * BLOCK_OUT
            for b in range(0, span, BLOCK_PIX):
                p = start + b
                if wide:
                    a00 = vzero()
                    a01 = vzero()
                    a02 = vzero()
                    a03 = vzero()
                    a10 = vzero()
                    a11 = vzero()
                    a12 = vzero()
                    a13 = vzero()
                    for r in range(taps):
                        q = p + offsets[r]
                        x0 = vload(xs, q)
                        x1 = vload(xs, q + LANES)
                        wr = wbase + r * BLOCK_OUT
                        w = vbroadcast(weights, wr)
                        a00 = vxor_popcount(a00, x0, w)
                        a10 = vxor_popcount(a10, x1, w)
                        w = vbroadcast(weights, wr + 1)
                        a01 = vxor_popcount(a01, x0, w)
                        a11 = vxor_popcount(a11, x1, w)
                        w = vbroadcast(weights, wr + 2)
                        a02 = vxor_popcount(a02, x0, w)
                        a12 = vxor_popcount(a12, x1, w)
                        w = vbroadcast(weights, wr + 3)
                        a03 = vxor_popcount(a03, x0, w)
                        a13 = vxor_popcount(a13, x1, w)
                    vstore_counts(acc, b, a00)
                    vstore_counts(acc, b + LANES, a10)
                    vstore_counts(acc, stride + b, a01)
                    vstore_counts(acc, stride + b + LANES, a11)
                    vstore_counts(acc, 2 * stride + b, a02)
                    vstore_counts(acc, 2 * stride + b + LANES, a12)
                    vstore_counts(acc, 3 * stride + b, a03)
                    vstore_counts(acc, 3 * stride + b + LANES, a13)
                    continue
                for r0 in range(0, taps, BYTE_FLUSH):
                    a00 = vzero()
                    a01 = vzero()
                    a02 = vzero()
                    a03 = vzero()
                    a10 = vzero()
                    a11 = vzero()
                    a12 = vzero()
                    a13 = vzero()
                    for r in range(r0, min(taps, r0 + BYTE_FLUSH)):
                        q = p + offsets[r]
                        x0 = vload(xs, q)
                        x1 = vload(xs, q + LANES)
                        wr = wbase + r * BLOCK_OUT
                        w = vbroadcast(weights, wr)
                        a00 = vxor_popcount_bytes(a00, x0, w)
                        a10 = vxor_popcount_bytes(a10, x1, w)
                        w = vbroadcast(weights, wr + 1)
                        a01 = vxor_popcount_bytes(a01, x0, w)
                        a11 = vxor_popcount_bytes(a11, x1, w)
                        w = vbroadcast(weights, wr + 2)
                        a02 = vxor_popcount_bytes(a02, x0, w)
                        a12 = vxor_popcount_bytes(a12, x1, w)
                        w = vbroadcast(weights, wr + 3)
                        a03 = vxor_popcount_bytes(a03, x0, w)
                        a13 = vxor_popcount_bytes(a13, x1, w)
                    # the folded byte counts go to memory, so only the 8 byte counters stay in registers
                    vadd_counts(acc, b, vsum_bytes(vzero(), a00))
                    vadd_counts(acc, b + LANES, vsum_bytes(vzero(), a10))
                    vadd_counts(acc, stride + b, vsum_bytes(vzero(), a01))
                    vadd_counts(acc, stride + b + LANES, vsum_bytes(vzero(), a11))
                    vadd_counts(acc, 2 * stride + b, vsum_bytes(vzero(), a02))
                    vadd_counts(acc, 2 * stride + b + LANES, vsum_bytes(vzero(), a12))
                    vadd_counts(acc, 3 * stride + b, vsum_bytes(vzero(), a03))
                    vadd_counts(acc, 3 * stride + b + LANES, vsum_bytes(vzero(), a13))
            for j in range(BLOCK_OUT):
                o = ob * BLOCK_OUT + j
                if o < n_out:
                    _epilogue(acc, stride, row_words, j, o, n, oy0, oy1, affine, out, flat, scaled)
            if not wide:
                acc[:] = 0


_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit(inline="always")
def _popcount_swar(v):
    v = v - ((v >> np.uint64(1)) & _M1)
    v = (v & _M2) + ((v >> np.uint64(2)) & _M2)
    v = (v + (v >> np.uint64(4))) & _M4
    return (v * _H01) >> np.uint64(56)


@njit(parallel=True, cache=True, fastmath=False)
def conv_portable(packed, weights, offsets, row_words, rows_per_job, affine, out, scaled):
    """:func:`conv_vector` in plain scalar code, one output and one word at a time, reading the maps
    everywhere (the interior numbers and edges are not used)."""
    sums, offset, gain = affine[0], affine[1], affine[2]
    kmap, alpha, floors, on = scaled
    n_images, n_out, out_h, out_w = out.shape
    taps = offsets.shape[0]
    jobs_per_image = (out_h + rows_per_job - 1) // rows_per_job
    for job in prange(n_images * jobs_per_image):
        n = job // jobs_per_image
        oy0 = (job % jobs_per_image) * rows_per_job
        oy1 = min(out_h, oy0 + rows_per_job)
        for o in range(n_out):
            wbase = (o // BLOCK_OUT) * taps * BLOCK_OUT + o % BLOCK_OUT
            for oy in range(oy0, oy1):
                for ox in range(out_w):
                    p = oy * row_words + ox
                    count = np.uint64(0)
                    for r in range(taps):
                        count += _popcount_swar(packed[n, p + offsets[r]] ^ weights[wbase + r * BLOCK_OUT])
                    out[n, o, oy, ox] = _output(sums[o, oy, ox] - 2.0 * count, offset[o, oy, ox], gain[o], kmap,
                                                (n * out_h + oy) * out_w + ox, alpha[o] if on else gain[o], on,
                                                floors[0])
