"""import_hf is exact or refuses: every transformers config field that changes the math is either
represented (tests/interop/test_hf_families.py) or refused with a message naming it; pickled (.bin) weights are refused; a tokenizer
that is not ours is reported, never silently dropped."""
import warnings

import pytest
import torch
import transformers

from llmcore.export.hf import config_from_hf, import_hf

BASE = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
QMOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
            qkv_bias=False, norm_topk_prob=True)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}

# (config class, base kwargs, the field changed, its value, what the message must name)
REFUSED = [
    ("LlamaConfig", {}, "hidden_act", "gelu", "hidden_act='gelu'"),
    ("LlamaConfig", {}, "mlp_bias", True, "mlp_bias=True"),
    ("LlamaConfig", {}, "pretraining_tp", 2, "pretraining_tp=2"),
    ("LlamaConfig", {}, "attention_dropout", 0.1, "attention_dropout=0.1"),
    ("LlamaConfig", {}, "rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 32,
                                            "long_factor": [1.0] * 32, "original_max_position_embeddings": 64},
     "'longrope'"),
    ("LlamaConfig", {}, "rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                                            "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("LlamaConfig", {}, "logit_scale", 0.5, "logit_scale=0.5"),  # a field llmcore does not know
    ("MixtralConfig", MOE, "router_jitter_noise", 0.1, "router_jitter_noise=0.1"),
    ("MixtralConfig", MOE, "hidden_act", "gelu", "hidden_act='gelu'"),
    ("Qwen2Config", {}, "use_sliding_window", True, "use_sliding_window=True"),
    ("Qwen3Config", {}, "layer_types", ["full_attention", "sliding_attention"], "layer_types="),
    ("Qwen2MoeConfig", QMOE, "use_sliding_window", True, "use_sliding_window=True"),
    ("Qwen2MoeConfig", QMOE, "mlp_only_layers", [0], "mlp_only_layers=[0]"),
    ("Qwen2MoeConfig", QMOE, "decoder_sparse_step", 2, "decoder_sparse_step=2"),
    ("Qwen2MoeConfig", QMOE, "shared_expert_intermediate_size", 96, "shared_expert_intermediate_size=96"),
    ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64), "mlp_only_layers", [1],
     "mlp_only_layers=[1]"),
]


def _config(cls, extra, **kw):
    c = getattr(transformers, cls)(**{**BASE, **extra, **kw})
    c.architectures = [cls.replace("Config", "ForCausalLM")]
    return c


@pytest.mark.parametrize("cls,extra", [("LlamaConfig", {}), ("MixtralConfig", MOE), ("Qwen2MoeConfig", QMOE),
                                       ("MistralConfig", {}), ("Qwen2Config", {}), ("Qwen3Config", {})])
def test_llmcore_shaped_configs_import(cls, extra):
    cfg = config_from_hf(_config(cls, extra))
    assert cfg.dim == 128 and cfg.n_layers == 2


@pytest.mark.parametrize("cls,extra,field,value,named", REFUSED, ids=[f"{c}-{f}" for c, _, f, _, _ in REFUSED])
def test_math_changing_fields_are_refused_by_name(cls, extra, field, value, named):
    with pytest.raises(ValueError, match="cannot import") as e:
        config_from_hf(_config(cls, extra, **{field: value}))
    assert named in str(e.value)


def _saved(tmp_path, safe=True, **kw):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_config("LlamaConfig", {}, **kw))
    hf.save_pretrained(str(tmp_path / "hf"))
    if not safe:  # what an older checkpoint ships: pickled weights only (transformers 5 writes no .bin)
        for f in (tmp_path / "hf").glob("*.safetensors"):
            f.unlink()
        torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    return tmp_path / "hf"


def test_gelu_llama_is_refused_before_any_weight_is_read(tmp_path):
    """The reported case: hidden_act='gelu' imported and gave logits off by 3.2."""
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        import_hf(_saved(tmp_path, hidden_act="gelu"))


def test_pickled_weights_are_refused(tmp_path):
    d = _saved(tmp_path, safe=False)
    assert list(d.glob("*.bin")) and not list(d.glob("*.safetensors"))
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights .*pytorch_model\.bin"):
        import_hf(d)


def test_foreign_tokenizer_is_reported_not_dropped(tmp_path):
    from tokenizers import Tokenizer, models

    d = _saved(tmp_path)
    Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(d / "tokenizer.json"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model, tok = import_hf(d)
    assert tok is None and any("not an llmcore tokenizer" in str(x.message) and "--tokenizer" in str(x.message)
                               for x in w)
    ids = torch.randint(0, 320, (1, 8))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
