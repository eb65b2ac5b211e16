"""Loading a checkpoint in the released upstream layout: time and peak memory against the weights' size.

Writes a random-weight bf16 model (a mid-size Qwen2.5-VL text/vision stack and SAM 2 Hiera-T at 1024 px) in
our layout, converts it with ``citrus-v convert --to upstream`` (3 shards), then loads the upstream folder in
a fresh process and reports the load time and the growth of the peak resident memory.

    .venv/bin/python bench/upstream_load.py [--out DIR] [--hidden 1024] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The child reports its resident size (VmRSS) and high-water mark (VmHWM) after the imports, after loading,
# and after one pass over every weight (memory-mapped pages count once they are touched).
CHILD = """
import sys, time
from citrus_v import CitrusV
def status(key):
    return int(next(line for line in open('/proc/self/status') if line.startswith(key)).split()[1]) // 1024
base = status('VmRSS')
start = time.perf_counter()
model = CitrusV.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - start
loaded = status('VmRSS')
checksum = sum(float(t.float().sum()) for t in model.state_dict().values())
peak = status('VmHWM')
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) // 2**20
print(base, loaded, peak, seconds, weights, next(model.parameters()).dtype)
"""


def write_model(folder: Path, hidden: int, layers: int) -> None:
    """A random bf16 CitrusV in our layout, written tensor by tensor (no second copy in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig

    from citrus_v.checkpoint_layout.sam2_variants import VARIANTS
    from citrus_v.modeling import CitrusV, CitrusVConfig
    from citrus_v.modeling.upstream_checkpoint import save_unused

    mllm = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=hidden * 11 // 4,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 128,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
            tie_word_embeddings=False,
        ),
        vision_config=dict(depth=8, hidden_size=640, intermediate_size=1728, num_heads=10, out_hidden_size=hidden),
        tie_word_embeddings=False,
    )
    config = CitrusVConfig.from_parts(mllm, VARIANTS["sam2_hiera_t"].config(), seg_token_idx=31999)
    with torch.device("meta"):
        skeleton = CitrusV(config)
    state = {}
    for name, tensor in skeleton.state_dict().items():
        state[name] = (torch.randn(tensor.shape) * 0.02).to(torch.bfloat16)
    copies = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")
    state["grounding_encoder." + copies[1]] = state["grounding_encoder." + copies[0]].clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    save_unused({}, folder)
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    from citrus_v.modeling.upstream_checkpoint import write_upstream

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        ours, upstream = root / "ours", root / "upstream"
        write_model(ours, args.hidden, args.layers)
        size = (ours / "model.safetensors").stat().st_size
        start = time.perf_counter()
        write_upstream(ours, upstream, max_shard_size=size // 3 + 1)
        convert_s = time.perf_counter() - start
        shards = len(set(json.loads((upstream / "model.safetensors.index.json").read_text())["weight_map"].values()))
        out = subprocess.run([sys.executable, "-c", CHILD, str(upstream)], capture_output=True, text=True, check=True)
        base, loaded, peak, seconds, weights, dtype = out.stdout.split()
        base, loaded, peak, weights = int(base), int(loaded), int(peak), int(weights)
        print(f"weights: {weights} MiB ({dtype}), {shards} upstream shards")
        print(f"convert --to upstream: {convert_s:.1f} s")
        print(f"load upstream folder: {float(seconds):.1f} s")
        print(f"resident after load: +{loaded - base} MiB (weights are memory-mapped until used)")
        print(f"peak after one pass over the weights: +{peak - base} MiB = {(peak - base) / weights:.2f} x the weights")


if __name__ == "__main__":
    main()
