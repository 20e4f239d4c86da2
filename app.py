"""The Qwen2-VL Lab app: `python app.py` opens http://127.0.0.1:7860 with the lab's nano model.

Chat about images and videos on the left; inspect the prompt's tokens, M-RoPE positions, patches and the
attention of every generated token on the right. `--model` takes a checkpoint directory or a hub id.
"""
import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")      # before gradio is imported: no telemetry

import torch  # noqa: E402

import qwen2vl_min as q  # noqa: E402
from lab.train import NANO_DIR  # noqa: E402

MAX_UPLOAD = "50mb"        # per file; bigger uploads are refused by the server before they reach the model


def main(argv=None):
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(NANO_DIR), help="checkpoint directory or hub id (default: the nano model)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    a = p.parse_args(argv)
    if a.model == str(NANO_DIR) and not NANO_DIR.is_dir():
        sys.exit(f"error: no --model given and the nano model ({NANO_DIR}) is missing; pass --model DIR or a hub id")
    try:
        model, processor = q.load(a.model, device=a.device, dtype=a.dtype and getattr(torch, a.dtype))
    except ValueError as e:
        sys.exit(f"error: {e}")
    from lab.ui import build_demo
    demo = build_demo(model, processor, max_new_tokens=a.max_new_tokens)
    demo.queue(default_concurrency_limit=1).launch(server_name=a.host, server_port=a.port, share=a.share,
                                                   max_file_size=MAX_UPLOAD, show_error=True)


if __name__ == "__main__":
    main()
