"""The GPU memory check: a short run of the OLMo-1B shape (random weights, the embedded data), then the
memory ledger's prediction beside the measured peak of each phase, the attention backend, and the prefill.

  python .ci/gpu_memory.py            # a GPU: the OLMo-1B shape, a few steps of every phase (a few minutes)
  python .ci/gpu_memory.py cpu        # the same script on a tiny shape, to check it runs (no GPU figures)

The GPU machines have no package registry: bring wheels of rouge-score (and the nltk, absl-py, regex, click,
joblib, tqdm it needs) and install them with `pip install --no-index --find-links WHEELS rouge-score`.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lume  # noqa: E402
from memory_ledger import TRANSIENT, memory_ledger  # noqa: E402  (beside this file)

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=1024,
            max_position_embeddings=512)
shape = lume.OLMO_1B if device.startswith("cuda") else tiny
out = Path(tempfile.mkdtemp()) / "run"
config = out.parent / "config.json"
config.write_text(json.dumps(shape))
flags = ["--model_config", str(config), "--device", device, "--task", "all", "--algo", "kl", "--max_steps", "4",
         "--relearn_steps", "4", "--relearn_data", "retain", "--quant_bits", "8", "--max_new_tokens", "32",
         "--mmlu", "", "--out_dir", str(out)]
print("flags:", " ".join(flags))
if torch.cuda.is_available():
    sdp = torch.backends.cuda
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
          f"{__import__('transformers').__version__}; SDPA backends enabled: flash {sdp.flash_sdp_enabled()}, "
          f"memory-efficient {sdp.mem_efficient_sdp_enabled()}, cuDNN {sdp.cudnn_sdp_enabled()}, "
          f"math {sdp.math_sdp_enabled()}")
lume.main(flags)  # refuses non-finite prefill logits (left padding) with one line: reaching the end means finite
measured = json.loads((out / "metrics.json").read_text())["cost"]["peak_memory_gib"]
args = lume.parse_args(flags)
args.algo = ("kl",)
ledger = memory_ledger(shape, args, gpu=torch.cuda.is_available())
model = lume.build_model(shape, "meta")
print(f"attention implementation: {model.config._attn_implementation}; the left-padded prefill stayed finite")
print("\n| phase | ledger held GiB | ledger with transients (T = --max_length) | measured |")
print("|---|---|---|---|")
pairs = {"unlearn": "unlearn", "probe relearn": "probe relearn", "probe quantize": "probe quantize",
         "score target": "score: generation", "score unlearned": "score: generation"}
for phase, key in pairs.items():
    held = sum(v for k, v in ledger[key].items() if k not in TRANSIENT) / 2**30
    total = sum(ledger[key].values()) / 2**30
    if key.startswith("score"):  # a scoring phase is a generation, then the likelihood passes
        total = max(total, sum(ledger["score: likelihood"].values()) / 2**30)
    print(f"| {phase} | {held:.2f} | {total:.2f} | {', '.join(f'{k} {v:.2f}' for k, v in measured[phase].items())} |")
