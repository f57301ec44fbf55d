"""llmcore.hf.apply_kernels on tiny random transformers models built from configs (CPU, no downloads):
patched vs unpatched logits, loss and parameter gradients per family, with right / left padding and
packed position_ids; bf16 under the one tolerance rule; cached decoding; TRL SFTTrainer; PEFT LoRA;
refusal of other families; the loss function against transformers' ForCausalLMLoss."""
import copy

import pytest
import torch
import transformers

import llmcore.hf as lh
import llmcore.hf.patch  # noqa: F401  (PATCHES)
from llmcore.hf.loss import _loss
from tests.conftest import assert_close

V = 97
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
MOE = dict(num_experts_per_tok=2)
CONFIGS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": None}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 16}),
    "MixtralForCausalLM": ("MixtralConfig", {"num_local_experts": 4, "sliding_window": None, **MOE}),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", {"num_experts": 4, "moe_intermediate_size": 32,
                                               "shared_expert_intermediate_size": 48, **MOE}),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16,
                                               "norm_topk_prob": True, **MOE}),
}


def build(name, seed=0, **over):
    cfg_name, extra = CONFIGS[name]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, name)(cfg)
    with torch.no_grad():  # RMSNorm weights start at 1: make them random so the patch is seen
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def pair(name, **over):
    ref = build(name, **over)
    pat = lh.apply_kernels(copy.deepcopy(ref))
    return ref, pat


def batch(seed=1, B=3, S=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:] = 0   # right padding
    mask[2, :4] = 0   # left padding
    labels = ids.masked_fill(mask == 0, -100)
    pos_left = (mask.cumsum(-1) - 1).clamp(min=0)
    packed = torch.cat([torch.arange(4), torch.arange(5), torch.arange(2)])[None].expand(B, S)
    return ids, mask, labels, pos_left, packed


def run(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def check_grads(ga, gb, atol=2e-5):
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=atol, rtol=1e-4, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_family_fp32_logits_loss_grads(name):
    ref, pat = pair(name)
    tags = set().union(*(m.__dict__.get("_llmcore_patched", set()) for m in pat.modules()))
    want = {"rms_norm", "rope", "fused_linear_cross_entropy"} | ({"moe"} if "Moe" in name or "Mixtral" in name else set())
    if name not in ("MixtralForCausalLM", "Qwen3MoeForCausalLM"):  # these two have no dense MLP here
        want.add("swiglu")
    assert tags == want, tags
    ids, mask, labels, pos_left, packed = batch()
    valid = mask.bool()[..., None]
    with torch.no_grad():  # logits without labels (the model still returns them), padding masks
        torch.testing.assert_close(pat(ids).logits, ref(ids).logits, atol=2e-5, rtol=1e-4)
        a = ref(ids, attention_mask=mask, position_ids=pos_left).logits
        b = pat(ids, attention_mask=mask, position_ids=pos_left).logits
        torch.testing.assert_close(b * valid, a * valid, atol=2e-5, rtol=1e-4)
        a = ref(ids, position_ids=packed, use_cache=False).logits  # packed documents (no cache: HF's rule)
        b = pat(ids, position_ids=packed, use_cache=False).logits
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    ref.train(), pat.train()
    for kw in (dict(input_ids=ids, labels=ids), dict(input_ids=ids, attention_mask=mask, labels=labels),
               dict(input_ids=ids, position_ids=packed, use_cache=False, labels=ids)):
        la, ga = run(ref, **kw)
        lb, gb = run(pat, **kw)
        torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
        check_grads(ga, gb)


@pytest.mark.parametrize("name", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_bf16_within_tolerance(name):
    ref32, _ = pair(name)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    pat16 = lh.apply_kernels(copy.deepcopy(ref16))
    ids, mask, *_ = batch()
    valid = mask.bool()[..., None]
    with torch.no_grad():
        r = ref32(ids, attention_mask=mask).logits * valid
        base = ref16(ids, attention_mask=mask).logits * valid  # bf16, as the rule wants
        got = pat16(ids, attention_mask=mask).logits * valid
    assert_close(got, r, baseline=base, name="bf16 logits")


def test_cached_greedy_decoding_with_left_padding_matches():
    ref, pat = pair("Qwen3ForCausalLM")
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = ref.generate(ids, **kw)
        b = pat.generate(ids, **kw)
        sa = ref(a, attention_mask=torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)).logits
        sb = pat(a, attention_mask=torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)).logits
    assert torch.equal(a, b)
    torch.testing.assert_close(sb[:, -5:], sa[:, -5:], atol=2e-5, rtol=1e-4)


