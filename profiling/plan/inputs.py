"""What the planner plans for: the GPU (a preset of ``profiling/gpu_presets.json`` plus
overrides), the frozen backbone (a DESIGN.md preset or a transformers ``config.json``) and the
batch shape. Bad input raises ValueError / TypeError naming the argument and what it allows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..aot.workloads import SHAPES
from ..presets import PRESETS

GPU_PRESETS_FILE = Path(__file__).resolve().parent.parent / "gpu_presets.json"
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

#: micro-batches per optimizer step of DESIGN.md section 2's presets (the rest of each preset,
#: d, N, E, P, K_top and tokens per micro-batch, is profiling.aot's SHAPES)
PRESET_MICRO_BATCHES = {"paper-7b": 64, "scale-7b": 8}
#: both presets sit beside LLaMA-7B's FFNs (32 layers, d = 4096, SwiGLU width 11008)
PRESET_BACKBONE = "llama-7b"
LLAMA_VOCAB = 32000


@dataclass(frozen=True)
class GPU:
    name: str
    device: str
    memory_bytes: float
    hbm_bytes_per_s: float
    pcie_bytes_per_s: float
    flops_per_s: dict
    host_ram_bytes: float
    host_bytes_per_s: float

    def ceilings(self) -> dict:
        """The keys profiling.aot's floor model reads."""
        return {"hbm_bytes_per_s": self.hbm_bytes_per_s, "pcie_bytes_per_s": self.pcie_bytes_per_s,
                "flops_per_s": self.flops_per_s}


@dataclass(frozen=True)
class Backbone:
    """The frozen model: its decoder shape and parameter count."""

    name: str
    hidden_size: int
    layers: int
    ffn_hidden: int
    vocab_size: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False

    @property
    def kv_width(self) -> int:
        return self.hidden_size * self.kv_heads // self.heads

    @property
    def params(self) -> int:
        """Llama-style decoder: attention q, k, v, o; SwiGLU gate, up, down; two RMSNorms per
        layer; embeddings (and an untied LM head); the final norm."""
        d, f, kv = self.hidden_size, self.ffn_hidden, self.kv_width
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
        heads = 1 if self.tied_embeddings else 2
        return self.layers * per_layer + heads * self.vocab_size * d + d


def check_positive(name: str, value: Any, *, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be a {'positive int' if integer else 'positive number'}, "
                        f"got {type(value).__name__} {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def load_gpu(name: str, overrides: dict | None = None, path: Path = GPU_PRESETS_FILE) -> GPU:
    """The preset ``name`` with ``overrides`` (any GPU field, e.g. ``{"pcie_bytes_per_s": 20e9}``;
    ``flops_per_s`` entries merge into the preset's)."""
    presets = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    if name not in presets:
        raise ValueError(f"gpu must be one of {', '.join(sorted(presets))}, got {name!r}")
    values = dict(presets[name], name=name)
    for key, value in (overrides or {}).items():
        if key == "flops_per_s":
            values["flops_per_s"] = {**values["flops_per_s"], **value}
            continue
        if key not in {f.name for f in dataclasses.fields(GPU)} - {"name", "device"}:
            raise ValueError(f"unknown GPU override {key!r}")
        values[key] = check_positive(key, value)
    for key, rate in values["flops_per_s"].items():
        check_positive(f"flops_per_s[{key!r}]", rate)
    return GPU(**values)


def backbone_preset(name: str) -> Backbone:
    shape = PRESETS[PRESET_BACKBONE]
    return Backbone(name, shape.hidden_size, shape.layers, shape.ffn_hidden, LLAMA_VOCAB, 32, 32)


def backbone_from_config(path: str | Path) -> Backbone:
    """A transformers ``config.json``: hidden_size and num_hidden_layers are required;
    intermediate_size, vocab_size, num_attention_heads, num_key_value_heads and
    tie_word_embeddings are read when present (a multimodal config's ``text_config`` too)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"model: no such file {str(path)!r} (give paper-7b, scale-7b or a config.json)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"model: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model: {path} must hold a JSON object, got {type(data).__name__}")
    if "hidden_size" not in data and isinstance(data.get("text_config"), dict):
        data = data["text_config"]
    for key in ("hidden_size", "num_hidden_layers"):
        if key not in data:
            raise ValueError(f"model: {path} has no {key!r} (a transformers decoder config.json needs it)")
    d = check_positive(f"{path.name}: hidden_size", data["hidden_size"], integer=True)
    heads = check_positive(f"{path.name}: num_attention_heads", data.get("num_attention_heads", 1), integer=True)
    kv_heads = data.get("num_key_value_heads") or heads
    return Backbone(
        name=str(path),
        hidden_size=d,
        layers=check_positive(f"{path.name}: num_hidden_layers", data["num_hidden_layers"], integer=True),
        ffn_hidden=check_positive(f"{path.name}: intermediate_size", data.get("intermediate_size", 4 * d),
                                  integer=True),
        vocab_size=check_positive(f"{path.name}: vocab_size", data.get("vocab_size", LLAMA_VOCAB), integer=True),
        heads=heads,
        kv_heads=check_positive(f"{path.name}: num_key_value_heads", kv_heads, integer=True),
        tied_embeddings=bool(data.get("tie_word_embeddings", False)),
    )


def resolve_model(model: str) -> tuple[Backbone, dict]:
    """``model`` -> (backbone, preset defaults for the MEFT fields and the batch shape; empty
    for a config.json)."""
    if not isinstance(model, str):
        raise TypeError(f"model must be a str (paper-7b, scale-7b or a config.json path), got {type(model).__name__}")
    if model in PRESET_MICRO_BATCHES:
        s = SHAPES[model]
        defaults = dict(num_neurons=s.N, num_experts=s.E, experts_per_token=s.P, topk=s.K, tokens=s.T,
                        micro_batches=PRESET_MICRO_BATCHES[model])
        return backbone_preset(model), defaults
    if not model.endswith(".json"):
        raise ValueError(f"model must be one of {', '.join(PRESET_MICRO_BATCHES)} or a path to a "
                         f"config.json, got {model!r}")
    return backbone_from_config(model), {}


@dataclass(frozen=True)
class Batch:
    """The step's shape: ``tokens`` per micro-batch, ``micro_batches`` per optimizer step, the
    compute dtype (backbone weights, key cache, value rows on the wire) and whether the
    backbone recomputes its forward in backward (gradient checkpointing)."""

    tokens: int
    micro_batches: int
    dtype: str = "bf16"
    checkpointing: bool = False

    def __post_init__(self) -> None:
        check_positive("tokens", self.tokens, integer=True)
        check_positive("micro_batches", self.micro_batches, integer=True)
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def es(self) -> int:
        return DTYPE_BYTES[self.dtype]
