"""The fused counting kernel for CUDA: positive entries per column, one read of the activation.

The torch path (:func:`neuronreg.lape.counting.positive_counts`) makes four passes over a
``[tokens, I]`` activation (clamp, sign, nan_to_num, sum); on a GPU that elementwise work costs
about as much as the LM head that counting skips. This Triton kernel reads each activation once.

What it counts is decided on the bits, not by a float comparison, so that no compiler flag
(flush-to-zero of denormals, fast math) can change it: an IEEE float ``x`` is ``> 0`` exactly when
its bit pattern, read as a signed integer of the same width, is in ``(0, bits(+inf)]``:

* the sign bit set (negative numbers, -0.0, -inf, NaNs with the sign bit) makes the integer < 0;
* +0.0 is 0;
* positive denormals, normals and +inf are 1 .. bits(+inf);
* NaNs without the sign bit are above bits(+inf).

That is ``x > 0`` as IEEE defines it (``NaN > 0`` is false, ``-0.0 > 0`` is false, a positive
denormal is > 0), for bfloat16, float16 and float32, and so the same counts as the torch path.

Each program counts a block of columns over a block of rows into int32 (exact: a block has fewer
than 2**31 rows) and stores it in a small ``[row blocks, I]`` scratch; one ``sum`` then adds the
row blocks into the int64 counts. No atomics, so the result does not depend on the schedule.

With ``sums``, the same read also adds each column's activations, and its positive ones, into
``[row blocks, I]`` float64 partial sums (NaN as 0, +-inf as the largest finite value of the dtype, as
``torch.nan_to_num`` does on the torch path), so that counting with the activation statistics
steering needs costs one pass, not four more. Float64 arithmetic on every element cost the H100 5%
of the forward's speed, so each tile of ``BLOCK_ROWS`` (32) rows is summed in float32 and only that
tile's sum is converted and added in float64.

The error of these sums, against the float64 path. Take one column of one call: ``N`` rows whose
values (after the NaN and inf mapping) are ``x_1 .. x_N``, ``A = sum |x_i|``. Within a tile the
kernel sums ``y_i = x_i * 2**-6`` in float32. Multiplying by a power of two is exact except where
``y_i`` falls below float32's smallest normal (``|x_i| < 2**-120``), where it rounds by at most half
a denormal spacing, ``2**-150``, i.e. ``2**-144`` after scaling back (``2**-120`` on hardware that
flushes denormals to zero). The scaling keeps a tile's sum finite: 32 values of at most the largest
bfloat16/float32 (``< 2**128``) scaled by ``2**-6`` sum to at most ``2**127``, half of float32's
range. A float32 sum of ``n <= 32`` terms, in any order (Triton's tree or the interpreter's loop),
is within ``g(n - 1) * sum |y_i|`` of the exact sum, where ``g(k) = k u / (1 - k u)`` and ``u =
2**-24`` (float32's unit roundoff): at most ``g(31) = 1.848e-6`` of ``A``. Scaling back by
``2**6`` is exact. The float64 adds of the tile sums (at most ``N/32 + row blocks + 1`` terms) and
the torch path's own float64 sum of ``N`` terms each add at most ``g64(N) = N 2**-53 / (1 - N
2**-53)`` of ``A``. For ``N <= 2**24`` rows per call (a batch of 16M tokens) that gives

    |kernel sum - float64 path sum| <= 2**-19 * A + N * 2**-143        (2**-19 = 1.907e-6)

(``N * 2**-119`` for the second term where denormals are flushed), and the same for the positive
sums with ``A`` over the positive entries. So each sum carries a relative error of at most 1.9e-6 of
the magnitudes summed: an activation mean of ``mean |x|`` is off by at most 1.9e-6 of it, far below
anything steering can tell. The counts are exact and bit for bit those of the torch path, as
before. ``FLOAT32_BLOCKS = False`` restores the float64 sum of every element (for comparisons:
``scripts/bench_gpu.py``), whose sums agree with the torch path's to float64 rounding.

Triton is imported on first use only: CPU-only installs never import it. Set
``NEURONREG_FUSED_COUNTING=0`` to count with the torch path on CUDA too (for comparisons).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

log = logging.getLogger("neuronreg")

# dtype -> (same-width signed integer dtype, bit pattern of +inf in it)
_BITS = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
}
BLOCK_COLS = 128
BLOCK_ROWS = 32
ENV = "NEURONREG_FUSED_COUNTING"
# Sum each tile of BLOCK_ROWS rows in float32, then the tile sums in float64 (see the module docstring);
# False: every element in float64, as before (kept for the benchmark's side-by-side comparison).
FLOAT32_BLOCKS = True
# Tile values are scaled by this power of two so that a tile's float32 sum cannot overflow: BLOCK_ROWS
# values below 2**128 sum to below 2**133, scaled to below 2**127 (half of float32's range).
TILE_SCALE = 2.0 ** -6
assert BLOCK_ROWS * TILE_SCALE <= 0.5


def fused_counting_enabled(tensor: torch.Tensor) -> bool:
    """Whether :func:`add_positive_counts` takes this tensor: a CUDA tensor of a supported dtype, with
    Triton installed, and not switched off by ``NEURONREG_FUSED_COUNTING=0``."""
    return (tensor.is_cuda and tensor.dtype in _BITS and os.environ.get(ENV, "1") != "0"
            and triton_available())


@functools.cache
def triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        log.debug("Triton is not installed; counting on CUDA uses the torch path.")
        return False
    try:
        _kernel()
    except Exception as exc:  # an old or broken Triton: the torch path counts the same, only slower
        log.warning("The fused counting kernel is unavailable (%s: %s); counting uses the torch path.",
                    type(exc).__name__, exc)
        return False
    return True


# Bound by _kernel() on first use. Module globals, not locals of _kernel: Triton resolves the names a
# kernel uses through its module's globals (older Triton versions do not see a closure's variables).
triton = tl = None
_TRITON_FLOAT: dict = {}  # torch dtype -> Triton dtype, once Triton is imported


@functools.cache
def _kernel():
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def count_positive(bits_ptr, partial_ptr, sum_ptr, positive_sum_ptr, rows, cols, stride_row,
                       rows_per_program, INF_BITS: tl.constexpr, FLOAT: tl.constexpr, LARGEST: tl.constexpr,
                       SUMS: tl.constexpr, BLOCKS32: tl.constexpr, SCALE: tl.constexpr,
                       UNSCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        block_col = tl.program_id(0)
        block_row = tl.program_id(1)
        col = block_col * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = col < cols
        start = block_row * rows_per_program
        end = tl.minimum(start + rows_per_program, rows)
        acc = tl.zeros([BLOCK_C], dtype=tl.int32)
        total = tl.zeros([BLOCK_C], dtype=tl.float64)
        positive_total = tl.zeros([BLOCK_C], dtype=tl.float64)
        for first in range(start, end, BLOCK_R):
            row = first + tl.arange(0, BLOCK_R)
            ok = (row[:, None] < end) & col_ok[None, :]
            offsets = row[:, None].to(tl.int64) * stride_row + col[None, :]
            bits = tl.load(bits_ptr + offsets, mask=ok, other=0)  # masked-off lanes read 0: not positive
            positive = (bits > 0) & (bits <= INF_BITS)
            acc += tl.sum(positive.to(tl.int32), axis=0)
            if SUMS:  # the same bits as floats; masked-off lanes are +0.0 and add nothing
                if BLOCKS32:
                    x = bits.to(FLOAT, bitcast=True).to(tl.float32)
                    x = tl.where(x == x, x, 0.0)  # NaN -> 0
                    x = tl.minimum(tl.maximum(x, -LARGEST), LARGEST) * SCALE  # +-inf -> largest; exact scaling
                    total += tl.sum(x, axis=0).to(tl.float64) * UNSCALE
                    positive_total += tl.sum(tl.where(positive, x, 0.0), axis=0).to(tl.float64) * UNSCALE
                else:
                    x = bits.to(FLOAT, bitcast=True).to(tl.float64)
                    x = tl.where(x == x, x, 0.0)
                    x = tl.minimum(tl.maximum(x, -LARGEST), LARGEST)
                    total += tl.sum(x, axis=0)
                    positive_total += tl.sum(tl.where(positive, x, 0.0), axis=0)
        tl.store(partial_ptr + block_row * cols + col, acc, mask=col_ok)
        if SUMS:
            tl.store(sum_ptr + block_row * cols + col, total, mask=col_ok)
            tl.store(positive_sum_ptr + block_row * cols + col, positive_total, mask=col_ok)

    global _TRITON_FLOAT
    _TRITON_FLOAT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    return count_positive


@functools.cache
def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's interpreter (TRITON_INTERPRET=1) runs CPU tensors: any small grid will do


def add_positive_counts(flat: torch.Tensor, into: torch.Tensor,
                        sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``into += (flat > 0).sum(0)`` for a 2-D ``flat`` of bfloat16, float16 or float32, in one read.

    ``into`` is an int64 ``[I]`` tensor (a row of the counts); it may live on another device (a model
    split over GPUs), then the row's counts travel there. ``sums``, two float64 ``[I]`` tensors, get
    the columns' activation sums and positive-activation sums added in the same read.
    """
    if flat.dim() != 2 or flat.dtype not in _BITS:
        raise ValueError(f"expected a 2-D bfloat16, float16 or float32 tensor, got {flat.dtype} {tuple(flat.shape)}")
    rows, cols = flat.shape
    if rows == 0 or cols == 0:
        return
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    int_dtype, inf_bits = _BITS[flat.dtype]
    bits = flat.view(int_dtype)
    col_blocks = -(-cols // BLOCK_COLS)
    # About 8 programs per multiprocessor (enough loads in flight to stream at memory bandwidth),
    # each over whole BLOCK_ROWS tiles.
    row_blocks = max(1, min(-(-rows // BLOCK_ROWS), -(-8 * _processors(flat.device) // col_blocks)))
    rows_per_program = -(-(-(-rows // row_blocks)) // BLOCK_ROWS) * BLOCK_ROWS
    row_blocks = -(-rows // rows_per_program)
    partial = torch.empty(row_blocks, cols, dtype=torch.int32, device=flat.device)
    if sums is None:
        partial_sums = partial_positive = torch.empty(1, dtype=torch.float64, device=flat.device)  # unused
    else:
        partial_sums = torch.empty(row_blocks, cols, dtype=torch.float64, device=flat.device)
        partial_positive = torch.empty_like(partial_sums)
    kernel = _kernel()
    kernel[(col_blocks, row_blocks)](bits, partial, partial_sums, partial_positive, rows, cols, bits.stride(0),
                                     rows_per_program, INF_BITS=inf_bits, FLOAT=_TRITON_FLOAT[flat.dtype],
                                     LARGEST=torch.finfo(flat.dtype).max, SUMS=sums is not None,
                                     BLOCKS32=FLOAT32_BLOCKS, SCALE=TILE_SCALE, UNSCALE=1 / TILE_SCALE,
                                     BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS)
    _add(into, partial.sum(0, dtype=torch.int64))
    if sums is not None:
        _add(sums[0], partial_sums.sum(0))
        _add(sums[1], partial_positive.sum(0))


def _add(into: torch.Tensor, value: torch.Tensor) -> None:
    into += value if value.device == into.device else value.to(into.device)