def test_idempotent_and_what_is_patched():
    ref, pat = pair("Qwen3ForCausalLM")
    lh.apply_kernels(pat)
    assert pat.config._attn_implementation == "llmcore" and ref.config._attn_implementation == "sdpa"
    layer = pat.model.layers[0]
    assert layer.self_attn.q_norm._llmcore_patched == {"rms_norm"}
    assert layer.mlp._llmcore_patched == {"swiglu"} and layer.self_attn._llmcore_patched == {"rope"}
    assert not hasattr(ref.model.layers[0].mlp, "_llmcore_patched")  # the unpatched copy is untouched
    ids = batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(pat(ids).logits, ref(ids).logits, atol=2e-5, rtol=1e-4)


def test_refuses_unsupported_family():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported; supported: LlamaForCausalLM"):
        lh.apply_kernels(model)


def test_loss_matches_transformers_for_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss
    torch.manual_seed(0)
    head = torch.nn.Linear(16, V, bias=False)
    hidden = torch.randn(2, 7, 16)
    labels = torch.randint(0, V, (2, 7))
    labels[0, :3] = -100
    for n in (None, torch.tensor(5)):
        want = ForCausalLMLoss(head(hidden), labels, V, num_items_in_batch=n)
        got, logits = _loss(hidden, head, labels, num_items_in_batch=n)
        torch.testing.assert_close(got, want)
    shift = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(_loss(hidden, head, labels, shift_labels=shift)[0],
                               ForCausalLMLoss(head(hidden), labels, V, shift_labels=shift))


def test_fused_op_path_is_used_when_present(monkeypatch):
    """Wiring of the fused path: with an fp32 stand-in for llmcore.ops.fused_linear_cross_entropy
    (F.cross_entropy of h @ W.T, the op's reference) the patched model calls it, returns no logits,
    and matches the unpatched loss and gradients."""
    import llmcore.ops
    calls = []

    def fused(h, w, y, bias=None, ignore_index=-100, reduction="mean"):
        calls.append(tuple(h.shape))
        logits = h.float() @ w.float().T + (0 if bias is None else bias.float())
        return torch.nn.functional.cross_entropy(logits, y, ignore_index=ignore_index, reduction=reduction)

    monkeypatch.setattr(llmcore.ops, "fused_linear_cross_entropy", fused, raising=False)
    ref, pat = pair("Qwen2ForCausalLM")
    ids, mask, labels, *_ = batch()
    la, ga = run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    out = pat(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and calls == [(ids.numel(), 64)]
    lb, gb = run(pat, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(lb, la)
    check_grads(ga, gb)


def test_from_pretrained_loads_safetensors_and_patches(tmp_path):
    ref = build("LlamaForCausalLM")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    pat = lh.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="sdpa")
    assert pat.config._attn_implementation == "llmcore"
    ids = batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(pat(ids).logits, ref(ids).logits, atol=2e-5, rtol=1e-4)


def test_peft_lora_on_patched_model():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"],
                          lora_dropout=0.0, init_lora_weights=False)
    ref, pat = pair("Qwen2ForCausalLM")
    torch.manual_seed(3)
    ref = peft.get_peft_model(ref, cfg)
    torch.manual_seed(3)
    pat = peft.get_peft_model(pat, cfg)
    lh.apply_kernels(pat)  # again on the PEFT wrapper: finds the model inside, a no-op here
    ids, mask, labels, *_ = batch()
    la, ga = run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    lb, gb = run(pat, input_ids=ids, attention_mask=mask, labels=labels)
    assert ga and all("lora_" in n for n in ga)  # only the adapters train, and they get gradients
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    check_grads(ga, gb)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_trl_sft_trainer_three_steps_match(tmp_path, bf16):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V - 2)} | {"<pad>": V - 2, "<eos>": V - 1}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(1, V - 2, (int(n),), generator=g))
             for n in torch.randint(4, 12, (12,), generator=g)]
    ds = datasets.Dataset.from_list([{"text": t} for t in texts])

    def train(model):
        args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                             dataloader_num_workers=0, max_length=32, disable_tqdm=True, bf16=bf16)
        tr = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        tr.train()
        return [h["loss"] for h in tr.state.log_history if "loss" in h]

    ref, pat = pair("Qwen2ForCausalLM")
    a, b = train(ref), train(pat)
    assert len(a) == 3 and len(b) == 3
    # TRL 1.16 wraps the forward with its own chunked LM head over our (patched) backbone. fp32: the
    # first step (identical weights) agrees to float rounding. SFTConfig's default is bf16 autocast on
    # CPU: there both runs round differently in bf16 (measured ~4e-5 relative at step 1); Adam amplifies.
    first, rest = (1e-4, 5e-4) if bf16 else (1e-6, 1e-5)
    assert abs(b[0] - a[0]) <= first * abs(a[0]), (a, b)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=0, rtol=rest)


