"""Write a tiny random-weight Qwen2-VL checkpoint (hub layout) plus an example image, for the demo.

    python tests/make_checkpoint.py OUT_DIR

The weights are random: the command-line demo runs end to end on it but its answer is gibberish.
The lab's trained nano model (checkpoints/qwen2vl-nano) is the one that answers sensibly.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import qwen2vl_min as q  # noqa: E402
from helpers import hf_config_dict, make_tokenizer, random_image  # noqa: E402


def write(out: Path) -> Path:
    import torch
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = q.Qwen2VLConfig.from_dict(hf_config_dict(tok, tied=True, layout="flat"))
    model = q.Qwen2VL(config)
    with torch.no_grad():        # larger random weights than PyTorch's default: a varied (gibberish) answer
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.1)
    processor = q.Processor(tok, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    q.save(model, processor, out)
    random_image(224, 160, seed=1).save(out / "example.png")
    return out


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny-qwen2vl")
    if not (out / "config.json").exists():
        print(f"wrote {write(out)}")
