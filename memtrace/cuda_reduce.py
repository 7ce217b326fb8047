"""The scratch of CUDA's reduction kernel: a port of the sizing in PyTorch's ``gpu_reduce_kernel``
(aten/src/ATen/native/cuda/Reduce.cuh).

When a TensorIterator reduction (``sum``, ``mean``, ...) is split across several CTAs per output ("global
reduce", ``config.should_global_reduce()``), ``gpu_reduce_kernel`` allocates two temporaries through the
caching allocator, after the output, and frees them when the op returns::

    ReduceConfig config = setReduceConfig<arg_t, scalar_t, vt0, input_vec_size>(iter);
    if (config.should_global_reduce()) {
      buffer     = allocator.allocate(config.global_memory_size());
      semaphores = allocator.allocate(config.semaphore_size());
    }

The buffer is ``sizeof(arg_t) * num_outputs * ctas_per_output`` (times the block width when the reduction
is not along the fastest input dim), so a bias gradient (a column sum of [tokens, width]) can take tens of
MiB: a 2048-wide bias over 4096 rows takes 64 MiB on an H100, larger than the gradient itself. The sizes
depend on the GPU through its SM count and threads per SM (``target_grid_size``).

Ported from Reduce.cuh of PyTorch 2.11 (last_pow2, ReduceConfig, get_output_vec_size, setReduceConfig,
gpu_reduce_kernel with its 32-bit-indexing split and AccumulationBuffer) and TensorIterator.cpp
(reorder_dimensions, coalesce_dimensions, the 32-bit split); the sizes are the same in 2.5 through 2.14
(2.5 vectorises inputs under a slightly different test, which cannot change them). Checked on an H100
(PyTorch 2.11) against 424 sum and mean reductions of random shapes, strides and dtypes, byte for byte.
Sizes are requested bytes, before the allocator's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------
# helpers (Reduce.cuh l. 27-38)
# --------------------------------------------------------------------------
def div_up(a: int, b: int) -> int:
    return (a + b - 1) // b


def last_pow2(n: int) -> int:
    """floor-power-of-two, as ``last_pow2`` (int arithmetic, n < 2**31)."""
    n = int(n)
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    return max(1, n - (n >> 1))


# --------------------------------------------------------------------------
# A minimal TensorIterator for a single-output reduction.
# operand 0 = output (reduced dims have stride 0), operand 1 = input.
# --------------------------------------------------------------------------
@dataclass
class _Iter:
    shape: List[int]
    out_strides: List[int]          # bytes
    in_strides: List[int]           # bytes
    in_offset: int = 0              # byte offset of the input data ptr from an aligned base
    is_reduction: bool = True

    # ---- TensorIteratorBase::ndim / numel / num_reduce_dims / num_output_elements
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def num_reduce_dims(self) -> int:
        return sum(1 for st in self.out_strides if st == 0)

    def num_output_elements(self) -> int:
        e = 1
        for d in range(self.ndim()):
            if self.out_strides[d] != 0 or self.shape[d] == 0:
                e *= self.shape[d]
        return e

    def _ops(self):
        return [self.out_strides, self.in_strides]

    # ---- TensorIteratorBase::reorder_dimensions (reduction flavour)
    def reorder_dimensions(self) -> None:
        nd = self.ndim()
        if nd <= 1:
            return
        perm = list(range(nd - 1, -1, -1))
        shape = self.shape
        ops = self._ops()

        def should_swap(dim0: int, dim1: int) -> int:
            for arg, strides in enumerate(ops):
                s0, s1 = strides[dim0], strides[dim1]
                if self.is_reduction and arg == 0:   # is_output
                    if (s0 == 0) != (s1 == 0):
                        return 1 if s1 == 0 else -1
                if s0 == 0 or s1 == 0:
                    continue
                elif s0 < s1:
                    return -1
                elif s0 > s1:
                    return 1
                else:
                    if shape[dim0] > shape[dim1]:
                        return 1
            return 0

        for i in range(1, nd):
            dim1 = i
            for dim0 in range(i - 1, -1, -1):
                c = should_swap(perm[dim0], perm[dim1])
                if c > 0:
                    perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
                    dim1 = dim0
                elif c < 0:
                    break
        self.shape = [shape[p] for p in perm]
        self.out_strides = [self.out_strides[p] for p in perm]
        self.in_strides = [self.in_strides[p] for p in perm]

    # ---- TensorIteratorBase::coalesce_dimensions
    def coalesce_dimensions(self) -> None:
        nd = self.ndim()
        if nd <= 1:
            return
        shape = self.shape
        ops = self._ops()

        def can_coalesce(d0: int, d1: int) -> bool:
            if shape[d0] == 1 or shape[d1] == 1:
                return True
            for st in ops:
                if shape[d0] * st[d0] != st[d1]:
                    return False
            return True

        def replace_stride(d0: int, d1: int) -> None:
            for st in ops:
                st[d0] = st[d1]

        prev = 0
        for dim in range(1, nd):
            if can_coalesce(prev, dim):
                if shape[prev] == 1:
                    replace_stride(prev, dim)
                shape[prev] *= shape[dim]
            else:
                prev += 1
                if prev != dim:
                    replace_stride(prev, dim)
                    shape[prev] = shape[dim]
        del shape[prev + 1:]
        for st in ops:
            del st[prev + 1:]

    # ---- 32-bit indexing split (TensorIteratorBase::can_use_32bit_indexing,
    #      get_dim_to_split, split, narrow; SplitUntil32Bit iterator)
    def can_use_32bit_indexing(self) -> bool:
        if self.numel() > INT32_MAX:
            return False
        for st in self._ops():
            max_offset = 1
            for d in range(self.ndim()):
                max_offset += (self.shape[d] - 1) * st[d]
            if max_offset > INT32_MAX:
                return False
        return True

    def get_dim_to_split(self) -> int:
        max_extent, dim_to_split = -1, -1
        for d in range(self.ndim() - 1, -1, -1):
            size = self.shape[d]
            if size == 0:
                continue
            for st in self._ops():
                extent = (size - 1) * abs(st[d])
                if extent > max_extent:
                    max_extent, dim_to_split = extent, d
        return dim_to_split

    def copy(self) -> "_Iter":
        return _Iter(list(self.shape), list(self.out_strides), list(self.in_strides),
                     self.in_offset, self.is_reduction)

    def narrow(self, dim: int, start: int, size: int) -> None:
        self.shape[dim] = size
        self.in_offset += self.in_strides[dim] * start
        # (size == 1 && !is_reduction_) -> coalesce: never for reductions

    def split(self, dim: int) -> "_Iter":
        cp = self.copy()
        copy_size = self.shape[dim] // 2
        this_size = self.shape[dim] - copy_size
        cp.narrow(dim, 0, copy_size)
        self.narrow(dim, copy_size, this_size)
        return cp

    def with_32bit_indexing(self) -> List["_Iter"]:
        """Sub-iterators in the order gpu_reduce_kernel launches them."""
        out: List[_Iter] = []
        vec: List[Optional[_Iter]] = [self.copy(), None]

        def advance():
            vec.pop()
            while vec and not vec[-1].can_use_32bit_indexing():
                it = vec[-1]
                vec.append(it.split(it.get_dim_to_split()))

        advance()
        while vec:
            out.append(vec[-1])
            advance()
        return out


def build_reduction_iter(input_shape: Sequence[int],
                         input_strides: Optional[Sequence[int]],
                         reduce_dims: Optional[Sequence[int]],
                         input_itemsize: int,
                         output_itemsize: int,
                         keepdim: bool = False,
                         output_strides: Optional[Sequence[int]] = None,
                         input_storage_offset: int = 0) -> _Iter:
    """Mimic ``make_reduction`` + ``TensorIterator::reduce_op(...).build()``.

    * output allocated by the structured meta fn (``resize_reduction`` ->
      ``set_output_raw_strided(0, shape, {}, ...)``) i.e. contiguous in the kept
      dims, unless ``output_strides`` (elements, full rank incl. reduced dims) given;
    * ``review_reduce_result`` / ``compute_strides`` give stride 0 to reduced dims;
    * reduce_op() does no fast set-up: reorder_dimensions then coalesce_dimensions.
    """
    shape = [int(s) for s in input_shape]
    nd = len(shape)
    if input_strides is None:
        input_strides, acc = [0] * nd, 1
        for d in range(nd - 1, -1, -1):
            input_strides[d] = acc
            acc *= shape[d]
    if reduce_dims is None or len(reduce_dims) == 0:
        rd = set(range(nd))            # dim=None / [] -> full reduction
    else:
        rd = {d % nd for d in reduce_dims}
    # output: contiguous over the keepdim-shape
    if output_strides is None:
        oshape = [1 if d in rd else shape[d] for d in range(nd)]
        output_strides, acc = [0] * nd, 1
        for d in range(nd - 1, -1, -1):
            output_strides[d] = acc
            acc *= oshape[d]
    out_b = [0 if (d in rd) else int(output_strides[d]) * output_itemsize for d in range(nd)]
    in_b = [int(input_strides[d]) * input_itemsize for d in range(nd)]
    # compute_strides: a size-1 operand dim broadcast against shape_ != 1 gets 0;
    # the output of a reduction has size 1 in reduced dims (handled above).
    it = _Iter(shape, out_b, in_b, in_offset=input_storage_offset * input_itemsize)
    it.reorder_dimensions()
    it.coalesce_dimensions()
    return it


# --------------------------------------------------------------------------
# ReduceConfig + setReduceConfig (Reduce.cuh l. 74-219, 1007-1179)
# --------------------------------------------------------------------------
@dataclass
class ReduceConfig:
    element_size_bytes: int
    num_outputs: int
    num_inputs: int
    warp_size: int = 32
    step_input: int = 1
    step_output: int = 1
    ctas_per_output: int = 1
    input_mult: List[int] = field(default_factory=lambda: [0, 0, 0])
    output_mult: List[int] = field(default_factory=lambda: [0, 0])
    block_width: int = 0
    block_height: int = 0
    num_threads: int = 0
    vectorize_input: bool = False
    output_vec_size: int = 1

    def set_block_dimension(self, dim0: int, dim1: int, mnt: int = 512) -> None:
        max_num_threads = mnt // self.output_vec_size
        dim0_pow2 = last_pow2(dim0) if dim0 < max_num_threads else max_num_threads
        dim1_pow2 = last_pow2(dim1) if dim1 < max_num_threads else max_num_threads
        self.block_width = min(dim0_pow2, self.warp_size)
        self.block_height = min(dim1_pow2, max_num_threads // self.block_width)
        self.block_width = min(dim0_pow2, max_num_threads // self.block_height)
        self.num_threads = self.block_width * self.block_height

    def split_input(self, parallelism: int) -> int:
        step = self.step_input
        self.step_input *= parallelism
        return step

    def split_output(self, parallelism: int) -> int:
        step = self.step_output
        self.step_output *= parallelism
        return step

    def grid(self) -> Tuple[int, int]:
        return (div_up(self.num_outputs // self.output_vec_size, self.step_output),
                self.ctas_per_output)

    def should_block_x_reduce(self) -> bool:
        return self.input_mult[0] != 0

    def should_block_y_reduce(self) -> bool:
        return self.input_mult[1] != 0

    def should_global_reduce(self) -> bool:
        return self.input_mult[2] != 0

    def values_per_thread(self) -> int:
        return div_up(self.num_inputs, self.step_input)

    def global_memory_size(self) -> int:
        if not self.should_global_reduce():
            return 0
        size = self.element_size_bytes * self.num_outputs * self.ctas_per_output
        if not self.should_block_x_reduce():
            size *= self.block_width * self.output_vec_size
        return size

    def semaphore_size(self) -> int:
        if not self.should_global_reduce():
            return 0
        return 4 * self.grid()[0]          # sizeof(int) * grid().x

    def shared_memory_size(self) -> int:
        if (not self.should_block_y_reduce()
                and (not self.should_block_x_reduce() or self.block_width <= self.warp_size)):
            return 0
        return self.element_size_bytes * self.num_threads * self.output_vec_size


def get_output_vec_size(it: _Iter, scalar_size: int) -> int:
    vec = 4

    def upd(n: int) -> None:
        nonlocal vec
        while n % vec != 0:
            vec //= 2

    upd(it.in_offset // scalar_size)   # data ptr / sizeof(scalar_t); base assumed aligned
    output_index = it.num_reduce_dims()
    upd(it.shape[output_index])
    for j, st in enumerate(it.in_strides):
        if j != output_index:
            upd(st // scalar_size)
    return vec


def set_reduce_config(it: _Iter, *, acc_itemsize: int, scalar_size: int,
                      vt0: int = 4, input_vec_size: Optional[int] = None,
                      sm_count: int = 132, max_threads_per_sm: int = 2048,
                      warp_size: int = 32, max_num_threads: int = 512,
                      legacy_25: bool = False) -> ReduceConfig:
    """Port of ``setReduceConfig<arg_t, scalar_t, vt0, input_vec_size>(iter)``."""
    if input_vec_size is None:
        input_vec_size = vt0
    num_outputs = it.num_output_elements()
    inputs_per_output = it.numel() // num_outputs
    cfg = ReduceConfig(acc_itemsize, num_outputs, inputs_per_output, warp_size=warp_size)

    nd = it.ndim()
    nrd = it.num_reduce_dims()
    if nd > 0:
        red_fast = (nrd == nd) or (it.in_strides[0] < it.in_strides[nrd])
        if red_fast:
            dim0, dim1 = inputs_per_output, num_outputs
            fastest = it.in_strides[0]
        else:
            dim0, dim1 = num_outputs, inputs_per_output
            fastest = it.in_strides[nrd]
    else:
        red_fast, fastest, dim0, dim1 = True, scalar_size, 1, 1

    if fastest == scalar_size:
        if legacy_25:  # torch <= 2.5: `dim0 > 128 && ... && vt0 >= 4`, dim0 /= 4
            if red_fast and dim0 > 128 and nrd == 1 and vt0 >= 4:
                cfg.vectorize_input = True
                dim0 //= 4
            elif not red_fast:
                cfg.output_vec_size = get_output_vec_size(it, scalar_size)
                dim0 //= cfg.output_vec_size
        else:
            if red_fast and dim0 >= 128 and nrd == 1:
                cfg.vectorize_input = True
                dim0 //= input_vec_size
            elif not red_fast:
                cfg.output_vec_size = get_output_vec_size(it, scalar_size)
                dim0 //= cfg.output_vec_size

    cfg.set_block_dimension(dim0, dim1, max_num_threads)
    bw, bh = cfg.block_width, cfg.block_height

    if nd == 0 or red_fast:
        cfg.input_mult[0] = cfg.split_input(bw)
    else:
        cfg.output_mult[0] = cfg.split_output(bw)

    min_vpt = 16
    max_vpt = 256
    warp_split_threshold = min(bh * 16, max_vpt)
    if cfg.values_per_thread() >= warp_split_threshold:
        cfg.input_mult[1] = cfg.split_input(bh)
    else:
        cfg.output_mult[1] = cfg.split_output(bh)

    blocks_per_sm = max_threads_per_sm // cfg.num_threads
    target_grid_size = sm_count * blocks_per_sm
    grid = cfg.grid()[0]
    if cfg.input_mult[1] != 0 and cfg.values_per_thread() >= max_vpt and grid <= target_grid_size:
        c1 = div_up(target_grid_size, grid)
        c2 = div_up(cfg.values_per_thread(), min_vpt)
        c3 = div_up(cfg.values_per_thread(), max_vpt)
        cfg.ctas_per_output = max(min(c1, c2), c3)   # == std::clamp(c1, c3, c2) in 2.14
        if cfg.ctas_per_output > 1:
            cfg.input_mult[2] = cfg.split_input(cfg.ctas_per_output)
    return cfg


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def reduce_launches(input_shape: Sequence[int],
                    input_strides: Optional[Sequence[int]] = None,
                    reduce_dims: Optional[Sequence[int]] = None,
                    input_dtype_itemsize: int = 4,
                    acc_itemsize: int = 4,
                    output_itemsize: Optional[int] = None,
                    *,
                    keepdim: bool = False,
                    sm_count: int = 132,
                    max_threads_per_sm: int = 2048,
                    warp_size: int = 32,
                    vt0: int = 4,
                    input_vec_size: Optional[int] = None,
                    max_num_threads: int = 512,
                    output_strides: Optional[Sequence[int]] = None,
                    input_storage_offset: int = 0,
                    can_accumulate_in_output: Optional[bool] = None,
                    legacy_25: bool = False) -> List[dict]:
    """One dict per kernel launch of ``gpu_reduce_kernel`` (several only when
    the iterator needs 64-bit indexing and is split by ``with_32bit_indexing``).

    Each dict: buffer_bytes, semaphore_bytes, acc_buf_bytes (the
    AccumulationBuffer, allocated once before the first sub-launch, only when
    the iterator is split *and* the output can't accumulate, i.e. half->half /
    bf16->bf16), plus the ReduceConfig fields.
    """
    if output_itemsize is None:
        output_itemsize = input_dtype_itemsize
    it = build_reduction_iter(input_shape, input_strides, reduce_dims,
                              input_dtype_itemsize, output_itemsize, keepdim,
                              output_strides, input_storage_offset)
    if it.numel() == 0:
        return []
    if can_accumulate_in_output is None:
        # acc float -> out half/bf16 with in==out 16-bit: False (gpu_reduce_kernel l.1192-1205)
        can_accumulate_in_output = not (input_dtype_itemsize == 2 and output_itemsize == 2)
    acc_buf = 0
    subs = [it]
    if not it.can_use_32bit_indexing():
        if not can_accumulate_in_output:
            oms = output_itemsize
            for d in range(it.ndim()):
                oms = max(oms, it.shape[d] * it.out_strides[d])
            acc_buf = (oms // output_itemsize) * acc_itemsize
        subs = it.with_32bit_indexing()
    res = []
    for sub in subs:
        cfg = set_reduce_config(sub, acc_itemsize=acc_itemsize,
                                scalar_size=input_dtype_itemsize, vt0=vt0,
                                input_vec_size=input_vec_size, sm_count=sm_count,
                                max_threads_per_sm=max_threads_per_sm,
                                warp_size=warp_size, max_num_threads=max_num_threads,
                                legacy_25=legacy_25)
        res.append(dict(
            buffer_bytes=cfg.global_memory_size(),
            semaphore_bytes=cfg.semaphore_size(),
            acc_buf_bytes=acc_buf,
            iter_shape=list(sub.shape), in_strides=list(sub.in_strides),
            out_strides=list(sub.out_strides), num_reduce_dims=sub.num_reduce_dims(),
            num_outputs=cfg.num_outputs, inputs_per_output=cfg.num_inputs,
            block=(cfg.block_width, cfg.block_height), grid=cfg.grid(),
            ctas_per_output=cfg.ctas_per_output, output_vec_size=cfg.output_vec_size,
            vectorize_input=cfg.vectorize_input, values_per_thread=cfg.values_per_thread(),
            input_mult=list(cfg.input_mult), output_mult=list(cfg.output_mult),
            shared_memory_bytes=cfg.shared_memory_size(),
        ))
    return res


def reduce_scratch_bytes(*args, **kwargs) -> Tuple[int, int]:
    """Requested bytes of (staging buffer, semaphores) allocated by ``gpu_reduce_kernel`` for one
    reduction, (0, 0) if there is no global reduce; takes ``reduce_launches``' arguments:

    input_shape / input_strides: logical sizes and strides (elements) of the reduced tensor (strides
        default: contiguous); reduce_dims: dims reduced (None or [] = all);
    input_dtype_itemsize: sizeof(scalar_t) of the kernel's input (2 for bf16 even when a float output is
        asked for); acc_itemsize: sizeof(arg_t), the accumulation type: 4 for sum/mean/norm of
        f16/bf16/f32, 8 for f64 and int64 sums, 16 for Welford (var/std);
    sm_count / max_threads_per_sm: cudaDeviceProp multiProcessorCount / maxThreadsPerMultiProcessor
        (H100 SXM: 132 / 2048; A100: 108 / 2048).

    An iterator that needs 64-bit indexing is split into launches that each allocate and free their own
    pair; the largest is returned, since they never overlap."""
    launches = reduce_launches(*args, **kwargs)
    if not launches:
        return (0, 0)
    return (max(launch["buffer_bytes"] for launch in launches), max(launch["semaphore_bytes"] for launch in launches))
