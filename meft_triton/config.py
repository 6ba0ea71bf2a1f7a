"""MEFTConfig: the sizes and settings of one MEFT adapter (docs/DESIGN.md, "Semantics")."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .validation import check_choice, check_float, check_int

GATES = ("logit", "softmax")
BACKENDS = ("auto", "triton", "torch")
PLACEMENTS = ("gpu", "cpu")
TRANSFERS = ("cpu_gather", "zero_copy")
BACKWARD_ROWS = ("refetch", "keep")
RESIDENCIES = ("per-micro-batch", "resident")
GRADIENT_FORMS = ("rows", "factors")
AUTO = "auto"


def meft_num_experts(num_neurons: int, factor: float = 0.25) -> int:
    """MEFT's expert count for ``num_neurons`` (N) neurons: ceil(sqrt(N)) // ``factor`` (its
    ``moe_expert_factor``), e.g. N = 8464 gives 368 experts of 23 neurons.

    Raises ValueError when the count does not divide N (every expert owns N / E neurons),
    naming the nearest N below and above that work with this ``factor``.
    """
    check_int("num_neurons", num_neurons)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
    count = _expert_count(num_neurons, factor)
    if count >= 1 and num_neurons % count == 0:
        return count
    below = next((n for n in range(num_neurons - 1, 0, -1) if _fits(n, factor)), None)
    above = next((n for n in range(num_neurons + 1, 4 * num_neurons + 64) if _fits(n, factor)), None)
    nearby = " or ".join(str(n) for n in (below, above) if n is not None)
    hint = f"num_neurons={nearby} works" if nearby else "no nearby num_neurons works: lower factor"
    raise ValueError(
        f"num_neurons={num_neurons} with factor={factor} gives {count} experts, which does not divide "
        f"num_neurons (each expert owns num_neurons / num_experts neurons); {hint}")


def _expert_count(num_neurons: int, factor: float) -> int:
    root = math.isqrt(num_neurons)
    root += root * root != num_neurons  # the ceiling, exact for any int (no float sqrt)
    return int(root // factor)


def _fits(num_neurons: int, factor: float) -> bool:
    count = _expert_count(num_neurons, factor)
    return count >= 1 and num_neurons % count == 0


@dataclass(frozen=True)
class MEFTConfig:
    """Settings of one MEFT adapter layer.

    ``num_neurons`` (N) key/value rows are split evenly among ``num_experts`` (E) experts; each
    token picks ``experts_per_token`` (P) experts with the router and then its ``topk`` (K_top)
    best-scoring neurons among their P * N/E candidates (K_top may be up to N: past the
    candidates, the surplus picks score 0 and contribute nothing).

    ``low_key_dim`` (r, MEFT's option): None, or a shared projection L [r, hidden_size] whose
    output x = L h feeds the router and the keys (router [E, r], keys [N, r]; values stay
    [N, hidden_size]). Under placement "cpu" it also shrinks the device key cache to [N, r].

    :func:`meft_num_experts` is MEFT's rule for ``num_experts``; :meth:`paper_7b` is the
    paper's best LLaMA-7B setting.

    ``placement="cpu"`` keeps the fp32 master keys/values and their AdamW state in (pinned) CPU
    memory and moves only active rows: ``transfer`` picks how value rows reach the device
    ("cpu_gather": gather on the CPU + one async copy; "zero_copy": a device kernel reads the
    pinned rows), ``backward_rows`` whether backward fetches them again ("refetch") or keeps
    the forward's rows on the device ("keep"). ``residency`` says how long value and gradient
    rows stay on the device: "resident" (the default: a value row copied in serves the rest of
    the optimizer step, forward and backward, until the step changes it; gradient rows are
    summed on the device and cross once per step in the compute dtype) or "per-micro-batch"
    (every micro-batch copies its active value rows in, and its gradient rows out in fp32; the
    device holds only the key cache and the copy slots). Under "resident" ``value_budget`` and
    ``gradient_budget`` are the device bytes, for all layers together, of the resident value
    rows and the gradient sums or factors (``gradient_form`` below), "auto" (the default) for
    sizes from the planner (profiling/plan/auto.py) and the device memory free at the first
    forward. What does not
    fit is evicted and fetched again (values) or sent home early (gradients); a layer whose
    share cannot hold one call's rows runs that part per micro-batch. "per-micro-batch" is the
    opt-out: it keeps each backward's gradient rows exact in fp32 on their way home (under
    "resident" an fp16 compute dtype rounds the step's sums) and keeps no device tables.

    ``gradient_form`` (residency "resident"): what ``gradient_budget`` holds on the device
    between a step's backwards. "rows": fp32 sums of the gradient rows, (r + d) x 4 bytes per
    row the step touches. "factors": each backward's factors of its key/value gradients, its
    x and dy and per-pick coefficients, (r + d) x es + 16 K_top + 8 P bytes per token, turned
    into rows by one grouped GEMM over all the held tokens when the budget is full and at the
    step. A micro-batch of T tokens touches U ~ N (1 - exp(-T K_top / N)) rows, so factors
    take far fewer bytes whenever T < U (both MEFT presets): a budget too small for the sums
    holds many micro-batches' factors, and rows cross PCIe a few times per step instead of
    every micro-batch. "auto" (the default): "rows" when a layer's share of the budget holds
    the sums of all its N rows (one send per step, whatever the micro-batches), else
    "factors". ``python -m profiling.plan`` compares both for a given step.
    """

    num_neurons: int = 4096
    num_experts: int = 64
    experts_per_token: int = 8
    topk: int = 64
    gate: str = "logit"
    backend: str = "auto"
    key_init_std: float = 0.02
    value_init_std: float = 0.0
    router_init_scale: float = 50.0
    placement: str = "gpu"
    transfer: str = "cpu_gather"
    backward_rows: str = "refetch"
    low_key_dim: int | None = None
    residency: str = "resident"
    value_budget: int | str = AUTO
    gradient_budget: int | str = AUTO
    gradient_form: str = AUTO

    def __post_init__(self) -> None:
        check_int("num_neurons", self.num_neurons)
        check_int("num_experts", self.num_experts)
        check_int("experts_per_token", self.experts_per_token)
        check_int("topk", self.topk)
        check_choice("gate", self.gate, GATES)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("placement", self.placement, PLACEMENTS)
        check_choice("transfer", self.transfer, TRANSFERS)
        check_choice("backward_rows", self.backward_rows, BACKWARD_ROWS)
        check_float("key_init_std", self.key_init_std)
        check_float("value_init_std", self.value_init_std)
        check_float("router_init_scale", self.router_init_scale)
        if self.num_neurons % self.num_experts:
            raise ValueError(
                f"num_neurons ({self.num_neurons}) must be divisible by num_experts "
                f"({self.num_experts}): each expert owns num_neurons / num_experts neurons"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token must be in [1, num_experts={self.num_experts}], "
                f"got {self.experts_per_token}"
            )
        if self.topk > self.num_neurons:
            # topk may exceed num_candidates: the surplus picks score 0 and add nothing
            raise ValueError(f"topk must be in [1, num_neurons={self.num_neurons}], got {self.topk}")
        if self.low_key_dim is not None:
            check_int("low_key_dim", self.low_key_dim)
        check_choice("residency", self.residency, RESIDENCIES)
        check_choice("gradient_form", self.gradient_form, (AUTO, *GRADIENT_FORMS))
        for name in ("value_budget", "gradient_budget"):
            value = getattr(self, name)
            if value != AUTO and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be {AUTO!r} or an int >= 1 (device bytes), got {value!r}")

    @classmethod
    def paper_7b(cls, **changes: Any) -> "MEFTConfig":
        """The MEFT paper's best LLaMA-7B setting: N = 8464 neurons, E = 368 experts (MEFT's rule,
        :func:`meft_num_experts`), P = 8 experts and K_top = 64 neurons per token, logit gate.
        ``changes`` override any field (e.g. ``placement="cpu"``)."""
        paper = dict(num_neurons=8464, num_experts=meft_num_experts(8464), experts_per_token=8,
                     topk=64, gate="logit")
        return cls(**{**paper, **changes})

    @property
    def neurons_per_expert(self) -> int:
        return self.num_neurons // self.num_experts

    @property
    def num_candidates(self) -> int:
        """Neurons a token scores: the P selected experts' N/E neurons each."""
        return self.experts_per_token * self.neurons_per_expert

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MEFTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MEFTConfig fields: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "MEFTConfig":
        return dataclasses.replace(self, **changes)
