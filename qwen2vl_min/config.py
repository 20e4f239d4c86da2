"""Stage 0 — configuration: what shape every tensor of the model has.

Frozen dataclasses whose field names are the keys of a checkpoint's `config.json`. `from_dict` reads
both layouts seen in the wild: the hub's flat Qwen2-VL layout (text keys at the top level, M-RoPE in
`rope_scaling.mrope_section`, `vision_config` only partly given) and the transformers-v5 nested
layout (`text_config` with `rope_parameters`). Defaults are the real checkpoints' values (REFERENCE
1.1-1.2), never transformers' class defaults (its text default is the 72B LM with eps 1e-5).
"""
from dataclasses import MISSING, asdict, dataclass, field, fields

# Bookkeeping keys that real config.json files carry and that change nothing at inference time.
IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "max_window_layers", "sliding_window", "layer_types", "vision_token_id", "rope_type", "type",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
    "tokenizer_class", "id2label", "label2id", "quantization_config", "_attn_implementation_autoset",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "torchscript", "pruned_heads", "finetuning_task",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "tf_legacy_loss",
    "use_bfloat16", "initializer_factor",
    # generation settings that transformers 4.x repeats in every (sub-)config
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
}


@dataclass(frozen=True)
class VisionConfig:
    """The ViT shared by 2B / 7B / 72B (~675M parameters, paper Table 1)."""
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: int = 4                 # an int: transformers' strict config rejects 4.0
    hidden_size: int = 1536            # merger output width = the LLM's hidden_size
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:        # 3 * 2 * 14 * 14 = 1176 values per patch row
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder. No defaults for the sizes: a config that omits them is an error."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple = (16, 24, 24)  # rotary pairs given to the t / h / w position rows
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    use_sliding_window: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @staticmethod
    def from_dict(d: dict) -> "Qwen2VLConfig":
        """Read a config.json dict (flat hub layout or nested v5 layout). Unknown keys are errors."""
        d = dict(d)
        text = dict(d.pop("text_config", None) or {})
        vision = dict(d.pop("vision_config", None) or {})
        tokens = {k: d.pop(k) for k in ("image_token_id", "video_token_id",
                                        "vision_start_token_id", "vision_end_token_id") if k in d}
        text.update({k: v for k, v in d.items() if k not in IGNORED_KEYS})   # flat layout: text keys on top
        text = _read_rope(text)
        if "tie_word_embeddings" in d:
            text["tie_word_embeddings"] = d["tie_word_embeddings"]
        vision = {{"in_chans": "in_channels", "spatial_patch_size": "patch_size"}.get(k, k): v
                  for k, v in vision.items()}
        rope = vision.pop("rope_parameters", None) or {}
        vision.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        vision.setdefault("hidden_size", text.get("hidden_size"))   # the merger feeds the LLM
        text_cfg = TextConfig(**_known(TextConfig, text, "config.json"))
        vision_cfg = VisionConfig(**_known(VisionConfig, vision, "config.json vision_config"))
        if text_cfg.hidden_act != "silu" or vision_cfg.hidden_act != "quick_gelu":
            raise ValueError(f"config.json: hidden_act {text_cfg.hidden_act!r}/{vision_cfg.hidden_act!r} "
                             "is not Qwen2-VL's silu/quick_gelu; this is not a Qwen2-VL checkpoint")
        if text_cfg.use_sliding_window:
            raise ValueError("config.json: use_sliding_window=true is not supported (no Qwen2-VL "
                             "checkpoint uses it); set it to false")
        if 2 * sum(text_cfg.mrope_section) != text_cfg.head_dim:
            raise ValueError(f"config.json: mrope_section {list(text_cfg.mrope_section)} must sum to "
                             f"head_dim/2 = {text_cfg.head_dim // 2}")
        return Qwen2VLConfig(text=text_cfg, vision=vision_cfg, **tokens)

    def to_dict(self) -> dict:
        """The hub's flat layout, which transformers 4.x and 5.x both read."""
        text = asdict(self.text)
        mrope = list(text.pop("mrope_section"))
        vision = asdict(self.vision)
        vision.pop("hidden_act")
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": vision.pop("rope_theta")}
        return {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
                **text, "rope_scaling": {"type": "mrope", "mrope_section": mrope},
                "vision_config": vision, "image_token_id": self.image_token_id,
                "video_token_id": self.video_token_id, "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id}


def _read_rope(text: dict) -> dict:
    """rope_scaling (hub) or rope_parameters (v5) -> rope_theta + mrope_section."""
    rope = text.pop("rope_scaling", None) or text.pop("rope_parameters", None) or {}
    text.pop("rope_parameters", None)
    if "mrope_section" in rope:
        text["mrope_section"] = tuple(rope["mrope_section"])
    if "rope_theta" in rope:
        text.setdefault("rope_theta", rope["rope_theta"])
    return text


def _known(cls, values: dict, where: str) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k in values if k not in names and k not in IGNORED_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; qwen2vl_min reads Qwen2-VL configs only "
                         f"(known: {sorted(names)}). Remove the keys or check the checkpoint type.")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if values.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    return {k: v for k, v in values.items() if k in names}


# Presets with the published checkpoints' numbers (REFERENCE 1.1); the vision tower is shared.
def _preset(hidden, layers, heads, kv_heads, inter, vocab, tied):
    return Qwen2VLConfig(text=TextConfig(vocab, hidden, inter, layers, heads, kv_heads, tie_word_embeddings=tied),
                         vision=VisionConfig(hidden_size=hidden))


PRESETS = {
    "2B": _preset(1536, 28, 12, 2, 8960, 151936, True),
    "7B": _preset(3584, 28, 28, 4, 18944, 152064, False),
    "72B": _preset(8192, 80, 64, 8, 29568, 152064, False),
}
__all__ = ["VisionConfig", "TextConfig", "Qwen2VLConfig", "PRESETS"]
