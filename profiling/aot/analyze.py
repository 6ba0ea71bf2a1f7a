"""One (target, dtype, shape) case: run the launchers under the recorder, read each compiled
kernel, and turn it into records (one per launch)."""

from __future__ import annotations

import os
import time
from collections import defaultdict

import torch

from . import model, sass
from .standin import TARGETS, Launch, cubin_text, recording, resource_usage
from .workloads import DTYPES, SHAPES, STAGE_LABELS, context, kernel_modules, make_inputs, run_workloads


def _plain(value):
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def inspect_compiled(compiled, target_name: str) -> dict:
    """Registers, spills, shared memory and SASS facts of one CompiledKernel."""
    text, res = cubin_text(compiled.asm["cubin"])
    usage = resource_usage(res)
    instrs = sass.parse_sass(text)
    meta = compiled.metadata
    return dict(
        registers=usage["registers"], spill_bytes=usage["local_bytes"], stack_bytes=usage["stack_bytes"],
        shared_bytes=int(meta.shared) + usage["static_shared_bytes"],
        num_warps=int(meta.num_warps), num_stages=int(meta.num_stages),
        tensor_core_instructions=sass.tensor_core_count(instrs),
        tensor_core_kind=sass.tensor_core_kind(instrs),
        sass_instructions=len(instrs), sass_loops=_count_loops(sass.find_loops(instrs)),
        _instrs=instrs,
    )


def _count_loops(loops) -> int:
    return sum(1 + _count_loops(l.children) for l in loops)


def record_for(launch: Launch, label: str, workload: str, target_name: str, dtype: str,
               shape_name: str, ctx: dict, ceil: dict) -> dict:
    programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
    constexprs = {k: _plain(v) for k, v in launch.args.items() if k.isupper()}
    rec = dict(kernel=label, workload=workload, triton_kernel=launch.kernel, target=target_name,
               dtype=dtype, shape=shape_name, shape_params={k: ctx[k] for k in ("T", "d", "N", "E", "S", "P", "K", "U", "Ue")},
               grid=list(launch.grid), programs=programs, constexprs=constexprs,
               launch_options={k: _plain(v) for k, v in launch.options.items()},
               compiled=launch.error is None and launch.compiled is not None, error=launch.error)
    stage = model.STAGES.get(label)
    rec["gemm_like"] = bool(stage and stage.gemm_like)
    if stage:
        nbytes, flops, host = stage.floor(ctx)
        rec.update(bytes=nbytes, flops=flops, host_bytes=host,
                   floor_us=model.floor_us(ceil, dtype, nbytes, flops, host))
    else:
        rec.update(bytes=None, flops=None, host_bytes=None, floor_us=None)
    if not rec["compiled"]:
        return rec
    info = inspect_compiled(launch.compiled, target_name)
    instrs = info.pop("_instrs")
    rec.update(info)
    if stage:
        notes: list[str] = []
        per_warp = sass.dynamic_count(instrs, stage.loops(launch.args, launch.grid), notes)
        rec["dynamic_instructions_per_warp"] = round(per_warp, 1)
        rec["loop_notes"] = notes
        # an fp32 "tf32x3" dot issues three tensor-core products per multiply
        passes = model.TF32X3_PRODUCTS if launch.args.get("DOT_PRECISION") == "tf32x3" else 1
        rec.update(model.predicted_us(ceil, dtype, rec["bytes"], rec["flops"] * passes, rec["host_bytes"],
                                      per_warp, programs, info["num_warps"], info["tensor_core_kind"]))
        rec["predicted_over_floor"] = rec["predicted_us"] / rec["floor_us"] if rec["floor_us"] else None
    return rec


def compile_case(target_name: str, dtype: str, shape_name: str, workloads=None) -> list[dict]:
    """Records of every launch the workloads make at this shape and dtype, for this target."""
    ceil = model.load_ceilings()[target_name]
    shape = SHAPES[shape_name]
    torch_dtype = DTYPES[dtype]
    inputs = make_inputs(shape, torch_dtype)
    base_ctx = context(shape, inputs, torch_dtype)
    records = []
    for workload, call in run_workloads(shape, inputs, workloads):
        ctx = context(shape, inputs, torch_dtype, workload) if workload == "factored_rows" else base_ctx
        launches: list[Launch] = []
        t0 = time.perf_counter()
        try:
            with recording(kernel_modules(), TARGETS[target_name], launches):
                call()
        except Exception as exc:  # the launcher itself failed (e.g. a compile error it raised)
            records.append(dict(kernel=f"{workload}:launcher", workload=workload, target=target_name,
                                dtype=dtype, shape=shape_name, compiled=False,
                                error=f"{type(exc).__name__}: {exc}"[:2000], gemm_like=False))
        seen: dict[str, int] = defaultdict(int)
        for launch in launches:
            n = seen[launch.kernel]
            seen[launch.kernel] += 1
            names = STAGE_LABELS.get(workload, {}).get(launch.kernel, [])
            label = names[n] if n < len(names) else f"{workload}:{launch.kernel}#{n}"
            rec = record_for(launch, label, workload, target_name, dtype, shape_name, ctx, ceil)
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
            records.append(rec)
    return records


def worker_init():
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(1)


def compile_case_star(args) -> list[dict]:
    return compile_case(*args)
