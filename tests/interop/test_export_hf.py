"""HF export: transformers loads the directory offline, logits equal ours (fp32), greedy tokens are
identical, import gives back the same model; MoE via Mixtral / Qwen2-MoE; LoRA merge."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmcore.export.hf import export_hf, import_hf  # noqa: E402
from llmcore.model.generate import generate  # noqa: E402
from tests.interop.conftest import tiny_model  # noqa: E402

ATOL = 2e-5  # fp32; measured max |diff| ~3e-7 on logits of magnitude ~1.5

CASES = {
    "dense": ({}, "LlamaForCausalLM"),
    "moe_shared": (dict(n_experts=4, n_shared_experts=1, top_k=2), "Qwen2MoeForCausalLM"),
    "moe": (dict(n_experts=4, top_k=2), "MixtralForCausalLM"),
}


def _load(d):
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_export_logits_greedy_import(case, tok, tmp_path):
    over, arch = CASES[case]
    model = tiny_model(tok.vocab_size, seed=1, **over)
    with torch.no_grad():  # make the norms non-trivial so their mapping is tested
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    out = export_hf(model, tmp_path / "hf", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch] and cfg["tie_word_embeddings"] is True
    hf = _load(out)
    assert type(hf).__name__ == arch
    ids = torch.randint(3, tok.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)

    # greedy generation: identical tokens (our KV-cache decoder vs transformers.generate)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    mine = generate(model, [prompt], max_new_tokens=20, temperature=0)[0]
    with torch.no_grad():
        g = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_id,
                        pad_token_id=tok.pad_id)
    theirs_ids = g[0, len(prompt):].tolist()
    if theirs_ids and theirs_ids[-1] == tok.eos_id:
        theirs_ids = theirs_ids[:-1]
    assert mine == theirs_ids and len(mine) > 0

    # the tokenizer files load in transformers and give our chat ids
    hft = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    msgs = [{"role": "user", "content": "你好 world"}]
    got = hft.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
    assert list(got) == tok.apply_chat_template(msgs, add_generation_prompt=True)

    # import back: same weights, same logits
    back, btok = import_hf(out)
    assert btok is not None and btok.vocab_size == tok.vocab_size
    sd, bsd = model.state_dict(), back.state_dict()
    assert set(sd) == set(bsd)
    for k in sd:
        torch.testing.assert_close(bsd[k], sd[k], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours, rtol=0, atol=0)


def test_export_bf16_dtype(tok, tmp_path):
    model = tiny_model(tok.vocab_size, seed=2)
    export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(hf.model.embed_tokens.weight.float(), model.embed.weight.detach().bfloat16().float())


def test_lora_merge_from_peft_adapter(tok, tmp_path):
    """A PEFT-format adapter folds into the exported weights: W + (alpha / r) B A."""
    from safetensors.torch import save_file

    model = tiny_model(tok.vocab_size, seed=3)
    r, alpha = 4, 8
    g = torch.Generator().manual_seed(0)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    tensors, expect = {}, {}
    for i in range(model.cfg.n_layers):
        for ours, (parent, theirs) in {"wq": ("self_attn", "q_proj"), "w_down": ("mlp", "down_proj")}.items():
            lin = getattr(model.layers[i].attn if ours == "wq" else model.layers[i].mlp, ours)
            A = torch.randn(r, lin.in_features, generator=g) * 0.1
            B = torch.randn(lin.out_features, r, generator=g) * 0.1
            key = f"base_model.model.model.layers.{i}.{parent}.{theirs}"
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = A, B
            expect[(i, ours)] = lin.weight.detach() + (alpha / r) * B @ A
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False, "target_modules": ["q_proj", "down_proj"]}))
    out = export_hf(model, tmp_path / "hf", lora_dir=adapter)
    assert json.loads((out / "llmcore_export.json").read_text())["lora_merged"] is True
    back, _ = import_hf(out)
    for (i, ours), w in expect.items():
        got = back.layers[i].attn.wq.weight if ours == "wq" else back.layers[i].mlp.w_down.weight
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)
    # and the merged HF model equals our model with the merged weights
    with torch.no_grad():
        for (i, ours), w in expect.items():
            (model.layers[i].attn.wq if ours == "wq" else model.layers[i].mlp.w_down).weight.copy_(w)
    ids = torch.randint(3, tok.vocab_size, (1, 16), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(_load(out)(ids).logits, model(ids), rtol=0, atol=ATOL)


def test_lora_layers_in_model_are_merged(tok, tmp_path):
    """A model carrying LoRA layers (anything with base_layer + merged_linear()) exports merged."""
    import torch.nn as nn

    class FakeLoRA(nn.Module):
        def __init__(self, base, delta):
            super().__init__()
            self.base_layer, self.delta = base, delta
            self.lora_A = nn.Linear(base.in_features, 2, bias=False)
            self.lora_B = nn.Linear(2, base.out_features, bias=False)

        def merged_linear(self):
            lin = nn.Linear(self.base_layer.in_features, self.base_layer.out_features, bias=False)
            lin.weight.data = self.base_layer.weight.data + self.delta
            return lin

    model = tiny_model(tok.vocab_size, seed=4)
    base = model.layers[0].attn.wv
    delta = torch.full_like(base.weight, 0.01)
    want = base.weight.detach() + delta
    model.layers[0].attn.wv = FakeLoRA(base, delta)
    out = export_hf(model, tmp_path / "hf")
    torch.testing.assert_close(_load(out).model.layers[0].self_attn.v_proj.weight, want, rtol=0, atol=0)


def test_export_rejects_unrepresentable(tok, tmp_path):
    model = tiny_model(tok.vocab_size, n_experts=4, top_k=2, moe_score="sigmoid")
    with pytest.raises(ValueError, match="softmax"):
        export_hf(model, tmp_path / "x")
