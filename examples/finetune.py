"""Fine-tune a causal LM on a synthetic knowledge task: MEFT vs LoRA, a dense adapter, MEFT+IST, SMT.

The task: ``--facts`` random facts "subject relation -> attribute", each a token sequence
``[BOS, subject, relation, ARROW, attribute]`` with the loss on the attribute token only. Fact
accuracy is the share of facts whose attribute is the arg-max prediction after ARROW (the model
is asked to store knowledge, MEFT's use case). Every method starts from the same frozen backbone
(by default a small randomly initialised Llama-style model built locally, no download;
``--model`` takes a local checkpoint or hub name) and trains the same number of parameters,
MEFT's (so the same gradient and optimizer-state memory for the dense methods; the table also
reports the peak memory measured):

* ``meft``: the MEFT adapter beside every FFN;
* ``lora``: LoRA (the peft library, all linear layers of the decoder) with the rank that matches;
* ``dense``: a dense parallel adapter (d -> r -> d ReLU MLP beside every FFN) of matching width;
* ``meft+ist``: the same MEFT adapter trained with IST layer selection (meft_triton.ist: each
  step only ``--ist-ratio`` of the layers' adapters train, chosen by learned importance scores;
  the scoring passes run every ``--ist-interval`` steps on the step's batch);
* ``smt``: Sparse Matrix Tuning (meft_triton.smt): a ``--smt-warmup``-step gradient warm-up
  that updates no weights (its steps count toward ``--steps``), then training only the top
  ``b x b`` blocks of the q/k/v/gate/up/down projections, as many blocks as MEFT's budget buys.
  The example's scales keep that budget below the candidate blocks; where it is not (a large
  ``--neurons`` on a small backbone) SMT trains every block and the row says so.

    python examples/finetune.py                 # default scale (minutes on 2 CPU cores)
    python examples/finetune.py --tiny          # CI scale, seconds
    python examples/finetune.py --methods meft,lora
    python examples/finetune.py --placement cpu   # MEFT's rows in CPU memory; bytes moved per step
    python examples/finetune.py --device cuda --steps 2000 --facts 20000

MEFT's rows train with what ``create_meft_optimizer`` returns (AdamW with non-finite checks;
with ``--placement cpu`` the row-sparse CPU AdamW, and the table adds the value/gradient rows
moved host->device and device->host per step), the other methods with torch AdamW.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during training minus the allocation
before it; on CPU the peak resident set size during training (kernel high-water mark, reset
before each method) minus the RSS just before it. Exits with status 1 if a method's loss did not fall.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from meft_triton import MEFTConfig, adapter_parameter_count, create_meft_optimizer  # noqa: E402
from meft_triton import attach_meft, meft_adapters, meft_parameters
from meft_triton.integration import find_decoder_layers, find_mlp
from meft_triton.integration.discovery import mlp_hidden_size

METHODS = ("meft", "lora", "dense", "meft+ist", "smt")


# ------------------------------------------------------------------------------------ task


@dataclass
class Task:
    inputs: torch.Tensor   # [F, 5] token ids
    labels: torch.Tensor   # [F, 5], -100 except the attribute position
    answers: torch.Tensor  # [F] attribute token ids
    num_attributes: int


def make_task(num_facts: int, vocab_size: int, num_relations: int, num_attributes: int,
              seed: int, bos_id: int | None) -> Task:
    """Random facts over token ids drawn from the model's vocabulary (distinct per role)."""
    gen = torch.Generator().manual_seed(seed)
    num_subjects = math.ceil(num_facts / num_relations)
    needed = num_subjects + num_relations + num_attributes + 2
    low = min(8, max(vocab_size - needed, 0))
    if vocab_size - low < needed:
        raise SystemExit(f"vocab_size {vocab_size} is too small for {needed} distinct task tokens")
    ids = torch.randperm(vocab_size - low, generator=gen)[:needed] + low
    arrow = ids[0]
    bos = torch.tensor(bos_id) if bos_id is not None and 0 <= bos_id < vocab_size else ids[1]
    subjects = ids[2:2 + num_subjects]
    relations = ids[2 + num_subjects:2 + num_subjects + num_relations]
    attributes = ids[2 + num_subjects + num_relations:]
    pairs = torch.randperm(num_subjects * num_relations, generator=gen)[:num_facts]
    subj, rel = pairs // num_relations, pairs % num_relations
    answer = attributes[torch.randint(num_attributes, (num_facts,), generator=gen)]
    inputs = torch.stack([bos.expand(num_facts), subjects[subj], relations[rel],
                          arrow.expand(num_facts), answer], dim=1)
    labels = torch.full_like(inputs, -100)
    labels[:, 4] = answer
    return Task(inputs, labels, answer, num_attributes)


