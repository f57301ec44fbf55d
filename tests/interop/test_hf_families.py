"""Every transformers family llmcore imports, built tiny and random from its config (no downloads):
import gives transformers' logits within 1e-5 (fp32) on a right-padded batch and the same greedy
tokens; export writes the family that carries the model and import(export(x)) is bit-exact; a
2-shard checkpoint loads; every RoPE type computes transformers' frequencies."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmcore.export.hf import export_hf, import_hf  # noqa: E402
from llmcore.model.generate import generate  # noqa: E402

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=48)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # head_dim 16: one wavelength (32.5) in the smoothed band
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32}

# name: (family, config kwargs)
CASES = {
    "llama_tied": ("Llama", dict(tie_word_embeddings=True)),
    "llama_untied_llama3": ("Llama", dict(tie_word_embeddings=False, rope_parameters=LLAMA3)),
    "llama_bias_headdim_linear": ("Llama", dict(attention_bias=True, head_dim=24,
                                                rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                 "factor": 2.0})),
    "llama_dynamic": ("Llama", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
                                    max_position_embeddings=16)),
    "mistral": ("Mistral", dict(sliding_window=4096)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen2_yarn": ("Qwen2", dict(rope_parameters=YARN)),
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=True)),
    "qwen3_bias": ("Qwen3", dict(head_dim=16, attention_bias=True)),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=4, shared_expert_intermediate_size=96, norm_topk_prob=False, **MOE)),
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=4, norm_topk_prob=True, head_dim=32, **MOE)),
    "qwen3_moe_top1": ("Qwen3Moe", dict(num_experts=4, norm_topk_prob=True, num_experts_per_tok=1,
                                        moe_intermediate_size=48)),
}


def _hf_model(family, kw, seed=0):
    cfg = getattr(transformers, f"{family}Config")(**{**BASE, **kw})
    cfg.architectures = [f"{family}ForCausalLM"]
    torch.manual_seed(seed)
    m = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # non-trivial norms, biases and shared gates, so every mapping is tested
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias") or "shared_expert_gate" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return m


def _batch(vocab, seed=1):
    """Right-padded batch: row 0 has 21 tokens, row 1 has 13 then padding (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 21), generator=g)
    mask = torch.ones(2, 21, dtype=torch.long)
    ids[1, 13:], mask[1, 13:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers(case, tmp_path):
    family, kw = CASES[case]
    hf = _hf_model(family, kw)
    hf.save_pretrained(str(tmp_path / "hf"))
    model, _ = import_hf(tmp_path / "hf")
    ids, mask = _batch(BASE["vocab_size"])
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = model(ids)
    real = mask.bool()
    err = (got[real] - want[real]).abs().max().item()
    assert err <= 1e-5 * max(1.0, want.abs().max().item()), (case, err)
    # greedy generation: the same tokens as transformers
    prompt = ids[:1, :7]
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)[0, 7:]
    ours = generate(model, [prompt[0].tolist()], 8, temperature=0.0, stop_tokens=())[0]
    assert ours == theirs.tolist(), case


@pytest.mark.parametrize("case", list(CASES))
def test_export_writes_the_family_and_round_trips_bit_exact(case, tmp_path):
    family, kw = CASES[case]
    _hf_model(family, kw).save_pretrained(str(tmp_path / "hf"))
    model, _ = import_hf(tmp_path / "hf")
    out = export_hf(model, tmp_path / "back")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf2).__name__ == f"{family}ForCausalLM"
    again, _ = import_hf(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), case
    ids, mask = _batch(BASE["vocab_size"], seed=2)
    with torch.no_grad():
        torch.testing.assert_close(hf2(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def test_two_shard_checkpoint(tmp_path):
    hf = _hf_model("Qwen3", dict(head_dim=32))
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) >= 2
    model, _ = import_hf(tmp_path / "hf")
    ids, _ = _batch(BASE["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_dynamic_rope_follows_transformers_past_the_trained_length(tmp_path):
    """Dynamic NTK recomputes the frequencies per forward once the length passes
    max_position_embeddings (16 here), and resets below it — as transformers' dynamic_rope_update."""
    family, kw = CASES["llama_dynamic"]
    hf = _hf_model(family, kw)
    hf.save_pretrained(str(tmp_path / "hf"))
    model, _ = import_hf(tmp_path / "hf")
    for n in (40, 10, 24):  # grow, reset, grow again
        ids = torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [LLAMA3, YARN, {"rope_type": "linear", "rope_theta": 1e4, "factor": 3.0},
                                  {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
                                  {**YARN, "attention_factor": 0.7, "beta_fast": 16, "truncate": False}])
def test_rope_frequencies_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmcore.ops import rope_frequencies

    cfg = transformers.LlamaConfig(**{**BASE, "head_dim": 32, "rope_parameters": dict(rope)})
    for seq_len in (None, 300):
        want, want_att = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu", seq_len=seq_len)
        sc = {k: v for k, v in rope.items() if k != "rope_theta"}
        sc["max_position_embeddings"] = BASE["max_position_embeddings"]
        got, att = rope_frequencies(32, rope["rope_theta"], sc, seq_len=seq_len)
        torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
        assert math.isclose(att, want_att, rel_tol=0, abs_tol=0)


def test_sliding_window_is_refused_past_the_window(tmp_path):
    hf = _hf_model("Mistral", dict(sliding_window=8))
    hf.save_pretrained(str(tmp_path / "hf"))
    model, _ = import_hf(tmp_path / "hf")
    model(torch.randint(3, 300, (1, 8)))
    with pytest.raises(ValueError, match="exceeds sliding_window=8"):
        model(torch.randint(3, 300, (1, 9)))
