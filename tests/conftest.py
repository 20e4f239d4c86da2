"""Session fixtures: one tiny tokenizer, two tiny random Qwen2-VL configs as transformers models, and the
same weights loaded by qwen2vl_min from a checkpoint written with transformers' save_pretrained."""
import pytest
import torch

import qwen2vl_min as q
from helpers import hf_config_dict, make_hf_model, make_tokenizer, write_checkpoint_extras

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


class Pair:
    """The oracle (transformers) and ours on the same weights, plus the config dict both were built from."""

    def __init__(self, tok, path, **kw):
        self.hf = make_hf_model(tok, **kw)
        self.hf.save_pretrained(path)
        write_checkpoint_extras(tok, path)
        self.path = path
        self.cfg = hf_config_dict(tok, **kw)
        self.model, self.processor = q.load(path, device="cpu")


@pytest.fixture(scope="session", params=["a", "b"])
def pair(request, tok, tmp_path_factory):
    """Config a: tied embeddings, GQA 2, mrope [2,3,3]; config b: untied, GQA 3, mrope [4,2,2]."""
    tied = request.param == "a"
    return _pairs(tok, tmp_path_factory, request.param, tied)


_cache = {}


def _pairs(tok, tmp_path_factory, variant, tied):
    if variant not in _cache:
        _cache[variant] = Pair(tok, tmp_path_factory.mktemp(f"ckpt-{variant}"), tied=tied, variant=variant)
    return _cache[variant]


@pytest.fixture(scope="session")
def pair_a(tok, tmp_path_factory):
    return _pairs(tok, tmp_path_factory, "a", True)
