"""The static GPU report (profiling.aot): stand-in driver, floor math, --check, SASS loops.

Compiling needs Triton imported without its interpreter, which tests/conftest.py turns on
when there is no GPU: the two compile tests run one subprocess (about 5 s: imports, and two
kernels compiled for sm_90a by the wheel's ptxas). No GPU needed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiling.aot import model, report, sass

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process without TRITON_INTERPRET; prints one JSON line.
_COMPILE_SCRIPT = r"""
import importlib, json, torch, triton, triton.language as tl
from profiling.aot.analyze import inspect_compiled
from profiling.aot.standin import TARGETS, compile_small, recording

@triton.jit
def tile_dot(a_ptr, b_ptr, c_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + o[:, None] * BLOCK + o[None, :])
    b = tl.load(b_ptr + o[:, None] * BLOCK + o[None, :])
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for _ in range(0, n):
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + o[:, None] * BLOCK + o[None, :], acc)

a = torch.empty(64, 64, dtype=torch.bfloat16)
ck = compile_small(tile_dot, "sm90a", a, a, torch.empty(64, 64), 5, BLOCK=64)
info = inspect_compiled(ck, "sm90a")
info.pop("_instrs")
info["ptx_target"] = [l for l in ck.asm["ptx"].splitlines() if l.startswith(".target")]

zc = importlib.import_module("meft_triton.kernels.zero_copy_gather")
val = importlib.import_module("meft_triton.kernels.validation")
before = (zc._zero_copy_gather_kernel.__dict__.get("run"), val.INTERPRETED)
launches = []
with recording([zc, val], TARGETS["sm90a"], launches):
    zc.zero_copy_gather_rows(torch.empty(40, 24, dtype=torch.float16), torch.arange(0, 40, 4),
                             torch.empty(10, 24, dtype=torch.float16))
after = (zc._zero_copy_gather_kernel.__dict__.get("run"), val.INTERPRETED)
rec = [dict(grid=l.grid, error=l.error, compiled=l.compiled is not None,
            args={k: v for k, v in l.args.items() if not hasattr(v, "data_ptr")}) for l in launches]
