"""The GPU check: short runs of the OLMo-1B and OLMo-7B shapes (random weights, the embedded data), each phase's
measured peak beside the memory ledger's prediction, the unlearning step time, the attention backends, the prefill.

  python .ci/gpu_memory.py            # a GPU: 7 short runs (OLMo-1B: every phase of KL; then for both shapes: the
                                      # last quarter of the blocks with checkpointing, LoRA on every block, SUGD)
  python .ci/gpu_memory.py cpu        # the same script on tiny shapes, to check it runs (no GPU figures)
  python .ci/gpu_memory.py cuda 1b    # the OLMo-1B runs alone

The GPU machines have no package registry: bring wheels of rouge-score (and the nltk, absl-py, regex, click,
joblib, tqdm it needs) and install them with `pip install --no-index --find-links WHEELS rouge-score`.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lume  # noqa: E402
from memory_ledger import OLMO_7B, TRANSIENT, memory_ledger  # noqa: E402  (beside this file)

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
only = sys.argv[2] if len(sys.argv) > 2 else ""
gpu = device.startswith("cuda")
tiny = dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=2, intermediate_size=128, vocab_size=1024,
            max_position_embeddings=512)
shapes = {"OLMo-1B": lume.OLMO_1B if gpu else tiny, "OLMo-7B": OLMO_7B if gpu else tiny}
short = ["--task", "1", "--max_steps", "6", "--probes", "none", "--mmlu", "none", "--max_new_tokens", "8"]
runs = [("OLMo-1B", ["--task", "all", "--algo", "kl", "--max_steps", "4", "--relearn_steps", "4", "--relearn_data",
                     "retain", "--probes", "relearn,quantize", "--quant_bits", "8", "--max_new_tokens", "32",
                     "--mmlu", ""])]
for shape in ("OLMo-1B", "OLMo-7B"):
    quarter = str(shapes[shape]["num_hidden_layers"] // 4)  # 4 of OLMo-1B's 16 blocks, 8 of OLMo-7B's 32
    runs += [(shape, short + ["--algo", "gd", "--train_layers", quarter, "--grad_checkpointing"]),
             (shape, short + ["--algo", "gd", "--lora_rank", "16", "--grad_checkpointing"]),
             (shape, short + ["--algo", "ails", "--max_steps", "24"])]
runs = [(shape, flags) for shape, flags in runs if only.lower() in shape.lower()]

if torch.cuda.is_available():
    sdp = torch.backends.cuda
    lume.resolve_device(device)  # as lume.main does: cuDNN attention off
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
          f"{__import__('transformers').__version__}; SDPA backends enabled: flash {sdp.flash_sdp_enabled()}, "
          f"memory-efficient {sdp.mem_efficient_sdp_enabled()}, cuDNN {sdp.cudnn_sdp_enabled()}, "
          f"math {sdp.math_sdp_enabled()}")
table = ["| shape | flags | phase | ledger held GiB | ledger with transients | measured GiB | step ms (median) |",
         "|---|---|---|---|---|---|---|"]
pairs = {"unlearn": "unlearn", "probe relearn": "probe relearn", "probe quantize": "probe quantize",
         "score target": "score: generation", "score unlearned": "score: generation"}
for shape, flags in runs:
    t0, out = time.perf_counter(), Path(tempfile.mkdtemp()) / "run"
    config = out.parent / "config.json"
    config.write_text(json.dumps(shapes[shape]))
    flags = ["--model_config", str(config), "--device", device] + flags + ["--out_dir", str(out)]
    print(f"\n== {shape}: {' '.join(flags)}", flush=True)
    lume.MEMORY.clear()
    lume.main(flags)  # refuses non-finite prefill logits (left padding) with one line: reaching the end means finite
    cost = json.loads((out / "metrics.json").read_text())["cost"]
    measured, train = cost["peak_memory_gib"], next(iter(cost["train"].values()))
    args = lume.parse_args(flags)
    ledger = memory_ledger(shapes[shape], args, gpu=gpu)
    shown = " ".join(f for f in flags[4:] if not f.startswith(("/", "--out_dir")))  # after --model_config, --device
    for phase, key in pairs.items():
        if phase not in measured:
            continue
        held = sum(v for k, v in ledger[key].items() if k not in TRANSIENT) / 2**30
        total = sum(ledger[key].values()) / 2**30
        if key.startswith("score"):  # a scoring phase is a generation, then the likelihood passes
            total = max(total, sum(ledger["score: likelihood"].values()) / 2**30)
        step = f"{train['step_ms_median']:.0f}" if phase == "unlearn" else ""
        table.append(f"| {shape} | {shown} | {phase} | {held:.2f} | {total:.2f} | "
                     f"{', '.join(f'{k} {v:.2f}' for k, v in measured[phase].items())} | {step} |")
    print(f"== {shape} done in {time.perf_counter() - t0:.0f} s", flush=True)
    if gpu:
        torch.cuda.empty_cache()
model = lume.build_model(shapes["OLMo-1B"], "meta")
print(f"\nattention implementation: {model.config._attn_implementation}; every left-padded prefill stayed finite\n")
print("\n".join(table))
