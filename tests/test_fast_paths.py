"""The fast paths equal the plain ones: batched vision blocks == a loop over the reference's cu_seqlens blocks;
static-shape decoding == prefix decoding; the compiled decode step == eager (CUDA: CUDA graphs; CPU: inductor);
and the benchmark script runs end to end (one iteration, no timing assertions)."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import qwen2vl_min as q
from helpers import image, random_image, text, user, video
from qwen2vl_min.generate import decode_rope_table
from qwen2vl_min.vision import block_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_batched_vision_blocks_equal_the_per_block_loop(device):
    grid = torch.tensor([[1, 4, 6], [3, 2, 4], [1, 10, 4]])      # image, video (3 temporal patches), image
    N, H, D = int(grid.prod(-1).sum()), 3, 16
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q_, k, v = (torch.randn(N, H, D, device=device, dtype=dtype) for _ in range(3))
    # the reference: cu_seqlens = cumsum(repeat_interleave(h*w, t)); attention inside each block separately
    lengths = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0]).tolist()
    expected = torch.cat([F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in blk)).transpose(0, 1)
                          for blk in zip(*(x.split(lengths) for x in (q_, k, v)))])
    got = block_attention(q_, k, v, grid)
    torch.testing.assert_close(got, expected, **({} if device == "cpu" else {"atol": 2e-2, "rtol": 2e-2}))
    assert len(lengths) == 5


def _prompt(pair):
    frames = [random_image(84, 56, seed=40 + i) for i in range(4)]
    return pair.processor(user(image(random_image(112, 84, seed=3)), video(frames), text("What happens?")))


def test_static_decode_equals_prefix_decode(pair_a):
    model, batch = pair_a.model, _prompt(pair_a)
    L = batch.input_ids.shape[1]
    logits = {}
    for static, table in ((False, False), (True, False), (False, True), (True, True)):
        cache = q.KVCache(model.config.text, 1, L + 4)
        out, deltas = q.prefill(model, batch, cache)
        token = out.argmax(-1, keepdim=True)
        mask = torch.ones(1, L + 4, dtype=torch.long)
        pos = torch.tensor(L) if static else L
        rope = decode_rope_table(model, deltas, L + 4, torch.float32) if table else None
        logits[static, table] = q.decode_step(model, token, mask if static else mask[:, :L + 1], cache, pos,
                                              deltas, rope)
    for key in ((True, False), (False, True), (True, True)):      # the rotary table == angles computed per step
        torch.testing.assert_close(logits[key], logits[False, False], rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_gives_the_eager_tokens(pair_a, device):
    """On CUDA this is the CUDA-graph path; on CPU the same torch.compile call runs through inductor."""
    model = pair_a.model.to(device)
    batch = _prompt(pair_a).to(device)
    try:
        eager = list(q.generate(model, batch, 12, stop_token_ids=[]))
        compiled = list(q.generate(model, batch, 12, stop_token_ids=[], compile=True))
        again = list(q.generate(model, batch, 12, stop_token_ids=[], compile=True))   # reuses the graph
    finally:
        pair_a.model.to("cpu")
    assert compiled == eager and again == eager


def test_benchmark_runs_end_to_end():
    r = subprocess.run([sys.executable, "benchmarks/bench.py", "--config", "tiny", "--iters", "1",
                        "--decode-tokens", "4", "--no-save"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "greedy tokens identical: True" in r.stdout
    for metric in ("vision encoder (s) [image1024]", "time to first token (s) [video]",
                   "decode tokens/s, batch 8 [image448]", "peak memory GB, batch 1 [image448]"):
        assert f"| {metric} |" in r.stdout