print(json.dumps(dict(small=info, launches=rec, restored=before == after)))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    script = tmp_path_factory.mktemp("aot") / "compile_for_sm90a.py"  # @triton.jit reads source
    script.write_text(_COMPILE_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_stand_in_driver_compiles_for_sm90a_on_cpu(compiled):
    info = compiled["small"]
    assert info["ptx_target"] == [".target sm_90a"]
    assert info["registers"] > 0
    assert info["sass_instructions"] > 0
    assert info["spill_bytes"] == 0
    assert info["shared_bytes"] > 0          # the dot's operands are staged in shared memory
    # a 64x64 bf16 tile with 4 warps is one warpgroup: wgmma (HGMMA) on sm_90a
    assert info["tensor_core_kind"] == "wgmma" and info["tensor_core_instructions"] > 0
    assert info["sass_loops"] >= 1


def test_recorder_takes_the_launchers_own_config_and_restores_the_module(compiled):
    assert compiled["restored"]
    assert len(compiled["launches"]) == 1
    launch = compiled["launches"][0]
    assert launch["error"] is None and launch["compiled"]
    # the launcher's choice: 4 rows per program, the row width rounded up to a power of two
    assert launch["grid"] == [3, 1, 1]
    assert launch["args"]["BLOCK_R"] == 4 and launch["args"]["BLOCK_W"] == 32
    assert launch["args"]["width"] == 24 and launch["args"]["num_ids"] == 10


CEIL = {"hbm_bytes_per_s": 1e6, "pcie_bytes_per_s": 1e5, "sms": 2, "issue_per_sm_per_clk": 4,
        "clock_mhz": 1000, "mma_sync_fraction": 0.5, "smem_per_block_bytes": 1000,
        "flops_per_s": {"bf16_tensor": 4e6, "fp16_tensor": 4e6, "tf32_tensor": 2e6, "fp32": 1e6}}


def test_floor_of_values_by_hand():
    c = dict(T=2, d=4, U=3, K=2, es=2)
    nbytes, flops, host = model.floor_values(c)
    # 3 value rows + 2 output rows of 4 bf16 (40 B), activations + ids 2 x 2 x 8 B (32 B)
    assert (nbytes, flops, host) == (72, 32, 0)
    # 72 B at 1 MB/s = 72 us; 32 FLOPs at 4 MFLOP/s = 8 us
    assert model.floor_us(CEIL, "bf16", nbytes, flops) == pytest.approx(72.0)
    # FLOP-bound case, and fp32 takes the CUDA-core rate: 400 FLOPs at 1 MFLOP/s = 400 us
    assert model.floor_us(CEIL, "fp32", 100, 400) == pytest.approx(400.0)
    assert model.floor_us(CEIL, "bf16", 100, 400) == pytest.approx(100.0)
    # host bytes over PCIe: 50 B at 0.1 MB/s = 500 us
    assert model.floor_us(CEIL, "bf16", 10, 0, 50) == pytest.approx(500.0)


def test_predicted_terms_by_hand():
    # issue: 1000 instructions x 4 warps x 10 programs / (2 SMs x 4 x 1000 per us) = 5 us
    assert model.issue_us(CEIL, 1000, 10, 4) == pytest.approx(5.0)
    p = model.predicted_us(CEIL, "bf16", 1, 80, 0, 1000, 10, 4, "mma.sync")
    # mma.sync at half the 4 MFLOP/s tensor rate: 80 FLOPs = 40 us, above issue and bytes
    assert p["compute_us"] == pytest.approx(40.0) and p["issue_us"] == pytest.approx(5.0)
    assert p["predicted_us"] == pytest.approx(40.0) and p["bound_by"] == "compute"
    p = model.predicted_us(CEIL, "bf16", 1, 80, 0, 1000, 10, 4, "wgmma")
    assert p["compute_us"] == pytest.approx(20.0)
    assert model.predicted_us(CEIL, "bf16", 1, 80, 0, 1000, 10, 4, "none")["compute_us"] == pytest.approx(80.0)


def _record(**changes):
    r = dict(kernel="values", target="sm90a", dtype="bf16", shape="paper-7b", compiled=True,
             error=None, registers=64, spill_bytes=0, shared_bytes=900,
             tensor_core_instructions=8, sass_instructions=500, gemm_like=True)
    r.update(changes)
    return r


def test_check_flags_what_it_should_and_nothing_else():
    ceilings = {"sm90a": CEIL}
    assert report.check([_record()], ceilings) == []
    cases = {
        "spills": _record(spill_bytes=24),
        "no tensor cores": _record(tensor_core_instructions=0),
        "shared memory": _record(shared_bytes=1001),
        "compile error": _record(compiled=False, error="OutOfResources"),
    }
    for what, rec in cases.items():
        failures = report.check([rec], ceilings)
        assert len(failures) == 1 and failures[0].startswith(what), (what, failures)
        assert "values [sm90a bf16 paper-7b]" in failures[0]
    # not failures: spills outside the presets or in fp32; no tensor cores in fp32 or in a
    # stage that is not GEMM-like
    assert report.check([_record(spill_bytes=24, shape="odd"), _record(spill_bytes=24, dtype="fp32"),
                         _record(tensor_core_instructions=0, dtype="fp32"),
                         _record(tensor_core_instructions=0, gemm_like=False)], ceilings) == []



def test_compare_fails_what_got_more_than_ten_percent_worse():
    base = [_record(predicted_us=100.0, registers=96, spill_bytes=0)]
    assert report.compare([_record(predicted_us=109.0, registers=96, spill_bytes=0)], base) == []
    assert report.compare([_record(predicted_us=80.0, registers=64, spill_bytes=0)], base) == []  # better
    for field, value in (("predicted_us", 111.0), ("registers", 112), ("spill_bytes", 8)):
        worse = report.compare([_record(**{"predicted_us": 100.0, "registers": 96, "spill_bytes": 0, field: value})],
                               base)
        assert len(worse) == 1 and field in worse[0] and "values/sm90a/bf16/paper-7b" in worse[0], worse
    missing = report.compare([_record(compiled=False)], base)
    assert len(missing) == 1 and "not compiled" in missing[0]
    assert report.compare([_record(target="sm80")], base) == []  # another target: not compared

NESTED = """
        /*0000*/                   S2R R0, SR_TID.X ;                      /* 0x0000000000007919 */
        /*0010*/                   MOV R1, RZ ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   ISETP.GT.AND P0, PT, R2, 0x3, PT ;
        /*0050*/               @P0 BRA 0x30 ;
        /*0060*/                   FADD R3, R3, 1 ;
        /*0070*/              @!P1 BRA 0x20 ;
        /*0080*/                   NOP ;
        /*0090*/                   STG.E desc[UR4][R6.64], R3 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""

# an unrolled main loop (4 copies) and its remainder loop: one source loop
UNROLLED = """
        /*0000*/                   MOV R1, RZ ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0050*/                   ISETP.GT.AND P0, PT, R2, 0x3, PT ;
        /*0060*/               @P0 BRA 0x10 ;
        /*0070*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0080*/                   ISETP.NE.AND P0, PT, R2, RZ, PT ;
        /*0090*/               @P0 BRA 0x70 ;
        /*00a0*/                   EXIT ;
"""


def test_sass_loop_bodies_and_dynamic_count():
    instrs = sass.parse_sass(NESTED)
    assert len(instrs) == 11                       # NOP left out, predicates stripped
    assert [i.op for i in instrs[:2]] == ["S2R", "MOV"] and instrs[5].op == "BRA"
    assert sass.tensor_core_count(instrs) == 1 and sass.tensor_core_kind(instrs) == "mma.sync"
    loops = sass.find_loops(instrs)                # the trap BRA to itself is no loop
    assert [(l.start, l.end) for l in loops] == [(0x20, 0x70)]
    assert [(l.start, l.end) for l in loops[0].children] == [(0x30, 0x50)]
    notes = []
    src = [sass.SourceLoop("outer", 5, [sass.SourceLoop("inner", 3)])]
    # 5 straight + 5 x (3 outer-only + 3 x 3 inner) = 65
    assert sass.dynamic_count(instrs, src, notes) == 65 and notes == []
    # a source nest that does not match is reported, not silently accepted
    notes = []
    sass.dynamic_count(instrs, [sass.SourceLoop("a", 2), sass.SourceLoop("b", 2)], notes)
    assert notes and "2 source loop(s), 1 SASS loop group(s)" in notes[0]

    instrs = sass.parse_sass(UNROLLED)
    assert len(sass.find_loops(instrs)) == 2
    notes = []
    # merged into one source loop, costed at the remainder body (3) per trip: 2 + 8 x 3
    assert sass.dynamic_count(instrs, [sass.SourceLoop("k", 8)], notes) == 2 + 8 * 3
    assert notes == []