# ------------------------------------------------------------------------------------ models


def build_model(args, vocab_size: int):
    import transformers

    torch.manual_seed(args.seed)
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        d = args.hidden
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=d, intermediate_size=int(d * 8 / 3 / 8 + 1) * 8,
            num_hidden_layers=args.layers, num_attention_heads=max(d // 32, 2),
            num_key_value_heads=max(d // 64, 1), max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
        # A trained LM head has large rows; with the 0.02 init the frozen random head caps every
        # logit gap near 1 and no adapter could make a confident prediction.
        nn.init.normal_(model.lm_head.weight, std=d ** -0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(args.device)


class DenseParallelAdapter(nn.Module):
    """A plain parallel adapter: y = W_up ReLU(W_down x), W_up zero-initialised."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        nn.init.normal_(self.down.weight, std=hidden ** -0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        h = torch.relu(nn.functional.linear(x, self.down.weight.to(x.dtype)))
        return nn.functional.linear(h, self.up.weight.to(x.dtype))


class ParallelMLP(nn.Module):
    def __init__(self, base: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        return out + self.adapter(x).to(out.dtype)


def decoder_linear_io(model) -> int:
    """sum(in + out) over the decoder layers' nn.Linear modules: LoRA params per unit rank."""
    _, layers = find_decoder_layers(model)
    return sum(m.in_features + m.out_features for layer in layers for m in layer.modules()
               if isinstance(m, nn.Linear))


def setup_method(method: str, model, args, budget: int):
    """Attach the method's trainable part; returns (model, params, description)."""
    _, layers = find_decoder_layers(model)
    hidden = mlp_hidden_size(find_mlp(layers[0])[1], model)
    if method in ("meft", "meft+ist"):
        attach_meft(model, meft_config(args))
        desc = f"N={args.neurons} E={args.experts} P={args.experts_per_token} K={args.topk}"
        if method == "meft+ist":
            per_step = ist_config(args).train_layers(len(layers))
            desc += f" IST rho={args.ist_ratio} ({per_step}/{len(layers)} layers/step, {args.ist_mode})"
        return model, meft_parameters(model), desc
    if method == "lora":
        import peft

        rank = max(1, round(budget / decoder_linear_io(model)))
        config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                 target_modules="all-linear", bias="none")
        with warnings.catch_warnings():  # peft reads a deprecated transformers property
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, config)
        return model, [p for p in model.parameters() if p.requires_grad], f"r={rank} all-linear"
    if method == "dense":
        width = max(1, round(budget / (len(layers) * 2 * hidden)))
        params = []
        for layer in layers:
            path, mlp = find_mlp(layer)
            adapter = DenseParallelAdapter(hidden, width).to(args.device)
            parent = layer
            for part in path.split(".")[:-1]:
                parent = getattr(parent, part)
            setattr(parent, path.split(".")[-1], ParallelMLP(mlp, adapter))
            params += list(adapter.parameters())
        return model, params, f"r={width}"
    raise ValueError(method)


def meft_config(args) -> MEFTConfig:
    return MEFTConfig(num_neurons=args.neurons, num_experts=args.experts,
                      experts_per_token=args.experts_per_token, topk=args.topk,
                      backend=args.meft_backend, placement=args.placement)


def ist_config(args):
    from meft_triton import ISTConfig

    return ISTConfig(ratio=args.ist_ratio, interval=args.ist_interval, mode=args.ist_mode,
                     seed=args.seed)


def setup_smt(model, args, budget: int, next_batch, autocast):
    """SMT: the warm-up (``args.smt_warmup`` forward+backward passes, no weight update), then
    the top blocks within ``budget`` trainable weights. Returns (params, description, warm-up
    losses, trainable weight entries)."""
    from meft_triton import SMTConfig, SMTWarmup, apply_smt
    from meft_triton.addons.smt import smt_num_trainable, smt_parameters

    block = args.smt_block or max(8, mlp_hidden_size(find_mlp(find_decoder_layers(model)[1][0])[1], model) // 16)
    config = SMTConfig(block_size=block, score=args.smt_score, targets=tuple(args.smt_targets.split(",")),
                       warmup_steps=args.smt_warmup)
    warmup = SMTWarmup(model, config)
    losses = []
    for _ in range(max(1, args.smt_warmup)):
        inputs, labels = next_batch()
        with autocast:
            loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    total = warmup.num_candidate_blocks()
    wanted = max(1, budget // (block * block))
    selection = warmup.select(min(wanted, total))
    apply_smt(model, selection)
    capped = " (budget > all candidate blocks: all taken)" if wanted >= total else ""
    desc = f"b={block} {selection.num_blocks}/{total} blocks{capped}"
    return smt_parameters(model), desc, losses, smt_num_trainable(model)


# ------------------------------------------------------------------------------------ measuring


class PeakRSS:
    """Peak resident set size (bytes) over a block, and the RSS just before it.

    Linux: freed heap pages are handed back first (``malloc_trim``), the kernel's high-water
    mark is reset (``/proc/self/clear_refs`` = 5) and read back as ``VmHWM`` afterwards, so the
    peak is exact and earlier methods' cached pages do not hide this one's. Elsewhere a thread
    samples the RSS every 2 ms (approximate)."""

    def __init__(self) -> None:
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def rss(self) -> int:
        value = self._status("VmRSS")
        if value is None:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return value

    def _reset_high_water(self) -> bool:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return self._status("VmHWM") is not None

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        exact = self._reset_high_water()
        self.start = self.peak = self.rss()
        if not exact:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self.rss(), self._status("VmHWM") or 0)


@torch.no_grad()
def fact_accuracy(model, task: Task, device, batch_size: int = 512) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(task.inputs), batch_size):
        x = task.inputs[i:i + batch_size].to(device)
        pred = model(input_ids=x[:, :4]).logits[:, 3].argmax(-1)
        hits += int((pred == task.answers[i:i + batch_size].to(device)).sum())
    return hits / len(task.inputs)


def train_method(method: str, args, task: Task, vocab_size: int, budget: int) -> dict:
    gc.collect()
    device = torch.device(args.device)
    model = build_model(args, vocab_size)
    torch.manual_seed(args.seed + 1)
    if method == "smt":
        params, desc = [], ""  # chosen by the warm-up, inside the timed region below
    else:
        model, params, desc = setup_method(method, model, args, budget)

    def check_frozen():
        frozen_ok = all(not p.requires_grad for p in model.parameters()
                        if all(p is not q for q in params))
        assert frozen_ok, f"{method}: a backbone parameter requires grad"
        return sum(p.numel() for p in params)

    trainable = check_frozen()
    lr = {"meft": args.lr_meft, "meft+ist": args.lr_meft, "lora": args.lr_lora,
          "dense": args.lr_dense, "smt": args.lr_smt}[method]
    runtime = None
    if method.startswith("meft"):
        opt = create_meft_optimizer(model, lr=lr, weight_decay=0.0)
        trainable = budget  # MEFT's parameter count (under placement "cpu" keys/values are no nn.Parameters)
        first = next(iter(meft_adapters(model).values()))
        runtime = first.offload.runtime if first.offload is not None else None
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None
    gen = torch.Generator().manual_seed(args.seed + 2)
    inputs, labels = task.inputs.to(device), task.labels.to(device)
    losses, tokens = [], 0
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16
                else torch.autocast(device.type, enabled=False))

    def next_batch():
        rows = torch.randint(len(inputs), (args.batch_size,), generator=gen).to(device)
        return inputs[rows], labels[rows]

    scheduler = None
    if method == "meft+ist":
        from meft_triton import ISTScheduler

        scheduler = ISTScheduler(model, ist_config(args))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    meter = PeakRSS()
    model.train()
    with meter:
        start = time.perf_counter()
        train_steps = args.steps
        if method == "smt":
            from meft_triton import create_smt_optimizer

            params, desc, warm_losses, trainable = setup_smt(model, args, budget, next_batch, autocast)
            check_frozen()  # (its count would include the zero padding of partial edge blocks)
            losses += warm_losses
            tokens += len(warm_losses) * args.batch_size * inputs.shape[1]
            train_steps = max(1, args.steps - len(warm_losses))
            opt = create_smt_optimizer(model, lr=lr)
        for step in range(train_steps):
            batch_inputs, batch_labels = next_batch()
            if scheduler is not None:
                with autocast:
                    scheduler.before_step(
                        step, lambda: model(input_ids=batch_inputs, labels=batch_labels).loss)
            with autocast:
                loss = model(input_ids=batch_inputs, labels=batch_labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += batch_inputs.numel()
        if scheduler is not None:
            scheduler.release()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    moved = (runtime.bytes_to_device, runtime.bytes_to_host) if runtime is not None else (0, 0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
        mem_label = "peak GPU MiB"
    else:
        peak = meter.peak - meter.start
        mem_label = "peak RSS delta MiB"
    window = max(1, min(10, args.steps // 5))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    accuracy = fact_accuracy(model, task, device)
    result = {
        "method": method, "config": desc, "trainable params": trainable,
        "fact acc": accuracy, "loss first": first, "loss last": last,
        mem_label: peak / 2**20, "tokens/s": tokens / elapsed, "train s": elapsed,
    }
    if args.placement == "cpu":  # rows moved per training step (incl. IST's scoring passes)
        result["H2D MiB/step"], result["D2H MiB/step"] = (b / len(losses) / 2**20 for b in moved)
    if runtime is not None:
        runtime.close()
    del model, opt, params
    gc.collect()
    return result


def markdown_table(rows: list[dict]) -> str:
    headers = list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(c) for c in cells)])


# ------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local path or hub name of a causal LM "
                   "(default: a random Llama-style model built locally)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--facts", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CI scale: a few seconds on 2 CPU cores")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated from {', '.join(METHODS)}, or 'all'")
    p.add_argument("--hidden", type=int, default=None, help="hidden size of the random model")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the random model")
    p.add_argument("--relations", type=int, default=4)
    p.add_argument("--attributes", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--neurons", type=int, default=None, help="MEFT N per layer")
    p.add_argument("--experts", type=int, default=None, help="MEFT E")
    p.add_argument("--experts-per-token", type=int, default=None, help="MEFT P")
    p.add_argument("--topk", type=int, default=None, help="MEFT K_top")
    p.add_argument("--meft-backend", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--placement", default="gpu", choices=("gpu", "cpu"),
                   help='MEFT placement: "cpu" keeps the rows in CPU memory (meft_triton.offload)')
    p.add_argument("--lr-meft", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lr-dense", type=float, default=1e-3)
    p.add_argument("--lr-smt", type=float, default=1e-3)
    p.add_argument("--ist-ratio", type=float, default=0.25, help="IST rho: layers trained per step")
    p.add_argument("--ist-interval", type=int, default=10, help="IST steps between scoring rounds")
    p.add_argument("--ist-mode", default="importance", choices=("importance", "uniform"))
    p.add_argument("--smt-block", type=int, default=None, help="SMT block side (default max(8, d/16))")
    p.add_argument("--smt-warmup", type=int, default=None, help="SMT warm-up steps (no update)")
    p.add_argument("--smt-score", default="abs_mean", choices=("abs_mean", "mean_abs", "l1", "l2"))
    p.add_argument("--smt-targets", default="q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 masters)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    scale = dict(steps=100, facts=256, hidden=64, layers=2, attributes=32, batch_size=64,
                 neurons=256, experts=16, experts_per_token=4, topk=16, smt_warmup=10) if args.tiny else \
        dict(steps=400, facts=1024, hidden=128, layers=4, attributes=128, batch_size=64,
             neurons=512, experts=32, experts_per_token=4, topk=16, smt_warmup=20)
    for key, value in scale.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.methods == ["all"]:
        args.methods = list(METHODS)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = build_model(args, vocab_size=0) if args.model else None  # vocab from the checkpoint
    if probe is not None:
        vocab_size = probe.get_input_embeddings().num_embeddings
        bos = getattr(probe.config, "bos_token_id", None)
    else:
        subjects = math.ceil(args.facts / args.relations)
        vocab_size = subjects + args.relations + args.attributes + 16
        bos = 1
    task = make_task(args.facts, vocab_size, args.relations, args.attributes, args.seed,
                     bos if isinstance(bos, int) else None)
    model = probe if probe is not None else build_model(args, vocab_size)
    _, layers = find_decoder_layers(model)
    hidden = mlp_hidden_size(find_mlp(layers[0])[1], model)
    budget = len(layers) * adapter_parameter_count(hidden, meft_config(args))
    backbone = sum(p.numel() for p in model.parameters())
    base_acc = fact_accuracy(model, task, torch.device(args.device))
    del model, probe
    print(f"# synthetic facts: {args.facts} facts, {args.relations} relations, "
          f"{args.attributes} attributes (chance {1 / args.attributes:.3f}); "
          f"backbone {args.model or 'random Llama-style'} d={hidden} layers={len(layers)} "
          f"params={backbone:,} (frozen), base fact acc {base_acc:.3f}")
    print(f"# MEFT placement {args.placement!r}; {args.steps} steps x batch {args.batch_size} on {args.device} "
          f"({torch.get_num_threads()} threads), seed {args.seed}, bf16={args.bf16}, "
          f"trainable budget {budget:,} (MEFT's)")
    rows = []
    for method in args.methods:
        rows.append(train_method(method, args, task, vocab_size, budget))
        print(f"#   {method}: loss {rows[-1]['loss first']:.3f} -> {rows[-1]['loss last']:.3f}, "
              f"fact acc {rows[-1]['fact acc']:.3f}", flush=True)
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    results = main()
    fell = all(r["loss last"] < r["loss first"] for r in results)
    if not fell:
        print("ERROR: the loss did not fall for", [r["method"] for r in results
                                                   if r["loss last"] >= r["loss first"]])
    sys.exit(0 if fell else 1)
