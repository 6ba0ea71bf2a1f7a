"""SASS reading: instructions, tensor-core instructions, loop bodies and dynamic counts.

A loop is found by its backward branch: a ``BRA`` to an address strictly below its own (a
branch to itself is the end-of-kernel trap, not a loop). Back-edges to one
header make one loop ``[header, last back-edge]``; loops nest by containment.

Dynamic instruction count of one program (:func:`dynamic_count`): straight-line instructions
once, each loop's body times its trip count, recursively. The compiler may turn one source
loop into several SASS loops side by side (an unrolled main loop and its remainder loop):
adjacent sibling loops are merged into one source loop by the similarity of their opcode mix
until the counts agree, and the group is costed at its smallest member's body per iteration
(the remainder loop: one source iteration plus the loop overhead).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_HEX = re.compile(r"0x([0-9a-f]+)")

TENSOR_CORE_OPS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA")


@dataclass
class Instr:
    addr: int
    opcode: str      # with modifiers, e.g. "HGMMA.64x64x16.F32.BF16"
    text: str

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> list[Instr]:
    """Instructions of ``cuobjdump -sass`` / ``nvdisasm`` text (one function), NOPs left out."""
    out = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        body = _PRED.sub("", m.group(2).strip())
        if not body:
            continue
        opcode = body.split()[0]
        if opcode == "NOP":
            continue
        out.append(Instr(int(m.group(1), 16), opcode, body))
    return out


def tensor_core_count(instrs: list[Instr]) -> int:
    return sum(1 for i in instrs if i.op in TENSOR_CORE_OPS)


def tensor_core_kind(instrs: list[Instr]) -> str:
    ops = {i.op for i in instrs if i.op in TENSOR_CORE_OPS}
    if ops & {"HGMMA", "QGMMA", "IGMMA"}:
        return "wgmma"
    if ops:
        return "mma.sync"
    return "none"


@dataclass
class Loop:
    start: int                 # header address (the back-edge target)
    end: int                   # address of the last back-edge
    children: list["Loop"] = field(default_factory=list)

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and (self.start, self.end) != (other.start, other.end)


def _branch_target(instr: Instr) -> int | None:
    if instr.op not in ("BRA", "JMP"):
        return None
    hits = _HEX.findall(instr.text)
    return int(hits[-1], 16) if hits else None


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Top-level loops (with nested children), in address order."""
    ends: dict[int, int] = {}
    for ins in instrs:
        target = _branch_target(ins)
        if target is not None and target < ins.addr:
            ends[target] = max(ends.get(target, target), ins.addr)
    loops = sorted((Loop(s, e) for s, e in ends.items()), key=lambda l: (l.start, -l.end))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for loop in loops:
        while stack and not (stack[-1].start <= loop.start and loop.end <= stack[-1].end):
            stack.pop()
        (stack[-1].children if stack else roots).append(loop)
        stack.append(loop)
    return roots


def _in(instrs: list[Instr], lo: int, hi: int) -> list[Instr]:
    return [i for i in instrs if lo <= i.addr <= hi]


def _similarity(a: list[Instr], b: list[Instr]) -> float:
    ca, cb = Counter(i.op for i in a), Counter(i.op for i in b)
    dot = sum(ca[k] * cb[k] for k in ca)
    na = math.sqrt(sum(v * v for v in ca.values()))
    nb = math.sqrt(sum(v * v for v in cb.values()))
    return dot / (na * nb) if na and nb else 0.0


def group_loops(instrs: list[Instr], loops: list[Loop], wanted: int) -> list[list[Loop]]:
    """Sibling SASS loops as groups, one per source loop: while there are more loops than
    ``wanted``, merge the most similar adjacent pair (opcode-mix cosine)."""
    groups = [[l] for l in loops]
    while len(groups) > max(wanted, 1):
        best, best_sim = 0, -1.0
        for k in range(len(groups) - 1):
            a = _in(instrs, groups[k][-1].start, groups[k][-1].end)
            b = _in(instrs, groups[k + 1][0].start, groups[k + 1][0].end)
            sim = _similarity(a, b)
            if sim > best_sim:
                best, best_sim = k, sim
        groups[best:best + 2] = [groups[best] + groups[best + 1]]
    return groups


@dataclass
class SourceLoop:
    """A loop of the kernel's source: its average trips per enclosing iteration, and the
    loops nested in it, in source order."""

    name: str
    trips: float
    children: list["SourceLoop"] = field(default_factory=list)


def dynamic_count(instrs: list[Instr], source: list[SourceLoop], notes: list[str] | None = None) -> float:
    """Instructions one program (one warp of it) executes, given the source loop nest with
    trip counts. Mismatches between the SASS and the source loop nest go to ``notes``."""
    notes = notes if notes is not None else []
    return _count(instrs, find_loops(instrs), source, notes, "")


def _count(instrs, loops, source, notes, where) -> float:
    inside = set()
    for loop in loops:
        inside.update(i.addr for i in _in(instrs, loop.start, loop.end))
    total = float(sum(1 for i in instrs if i.addr not in inside))
    groups = group_loops(instrs, loops, len(source))
    if len(groups) != len(source):
        notes.append(f"{where or 'kernel'}: {len(source)} source loop(s), {len(groups)} SASS loop group(s)")
    for k, group in enumerate(groups):
        rep = min(group, key=lambda l: len(_in(instrs, l.start, l.end)))
        body = _in(instrs, rep.start, rep.end)
        if k < len(source):
            src = source[k]
            total += src.trips * _count(body, rep.children, src.children, notes, f"{where}/{src.name}")
        else:
            notes.append(f"{where or 'kernel'}: SASS loop at 0x{rep.start:x} has no source loop, counted once")
            total += _count(body, rep.children, [], notes, f"{where}/?")
    for src in source[len(groups):]:
        notes.append(f"{where}/{src.name}: no SASS loop (unrolled or removed), its body counted once")
    return total
