"""Record a routing profile from a real model's hidden states, for ``python -m profiling.plan
--routing``.

    python -m profiling.plan.record --model PATH [--gguf-file F] --text FILE [FILE ...] \\
        --tokens 256 --micro-batches 8 --num-neurons 8464 --out routing.json

MEFT's adapters (its initialisation: keys ~ N(0, 0.02²), each router row the mean of its
expert's keys times 50) are attached to every FFN of the transformers model, which then reads
the text, ``--tokens`` tokens per micro-batch, ``--micro-batches`` of them, without gradients.
Per layer the distinct rows each micro-batch picks (the selections of DESIGN.md section 2 on
the layer's real FFN inputs) give ``per_micro_batch``, their running union ``cumulative`` and
``per_step``. Values start at zero, so the adapters do not change the hidden states they
route. The profile describes routing at initialisation; training moves it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from meft_triton import MEFTConfig, reference
from meft_triton.config import meft_num_experts


def _picked(adapter, hidden: torch.Tensor) -> torch.Tensor:
    """The distinct neuron ids ``adapter`` selects for ``hidden`` [..., d] (the reference's
    selections on the adapter's weights)."""
    cfg = adapter.config
    flat = adapter.key_input(hidden.reshape(-1, hidden.shape[-1]).to(adapter.keys.dtype))
    _, expert_ids, weights = reference.route(flat, adapter.router.weight, cfg.experts_per_token, cfg.gate)
    _, neuron_ids, _ = reference.sparse_kv_forward(flat, adapter.keys, adapter.values, expert_ids, weights,
                                                   cfg.neurons_per_expert, cfg.topk)
    return neuron_ids.unique()


@torch.no_grad()
def record_profile(model, micro_batches: torch.Tensor, config: MEFTConfig, *, seed: int = 0) -> dict:
    """The routing profile (profiling/plan/routing.py's JSON layout) of ``model`` (a transformers
    causal LM, not yet adapted) reading ``micro_batches`` [M, T] token ids, one sequence each,
    with MEFT adapters of ``config`` attached to every FFN; the model is left as it was."""
    from meft_triton import attach_meft, detach_meft, meft_adapters

    if micro_batches.dim() != 2 or micro_batches.numel() == 0:
        raise ValueError(f"micro_batches must be [micro-batches, tokens] ids, got shape {tuple(micro_batches.shape)}")
    torch.manual_seed(seed)
    attach_meft(model, config.replace(placement="gpu", backend="torch"))
    try:
        adapters = list(meft_adapters(model).values())
        picks: list[list[torch.Tensor]] = [[] for _ in adapters]
        hooks = [a.register_forward_pre_hook(lambda module, args, i=i: picks[i].append(_picked(module, args[0])))
                 for i, a in enumerate(adapters)]
        was_training = model.training
        try:
            model.eval()
            for ids in micro_batches:
                model(ids[None].to(next(model.parameters()).device))
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
    finally:
        detach_meft(model)
    layers = []
    for per_mb in picks:
        seen = torch.empty(0, dtype=torch.int64)
        cumulative = []
        for ids in per_mb:
            seen = torch.unique(torch.cat([seen, ids.long().cpu()]))
            cumulative.append(int(seen.numel()))
        layers.append({"per_micro_batch": [int(ids.numel()) for ids in per_mb], "per_step": cumulative[-1],
                       "cumulative": cumulative})
    return {"num_neurons": config.num_neurons, "layers": layers}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profiling.plan.record", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a transformers model folder (or hub id in the local cache)")
    p.add_argument("--gguf-file", help="a GGUF file in that folder (transformers dequantizes it)")
    p.add_argument("--text", nargs="+", required=True, help="text files the model reads, concatenated")
    p.add_argument("--tokens", type=int, required=True, help="tokens per micro-batch")
    p.add_argument("--micro-batches", type=int, required=True, help="micro-batches per optimizer step")
    p.add_argument("--num-neurons", type=int, required=True)
    p.add_argument("--num-experts", type=int, help="default: MEFT's rule, ceil(sqrt(N)) / 0.25")
    p.add_argument("--experts-per-token", type=int, default=8)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--low-key-dim", type=int)
    p.add_argument("--gate", choices=("logit", "softmax"), default="logit")
    p.add_argument("--seed", type=int, default=0, help="the adapters' initialisation")
    p.add_argument("--out", required=True, help="the profile JSON to write")
    return p


def run(argv: Sequence[str] | None = None) -> dict:
    import transformers

    args = parser().parse_args(argv)
    for name in ("tokens", "micro_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    experts = args.num_experts if args.num_experts is not None else meft_num_experts(args.num_neurons)
    config = MEFTConfig(num_neurons=args.num_neurons, num_experts=experts, experts_per_token=args.experts_per_token,
                        topk=args.topk, low_key_dim=args.low_key_dim, gate=args.gate)
    text = ""
    for path in args.text:
        try:
            text += Path(path).read_text(encoding="utf-8") + "\n"
        except OSError as exc:
            raise ValueError(f"--text: cannot read {path!r}: {exc}") from None
    extra = {} if args.gguf_file is None else {"gguf_file": args.gguf_file}
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, **extra)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    need = args.tokens * args.micro_batches
    if ids.numel() < need:
        raise ValueError(f"--text holds {ids.numel()} tokens; {args.micro_batches} micro-batches of {args.tokens} "
                         f"need {need}")
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, **extra)
    profile = record_profile(model, ids[:need].view(args.micro_batches, args.tokens), config, seed=args.seed)
    profile["source"] = (f"{args.model}{' ' + args.gguf_file if args.gguf_file else ''}: {need} tokens of "
                         f"{', '.join(Path(p).name for p in args.text)}, {config.num_neurons} neurons, "
                         f"{experts} experts, P = {config.experts_per_token}, K_top = {config.topk}")
    Path(args.out).write_text(json.dumps(profile, indent=1) + "\n")
    return profile


def main(argv: Sequence[str] | None = None) -> int:
    try:
        profile = run(argv)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = profile["num_neurons"]
    for i, layer in enumerate(profile["layers"]):
        print(f"layer {i:2d}: {layer['per_micro_batch'][0] / n:6.1%} of rows in the first micro-batch, "
              f"{layer['per_step'] / n:6.1%} in the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