@pytest.mark.parametrize("flag", ["rms_norm", "rope", "swiglu", "attention", "fused_linear_cross_entropy", "moe"])
def test_each_patch_alone(flag):
    """Each flag on its own (e.g. our attention behind transformers' own rotation) keeps the model exact."""
    ref = build("Qwen3MoeForCausalLM", mlp_only_layers=[0])
    pat = lh.apply_kernels(copy.deepcopy(ref), **{f: f == flag for f in lh.patch.PATCHES})
    ids, mask, labels, pos_left, packed = batch()
    valid = mask.bool()[..., None]
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, position_ids=pos_left).logits
        b = pat(ids, attention_mask=mask, position_ids=pos_left).logits
        torch.testing.assert_close(b * valid, a * valid, atol=2e-5, rtol=1e-4)
        a = ref(ids, position_ids=packed, use_cache=False).logits
        b = pat(ids, position_ids=packed, use_cache=False).logits
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    la, ga = run(ref, input_ids=ids, attention_mask=mask, labels=labels)
    lb, gb = run(pat, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    check_grads(ga, gb)


def test_gradient_checkpointing():
    ref, pat = pair("Qwen2ForCausalLM")
    for m in (ref, pat):
        m.gradient_checkpointing_enable()
        m.train()
    ids, mask, labels, *_ = batch()
    la, ga = run(ref, input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    lb, gb = run(pat, input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    check_grads(ga, gb)


def test_fallbacks_custom_4d_mask_and_short_sliding_window():
    """What our kernel cannot express goes to transformers' sdpa and stays exact: a caller's 4D mask,
    a sliding window shorter than the sequence (Mistral window 4 over 11 tokens), padded or not."""
    ref, pat = pair("Qwen2ForCausalLM")
    ids, mask, *_ = batch()
    g = torch.Generator().manual_seed(7)
    m4 = (torch.rand(3, 1, 11, 11, generator=g) < 0.6) | torch.eye(11, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(pat(ids, attention_mask=m4).logits, ref(ids, attention_mask=m4).logits,
                                   atol=2e-5, rtol=1e-4)
    ref, pat = pair("MistralForCausalLM", sliding_window=4)
    valid = mask.bool()[..., None]
    with torch.no_grad():
        torch.testing.assert_close(pat(ids).logits, ref(ids).logits, atol=2e-5, rtol=1e-4)
        a, b = ref(ids, attention_mask=mask).logits, pat(ids, attention_mask=mask).logits
        torch.testing.assert_close(b * valid, a * valid, atol=2e-5, rtol=1e-4)
