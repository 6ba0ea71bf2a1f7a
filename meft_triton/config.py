"""MEFTConfig: the sizes and settings of one MEFT adapter (DESIGN.md section 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .validation import check_choice, check_float, check_int

GATES = ("logit", "softmax")
BACKENDS = ("auto", "triton", "torch")
PLACEMENTS = ("gpu", "cpu")
TRANSFERS = ("cpu_gather", "zero_copy")
BACKWARD_ROWS = ("refetch", "keep")


@dataclass(frozen=True)
class MEFTConfig:
    """Settings of one MEFT adapter layer.

    ``num_neurons`` (N) key/value rows are split evenly among ``num_experts`` (E) experts; each
    token picks ``experts_per_token`` (P) experts with the router and then its ``topk`` (K_top)
    best-scoring neurons among their P * N/E candidates (K_top may be up to N: past the
    candidates, the surplus picks score 0 and contribute nothing).

    ``low_key_dim`` (r, MEFT's option): None, or a shared projection L [r, hidden_size] whose
    output x = L h feeds the router and the keys (router [E, r], keys [N, r]; values stay
    [N, hidden_size]).

    ``placement="cpu"`` keeps the fp32 master keys/values and their AdamW state in (pinned) CPU
    memory and moves only active rows: ``transfer`` picks how value rows reach the device
    ("cpu_gather": gather on the CPU + one async copy; "zero_copy": a device kernel reads the
    pinned rows), ``backward_rows`` whether backward fetches them again ("refetch") or keeps
    the forward's rows on the device ("keep").
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
