"""The quickest way to try a checkpoint: python -m qwen2vl_min --model SRC --image F --prompt "..."

Streams the answer to stdout. SRC is a local checkpoint directory or a hub id (Qwen/Qwen2-VL-2B-Instruct);
without --model it is the lab's own nano model, shipped in checkpoints/qwen2vl-nano.
"""
import argparse
import sys
from pathlib import Path

import torch

from . import generate, load, stream_text

NANO = Path(__file__).resolve().parent.parent / "checkpoints" / "qwen2vl-nano"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qwen2vl_min", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(NANO), help="checkpoint directory or hub id (default: the nano model)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--video", action="append", default=[], help="video file (repeat for several)")
    p.add_argument("--prompt", default="Describe this.", help="the question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    try:
        if a.model == str(NANO) and not NANO.is_dir():
            raise ValueError(f"no --model given and the nano model ({NANO}) is not there; pass --model DIR or a "
                             "hub id (`make demo` writes a random-weight one to .cache/tiny-qwen2vl)")
        model, processor = load(a.model, device=a.device, dtype=a.dtype and getattr(torch, a.dtype))
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        content = ([{"type": "image", "image": f} for f in a.image] + [{"type": "video", "video": f} for f in a.video]
                   + [{"type": "text", "text": a.prompt}])
        batch = processor([{"role": "user", "content": content}]).to(device, dtype)
        for m in batch.media:
            print(f"[{m['kind']}: grid_thw {m['grid_thw']}, {m['tokens']} visual tokens]", file=sys.stderr)
        for piece in stream_text(processor, generate(model, batch, a.max_new_tokens, temperature=a.temperature)):
            print(piece, end="", flush=True)
        print()
    except ValueError as e:            # bad input or checkpoint: a message for people, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
