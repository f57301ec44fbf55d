"""DPO stage end to end on the bundled preference pairs (loss formula: test_losses.py vs TRL)."""
import copy

import pytest
import torch

from llmcore.nn.lora import disable_adapters, lora_parameters
from llmcore.train.chatdata import PairDataset, pair_collate, read_jsonl
from llmcore.train.dpo import make_dpo_loss, preference_accuracy, reference_model, train_dpo
from llmcore.train.lora import prepare_lora

from .conftest import SEQ, quick_cfg

N_TRAIN, DPO_STEPS = 64, 40


def test_dpo_raises_preference_accuracy(bundled, sft_copy, tmp_path):
    tok, corpus = bundled["tok"], bundled["corpus"]
    pairs = read_jsonl(corpus["dpo"])
    train_set = PairDataset(pairs[:N_TRAIN], tok, SEQ)
    held = PairDataset(pairs[-100:], tok, SEQ)       # pairs never trained on (same fact pool)
    unseen = PairDataset(corpus["eval_dpo"], tok, SEQ)  # held-out facts
    sft_train, _ = preference_accuracy(sft_copy, train_set)
    sft_held, _ = preference_accuracy(sft_copy, held)
    sft_unseen, _ = preference_accuracy(sft_copy, unseen)
    hist = train_dpo(sft_copy, train_set, quick_cfg(tmp_path, DPO_STEPS, 5e-4, batch_size=8), beta=0.1)
    acc_train, _ = preference_accuracy(sft_copy, train_set)
    acc_held, _ = preference_accuracy(sft_copy, held)
    acc_unseen, _ = preference_accuracy(sft_copy, unseen)
    print(f"\npreference accuracy SFT -> DPO: trained pairs {sft_train:.3f} -> {acc_train:.3f}, "
          f"held-out pairs {sft_held:.3f} -> {acc_held:.3f}, eval_dpo (unseen facts) {sft_unseen:.3f} -> {acc_unseen:.3f}; "
          f"{hist['seconds']:.1f}s")
    # measured (2-layer dim-128 SFT model, 40 steps x 8 pairs): loss 0.693 -> 0.578, trained pairs
    # 0.484 -> 0.812, held-out pairs 0.660 -> 0.600, eval_dpo 0.550 -> 0.400. A model this small has not
    # learned the facts, so the preference does not transfer to held-out pairs at CI scale; the held-out
    # bound below only guards against collapse. See bench/RESULTS.md for the quick-start (pretrained) figure.
    # With data's denser world (666da9d): trained 0.656 -> 0.844, held-out 0.590 -> 0.520, eval_dpo 0.430 -> 0.440.
    assert hist["losses"][-1][1] < 0.65
    assert acc_train >= sft_train + 0.12 and acc_train >= 0.7
    assert acc_held >= sft_held - 0.15


def test_dpo_reference_is_frozen_copy_or_disabled_adapters(bundled, sft_copy):
    tok = bundled["tok"]
    b = pair_collate([PairDataset(read_jsonl(bundled["corpus"]["dpo"])[:4], tok, SEQ)[i] for i in range(4)])
    ref = reference_model(sft_copy)
    assert ref is not sft_copy and not any(p.requires_grad for p in ref.parameters())
    loss, m = make_dpo_loss(ref, 0.1)(sft_copy, b)
    assert float(loss) == pytest.approx(0.6931472, abs=1e-5) and float(m["reward_margin"]) == 0.0
    loss.backward()  # gradients flow to the policy only
    assert any(p.grad is not None for p in sft_copy.parameters())
    assert all(p.grad is None for p in ref.parameters())
    # under LoRA the reference is the adapters-off model, and only adapters train
    lora = prepare_lora(copy.deepcopy(ref), r=4, alpha=8)
    assert reference_model(lora) is None
    with torch.no_grad():
        for p in lora_parameters(lora):
            p.add_(torch.randn_like(p) * 0.05)
    loss, m = make_dpo_loss(None, 0.1)(lora, b)
    assert float(m["reward_margin"]) != 0.0
    loss.backward()
    assert all(p.grad is not None for p in lora_parameters(lora))
    with disable_adapters(lora), torch.no_grad():
        torch.testing.assert_close(lora(b["input_ids"]), ref(b["input_ids"]))


def test_sft_weight_adds_the_chosen_token_nll():
    """make_dpo_loss(sft_weight=w) = DPO loss + w * (summed chosen completion NLL / chosen tokens),
    checked against an independent computation on a tiny model; negative weights are refused."""
    import torch.nn.functional as F

    from llmcore.model import Transformer, get_config
    from llmcore.train.losses import dpo_loss, sequence_logps

    torch.manual_seed(0)
    m = Transformer(get_config("tiny", dim=64, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=64, max_seq_len=16,
                               backend="torch"))
    ref = copy.deepcopy(m).eval()
    ids = torch.randint(3, 64, (4, 12))  # rows 0-1 chosen, 2-3 rejected
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, :8] = -100  # chosen rows with different completion lengths
    batch = {"input_ids": ids, "labels": labels}
    plain, _ = make_dpo_loss(ref, 0.1)(m, batch)
    got, metrics = make_dpo_loss(ref, 0.1, sft_weight=0.5)(m, batch)
    with torch.no_grad():
        logits = m(ids)
        # labels are pre-shifted: labels[t] is the target of position t (sequence_logps' convention)
        nll = F.cross_entropy(logits[:2].flatten(0, 1).double(), labels[:2].flatten(), ignore_index=-100, reduction="sum")
        want_nll = nll / (labels[:2] != -100).sum()
    torch.testing.assert_close(got.double(), plain.double() + 0.5 * want_nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["chosen_nll"].double(), want_nll, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sft_weight"):
        make_dpo_loss(ref, 0.1, sft_weight=-1.0)
