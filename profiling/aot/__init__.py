"""Static GPU report: compile every Triton kernel for sm_90a / sm_80 on a CPU-only machine and
predict its time from the compiled code (docs/DESIGN.md, "Testing without a GPU").

    python -m profiling.aot                          # sm90a and sm80, bf16/fp16/fp32, 3 shapes
    python -m profiling.aot --targets sm90a --dtypes bf16 --shapes paper-7b scale-7b --check

How. The real launchers (router_topk, sparse_kv_select + sparse_kv_values, sparse_kv_backward
with the row gather-sum and segment sums it launches, smt_block_grad, zero_copy_gather_rows)
run on CPU tensors of the real shapes under a stand-in Triton driver whose current target is
``GPUTarget("cuda", 90, 32)`` or ``("cuda", 80, 32)``; each ``kernel[grid](...)`` is recorded
(grid, every argument, the block sizes the launcher chose) and compiled with ``warmup=True``
on the same arguments, so the launch configuration is exactly the launcher's and nothing is
run (:mod:`.standin`). No kernel file is changed for this. The wheel's ``cuobjdump`` reads the
cubin: registers, local memory (spills) and stack per thread, static shared memory (added to
Triton's dynamic shared memory), and the SASS (:mod:`.sass`).

Per record (one launch at one target, dtype, shape):

* ``floor_us`` = max(bytes / HBM bandwidth, host bytes / PCIe bandwidth, FLOPs / rate), the
  bytes and FLOPs of one small function per stage in :mod:`.model` (each says what it counts:
  every input read once, every output written once, distinct rows only), the rate the
  dtype's best at its tolerance (tensor cores for bf16/fp16; for fp32 the faster of the CUDA
  cores and tf32 tensor cores at a third of their rate: the fp32 kernels ask for "tf32x3",
  three tf32 products per multiply). Ceilings: ``profiling/gpu_ceilings.json``.
* ``predicted_us`` = max(bytes term, issue term, compute term):
  - bytes term: the floor's bytes over the bandwidths;
  - issue term: SASS instructions one warp executes (straight-line code once, each loop body
    times its trip count from the shapes and block sizes, loops found by backward branches)
    x warps x programs / (SMs x 4 warp instructions per SM per clock x clock);
  - compute term: the FLOPs at the rate of the instruction class the SASS actually holds:
    wgmma (HGMMA) at the tensor rate, mma.sync (HMMA) at ``mma_sync_fraction`` of it (below 1
    on Hopper), no tensor-core instruction at the fp32 CUDA-core rate; a "tf32x3" kernel's
    FLOPs count three times. This third term goes
    beyond "bytes or issue"; without it a GEMM on tensor cores could be predicted faster
    than the hardware can multiply.

What the model leaves out (so ``predicted_us`` is a lower bound of what the code can do, and
the first GPU run checks it):

* re-reads: the bytes term counts each distinct byte once (re-reads assumed to hit L2), so
  a kernel that re-reads a tile per program (hidden rows per (token, expert) pair, gathered
  rows per d-slice) is not charged for it beyond its issue slots;
* latency and occupancy: no memory-latency or dependency stalls, no limit from registers or
  shared memory on resident warps, no tail effect of the last wave, no launch overhead
  (a few µs per launch, which dominates the small shape);
* the cost of an instruction: every warp instruction takes one issue slot; tensor-core,
  MUFU, shuffle and shared-memory pipes are not modelled beyond the compute term; predicated
  off and early-return paths are counted as executed (key-score blocks with no pairs are
  the exception: their loop is weighted by the share of live blocks);
* loop shape: a software-pipelined loop is costed as trips x body (its peeled prologue once);
  an unrolled loop with a remainder loop (found as similar sibling loops) at the remainder's
  body per iteration (over by the loop overhead); a source loop without a SASS loop
  (fully unrolled) once, and a SASS loop without a source loop once (both are listed in
  ``loop_notes``); calls into subroutines (e.g. 64-bit division) are counted once, not per
  call; data-dependent trip counts (segment runs) are averaged over the programs;
* routing: index tensors route uniformly at random (each token P distinct experts, K_top of
  their candidates), so grids and distinct-row counts are those of uniform routing; real
  routing touches fewer rows (docs/DESIGN.md, "Semantics") and is more skewed (longer segments);
* the softmax gate's backward (dense dg, two cuBLAS GEMMs) is not in the workloads: the
  backward runs gate="logit"; router_topk runs gate="logit" (no log-sum-exp).

``--check`` fails on a compile error, shared memory over the target's per-block limit
(sm_90a 227 KB, sm_80 163 KB), spills (local memory) in bf16/fp16 at either preset, and a
GEMM-like stage (router, key scores, values, score grads, dx, dK/dV, dG, SMT block grads)
with no tensor-core instruction in bf16/fp16.
"""
