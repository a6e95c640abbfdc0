"""The memory ledger: what each phase of a lume.py run holds on one process's GPU, from the model's shape and the
flags, and the README's memory table built from it. lume.py never runs this file; the tests hold the ledger to the
live tensors of a run, and .ci/gpu_memory.py prints it beside a GPU's measured peaks.

  python .ci/memory_ledger.py        # prints the README's memory table
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lume import (LORA_TARGETS, METHODS, OLMO_1B, PREFIX_GIB, blocks_trained, build_model, md_table,  # noqa: E402
                  parse_args, recipe, recomputes, runs_of)

OLMO_7B = OLMO_1B | dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
                         tie_word_embeddings=False)


TRANSIENT = ("activations (estimate)", "logits", "KV cache")  # freed within a step or a batch; the rest is held


def memory_ledger(config, args, world=1, gpu=True, tokens=0):
    """{phase: {item: bytes}} that one of `world` processes holds on its device, for a model of `config` (the
    fields of config.json) and args' first method; `tokens`: those of the unlearning examples, whose states
    entering the first trained block a CPU run keeps (frozen_prefix). Weights, gradients and AdamW's two moments
    (with --lora_rank: of the adapters alone) are fp32, sharded over several processes. On a GPU (bf16 autocast) an
    activation takes 2 bytes and what waits in host memory is left out; on the CPU (one memory) it counts. Sequences are
    --max_length tokens long; the activations are an estimate (per token and trained block: its input kept for
    checkpointing, 8H + 4I internals; no block below the lowest trained one keeps any), the rest exact. The
    retrain model's phases are the target's, the unlearned model waiting in host memory."""
    model = build_model(config, "meta")  # shapes, no memory
    c, layers, head = model.config, model.get_decoder().layers, model.get_output_embeddings()
    runs = len(runs_of(args)) > 1 or args.tune  # the target waits in host memory to be restored
    args = recipe(args, args.algo[0], args.seed, c.num_hidden_layers)  # AILS: its blocks and retain examples
    method, act, host, T = METHODS[args.algo[0]], 2 if gpu else 4, 0 if gpu else 1, args.max_length
    blocks = blocks_trained(args, c.num_hidden_layers, method)

    def fp32(params):
        return 4 * sum(p.numel() for p in params)

    weights, copy_ = fp32(model.parameters()), fp32(model.state_dict().values())  # a copy names tied weights twice
    saved = weights if blocks is None else fp32(p for i in blocks for p in layers[i].parameters())  # the probe's
    trained = saved
    if args.lora_rank:  # the adapters alone train: r x (in + out) for each adapted projection of the blocks
        adapted = [m for i in (blocks or range(len(layers))) for name, m in layers[i].named_modules()
                   if name.split(".")[-1] in LORA_TARGETS]
        trained = 4 * args.lora_rank * sum(m.in_features + m.out_features for m in adapted)
    heads = c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.hidden_size * (c.num_key_value_heads or heads) // heads  # per token
    recompute = recomputes(args, torch.device("cuda" if gpu else "cpu"))
    depth = len(layers) - min(blocks or [0])  # blocks below the first trained one keep no activations
    inner = (8 * c.hidden_size + 4 * c.intermediate_size) * act
    per_token = depth * 4 * c.hidden_size + inner if recompute else depth * (4 * c.hidden_size + inner)

    def training(rows):
        state = dict(weights=weights // world, **{"LoRA adapters": trained // world if args.lora_rank else 0},
                     gradients=trained // world, **{"AdamW moments": 2 * trained // world})
        if world > 1:  # FSDP2 gathers a block (and the next) and keeps the root unit (embeddings, output) gathered
            root = weights - fp32(layers.parameters())
            state |= {"gathered units": 2 * fp32(layers[0].parameters()) + root, "plain model (host)": host * weights}
        return state | {"activations (estimate)": rows * T * per_token, "logits": rows * T * c.vocab_size * (act + 12)}

    sides = 1 + args.retain_per_forget * method.retain  # a micro-step's forget rows and the retain rows with them
    phases = {
        "load": dict(weights=weights, logits=args.eval_batch_size * T * c.vocab_size * (act + 8)),  # the reference
        "score: generation": {"weights": weights, "KV cache": args.gen_batch_size * (T + args.max_new_tokens) * kv
                              * act, "activations (estimate)": args.gen_batch_size * T * inner},  # the prefill
        "score: likelihood": dict(weights=weights, logits=args.eval_batch_size * T * c.vocab_size * (act + 18)),
        "unlearn": training(1 if method.sequential else args.batch_size * sides)  # SUGD: one row a step
        | ({"reference model": weights} if method.ref_logits else {})
        | ({"target (host)": host * copy_} if runs else {})
        | ({"frozen blocks' outputs": 4 * tokens * c.hidden_size} if not gpu and world == 1 and min(blocks or [0])
           and 4 * tokens * c.hidden_size <= PREFIX_GIB * 2**30 else {}),
        "probe relearn": training(args.batch_size) | {"saved blocks (host)": host * saved},
        "probe quantize": {"weights": weights, "saved weights (host)": host * fp32(
            m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)},
    }
    if world > 1:  # the sharded copy's weights come back one tensor at a time, then the plain model returns
        phases["gather"] = {"weights": weights, "sharded copy": weights // world}
    return {phase: {k: n for k, n in items.items() if n} for phase, items in phases.items()}


MEMORY_ROUTES = [  # (shape, its config, GPUs, flags): the README's GPU commands
    ("OLMo-1B", OLMO_1B, 1, "--algo npo --gen_batch_size 256"),
    ("OLMo-1B", OLMO_1B, 8, "--batch_size 1 --grad_accum 4"),
    ("OLMo-7B", OLMO_7B, 1, ""), ("OLMo-7B", OLMO_7B, 1, "--train_layers 8"),
    ("OLMo-7B", OLMO_7B, 1, "--train_layers 8 --algo kl"), ("OLMo-7B", OLMO_7B, 1, "--lora_rank 16"),
    ("OLMo-7B", OLMO_7B, 1, "--algo ails"), ("OLMo-7B", OLMO_7B, 8, "--batch_size 1 --grad_accum 4")]


CARDS = {"H100 80 GB": 79.6, "H200 141 GB": 140.4}  # GiB each holds (nvidia-smi); fits: peak + 1 GiB (CUDA context)


def memory_table():
    """The README's memory table: GiB per phase and process, from memory_ledger, for MEMORY_ROUTES."""
    rows, names = [], list(memory_ledger(OLMO_1B, parse_args([]), 8))
    for shape, config, world, flags in MEMORY_ROUTES:
        args = parse_args(flags.split())
        totals = {k: sum(v.values()) / 2**30 for k, v in memory_ledger(config, args, world).items()}
        peak = max(totals.values())
        rows.append([shape, str(world), flags or "defaults"] + [f"{totals[k]:.1f}" if k in totals else "-"
                                                                for k in names]
                    + [f"**{peak:.1f}**"] + ["yes" if peak + 1 <= gib else "no" for gib in CARDS.values()])
    return md_table(["model", "GPUs", "flags"] + names + ["peak"] + [f"fits {card}" for card in CARDS], rows)


if __name__ == "__main__":
    print(memory_table())
