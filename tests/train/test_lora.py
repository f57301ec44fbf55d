"""LoRA / QLoRA: PEFT's numerics and file format, against peft on the HF Llama form of our weights."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from llmcore.model import build_model, get_config
from llmcore.nn.lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, disable_adapters, load_adapter, lora_parameters,
                             lora_state_dict, merge_lora, save_adapter, to_peft_key)

CFG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64, backend="torch")


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(get_config("tiny", **{**CFG, **kw})).eval()


def to_hf(model, out_dir):
    """The HF LlamaForCausalLM export of our weights (llmcore.export.hf), loaded back by transformers."""
    from transformers import LlamaForCausalLM

    from llmcore.export.hf import export_hf

    return LlamaForCausalLM.from_pretrained(str(export_hf(model, out_dir))).eval()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_init_is_peft_and_output_unchanged():
    model = small_model()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(ids)
    apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)  # B = 0: exactly the base
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(mods) == 7 * 2
    for m in mods:
        assert torch.all(m.lora_B.weight == 0)
        bound = 1 / m.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 3
        assert m.scaling == 2.0
    assert apply_lora(small_model(), ["wq"], r=4, alpha=8, use_rslora=True).layers[0].attn.wq.scaling == 4.0


def test_only_adapters_get_grads():
    model = small_model()
    apply_lora(model, ("wq", "wv", "w_down"), r=4, alpha=8).train()
    ids = torch.randint(0, 97, (2, 10))
    _, loss = model(ids, labels=ids)
    loss.backward()
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
    assert {n.split(".")[-1] for n, _ in model.named_modules() if isinstance(_, LoRALinear)} == {"wq", "wv", "w_down"}
    # B = 0 at init: A gets no gradient at the first step, B does
    assert all(float(m.lora_B.weight.grad.abs().sum()) > 0 for m in model.modules() if isinstance(m, LoRALinear))
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(small_model(), ["q_proj"])


def test_disable_adapters_gives_base():
    model = small_model()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        ref = model(ids)
        apply_lora(model, r=4, alpha=8)
        randomize_adapters(model)
        assert not torch.allclose(model(ids), ref)
        with disable_adapters(model):
            torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)
        assert not torch.allclose(model(ids), ref)


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_on_hf_export(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    model = small_model()
    hf = to_hf(model, tmp_path / "hf")
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)  # the base mapping holds
    apply_lora(model, r=4, alpha=12, use_rslora=rslora)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12 and cfg["use_rslora"] == rslora
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    assert to_peft_key("layers.1.mlp.w_up.lora_B.weight") == "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"

    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    # every adapter tensor landed where PEFT expects it
    psd = peft.get_peft_model_state_dict(pm)
    ours = {to_peft_key(k): v for k, v in lora_state_dict(model).items()}
    assert set(psd) == set(ours)
    for k in ours:
        torch.testing.assert_close(psd[k], ours[k], rtol=0, atol=0)
    with torch.no_grad():
        out_ours, out_peft = model(ids), pm(ids).logits
        torch.testing.assert_close(out_ours, out_peft, rtol=1e-4, atol=1e-4)
        with disable_adapters(model), pm.disable_adapter():
            torch.testing.assert_close(model(ids), pm(ids).logits, rtol=1e-4, atol=1e-4)
    # merged weights equal PEFT's merge_and_unload, and the merged models agree
    merged_hf = pm.merge_and_unload()
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    for i, layer in enumerate(model.layers):
        torch.testing.assert_close(layer.attn.wq.weight, merged_hf.model.layers[i].self_attn.q_proj.weight)
        torch.testing.assert_close(layer.mlp.w_down.weight, merged_hf.model.layers[i].mlp.down_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), out_ours, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged_hf(ids).logits, out_peft, rtol=1e-4, atol=1e-4)


def test_save_load_roundtrip(tmp_path):
    model = small_model()
    apply_lora(model, ("wq", "wk", "w_gate"), r=2, alpha=4, dropout=0.1)
    randomize_adapters(model)
    model.eval()
    save_adapter(model, tmp_path / "a")
    other = load_adapter(small_model(), tmp_path / "a").eval()
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)
    assert set(lora_state_dict(other)) == set(lora_state_dict(model))


# ---- QLoRA -------------------------------------------------------------------------------------

def _dequantized_twin(qmodel, like):
    """`like` with every NF4Linear's dequantized fp32 weight copied into the matching nn.Linear."""
    from llmcore.nn import NF4Linear

    twin = copy.deepcopy(like)
    mods = dict(twin.named_modules())
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, NF4Linear):
                mods[name.replace(".base_layer", "")].weight.copy_(m.weight_dequantized(torch.float32))
    return twin


def test_qlora_forward_within_nf4_tolerance():
    from llmcore.nn import NF4Linear
    from llmcore.train.lora import quantize_linears

    model = small_model()
    q = quantize_linears(copy.deepcopy(model), compute_dtype=torch.float32)
    assert sum(isinstance(m, NF4Linear) for m in q.modules()) == 14
    assert all(not p.requires_grad for m in q.modules() if isinstance(m, NF4Linear) for p in m.parameters())
    twin = _dequantized_twin(q, model)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref, out, full = twin(ids), q(ids), model(ids)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # NF4Linear == its dequantized weight
        # and within NF4's quantization error of the unquantized model (measured ~0.05 relative)
        rel = float((out - full).norm() / full.norm())
        assert rel < 0.15, rel
        # with adapters (bf16 compute, fp32 adapters): the dequantized-twin + LoRA model, at bf16 tolerance
        qb = quantize_linears(copy.deepcopy(model), compute_dtype=torch.bfloat16)
        apply_lora(qb, r=4, alpha=8)
        randomize_adapters(qb)
        tw = apply_lora(_dequantized_twin(qb, model), r=4, alpha=8)
        tw_mods = dict(tw.named_modules())
        for name, m in qb.named_modules():
            if isinstance(m, LoRALinear):
                tw_mods[name].lora_A.weight.copy_(m.lora_A.weight)
                tw_mods[name].lora_B.weight.copy_(m.lora_B.weight)
        a, b = qb(ids).float(), tw(ids)
        assert float((a - b).norm() / b.norm()) < 0.03


def test_qlora_trains_on_cpu(tmp_path):
    from llmcore.nn import NF4Linear
    from llmcore.train.loop import TrainConfig
    from llmcore.train.lora import prepare_lora, train_lora

    model = prepare_lora(small_model(), r=8, alpha=16, qlora=True)
    data0 = {n: b.clone() for n, b in model.named_buffers() if "weight_data" in n}
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 60, (16,), generator=g).tolist()
    seqs = [torch.arange(a, a + 24) % 60 + 3 for a in starts]  # learnable: count up
    ds = [{"input_ids": s[:-1], "labels": s[1:]} for s in seqs]
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=30, batch_size=4, lr=1e-2, warmup_steps=0, dtype="bf16",
                      progress=False, tensorboard=False, plot=False, log_every=10)
    hist = train_lora(model, ds, cfg)
    first, last = hist["losses"][0][1], hist["losses"][-1][1]
    assert last < 0.9 * first, (first, last)  # measured 4.59 -> 3.61 (0.79)
    assert all(torch.equal(b, data0[n]) for n, b in model.named_buffers() if n in data0)  # base untouched
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
