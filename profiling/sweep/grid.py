"""The sweep's points: shapes and what runs on each, and the parsers of the axis flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import metrics
from ..presets import DEFAULT_NEURONS_PER_EXPERT, PRESETS

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BASELINES = ("reference", "meft-original", "dense", "lora")


@dataclass(frozen=True)
class Shape:
    preset: str
    hidden_size: int
    layers: int
    layers_run: int
    num_neurons: int
    num_experts: int
    experts_per_token: int
    topk: int
    tokens: int
    dtype: str
    backbone: str = "none"
    ffn_hidden: int = 0

    @property
    def neurons_per_expert(self) -> int:
        return self.num_neurons // self.num_experts

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return metrics.dtype_bytes(self.torch_dtype)


@dataclass(frozen=True)
class Point:
    shape: Shape
    impl: str
    placement: str = "gpu"
    transfer: str | None = None
    backward_rows: str | None = None
    ist_ratio: float = 1.0
    kind: str = "step"
    rows: int | None = None  # transfer points
    micro_batches: int = 1  # per optimizer step (meft points)
    residency: str | None = None  # placement "cpu"

    def label(self) -> str:
        s = self.shape
        if self.kind == "transfer":
            return f"transfer rows={self.rows} d={s.hidden_size}"
        extra = f" {self.residency} {self.transfer}/{self.backward_rows}" if self.placement == "cpu" else ""
        ist = f" ist={self.ist_ratio:g}" if self.ist_ratio < 1 else ""
        micro = f" x{self.micro_batches}" if self.micro_batches > 1 else ""
        return f"N={s.num_neurons} T={s.tokens}{micro} {self.impl}[{self.placement}{extra}{ist}]"


def experts_for(num_neurons: int, explicit: list[int] | None) -> list[int]:
    """The E values of the sweep for N: the ones given, else N / 64 (MEFT's ratio)."""
    if explicit:
        return explicit
    return [max(1, num_neurons // DEFAULT_NEURONS_PER_EXPERT)]


def build_points(args: argparse.Namespace, cuda: bool) -> tuple[list[Point], list[str]]:
    """The sweep's points in run order, and remarks about axes skipped on this device."""
    points: list[Point] = []
    skipped: list[str] = []
    for preset in args.preset:
        base = PRESETS[preset]
        d = args.hidden_size or base.hidden_size
        ffn = max(1, base.ffn_hidden * d // base.hidden_size)  # keep the preset's FFN ratio
        layers = args.layers or base.layers
        layers_run = min(layers, args.max_layers)
        for dtype in args.dtype:
            for n in args.num_neurons:
                for e in experts_for(n, args.num_experts):
                    for p in args.experts_per_token:
                        for k in args.topk:
                            for t in args.tokens:
                                shape = Shape(preset, d, layers, layers_run, n, e, p, k, t, dtype,
                                              args.backbone, ffn)
                                points += shape_points(shape, args, cuda, skipped)
            store_rows = max([*args.num_neurons, *args.transfer_rows])
            shape = Shape(preset, d, layers, layers_run, store_rows, 1, 1, 1, 1, dtype, "none", ffn)
            points += [Point(shape, "transfer", placement="cpu", transfer="cpu_gather", kind="transfer", rows=r)
                       for r in args.transfer_rows]
    return points, sorted(set(skipped))


def shape_points(shape: Shape, args: argparse.Namespace, cuda: bool, skipped: list[str]) -> list[Point]:
    """The MEFT adapter per micro-batch count and placement (placement "cpu": per residency x
    transfer engine x backward row policy, x IST ratio), then the baselines (one micro-batch
    per step), at one shape. Under residency "resident" the backward reads the resident rows,
    so backward_rows does not apply: one point, labelled "keep"."""
    out = []
    for micro in args.micro_batches:
        for placement in args.placement:
            if placement == "gpu":
                out += [Point(shape, "meft", "gpu", ist_ratio=r, micro_batches=micro) for r in args.ist_ratio]
                continue
            for residency in args.residency:
                for transfer in args.transfer:
                    if transfer == "zero_copy" and not cuda:
                        skipped.append("transfer zero_copy (needs a GPU)")
                        continue
                    backward = ["keep"] if residency == "resident" else args.backward_rows
                    out += [Point(shape, "meft", "cpu", transfer, rows, ist_ratio=r, micro_batches=micro,
                                  residency=residency)
                            for rows in backward for r in args.ist_ratio]
    out += [Point(shape, b, "gpu") for b in args.baselines]
    return out


# ---------------------------------------------------------------------------- flag values
def int_list(minimum: int) -> Callable[[str], list[int]]:
    """argparse type: integers >= ``minimum``, comma or space separated."""

    def parse(text: str) -> list[int]:
        out = []
        for part in filter(None, text.replace(" ", ",").split(",")):
            try:
                value = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be integers >= {minimum}, got {part!r}") from None
            if value < minimum:
                raise argparse.ArgumentTypeError(f"must be integers >= {minimum}, got {value}")
            out.append(value)
        if not out:
            raise argparse.ArgumentTypeError("needs at least one value")
        return out

    parse.__name__ = "int list"
    return parse


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: names among ``choices``, comma or space separated."""

    def parse(text: str) -> list[str]:
        out = [p for p in text.replace(" ", ",").split(",") if p]
        bad = [p for p in out if p not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"must be among {', '.join(choices)}; got {text!r}")
        return out

    parse.__name__ = "choice list"
    return parse


def ratio_list(text: str) -> list[float]:
    """argparse type: IST ratios in (0, 1]."""
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in (0, 1], got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"IST ratios must lie in (0, 1], got {text!r}")
    return values


def positive_int(text: str) -> int:
    """argparse type: one integer >= 1."""
    return int_list(1)(text)[0]


def flatten(values: list | None) -> list | None:
    """The values of a flag given several times (``nargs="+"`` of lists), deduplicated in order."""
    if values is None:
        return None
    out = []
    for v in values:
        out += v if isinstance(v, list) else [v]
    return list(dict.fromkeys(out))
