"""A user's own model: a tiny random Qwen3 with its own tokenizer (special tokens at ids of its own,
its own ChatML-style template) is imported, fine-tuned by scripts/sft.py and scripts/lora.py with
that tokenizer and template, and exported back to a directory transformers loads with our logits."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FACTS = [("What is the capital of Velora?", "Kalomi"), ("What colour is the sky?", "blue"),
         ("How many legs has a cat?", "four"), ("Who wrote the letter?", "Marta")]


def _main(script):
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return runpy.run_path(str(ROOT / "scripts" / f"{script}.py"))["main"]


def _foreign_tokenizer(corpus):
    """A BPE whose special tokens sit at the END of the vocabulary (not llmcore's 0/1/2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    t.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("own_model")
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in FACTS] * 8
    (d / "sft.jsonl").write_text("".join(json.dumps({"conversations": c}) + "\n" for c in convs))
    tok = _foreign_tokenizer([m["content"] for c in convs for m in c] * 4)
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                   tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   bos_token_id=None)
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(str(d / "hf"))
    tok.save_pretrained(str(d / "hf"))
    _main("export_hf")(["--import", str(d / "hf"), str(d / "ck")])
    return d, tok


def test_imported_tokenizer_is_the_models_own(imported):
    from llmcore.data.hf_tokenizer import HFTokenizer
    from llmcore.data.prep import encode_conversation
    from llmcore.export.loading import load_model_and_tokenizer

    d, hf_tok = imported
    _, tok = load_model_and_tokenizer(d / "ck")
    assert isinstance(tok, HFTokenizer) and tok.eos_id == hf_tok.eos_token_id == tok.im_end_id != 2
    msgs = [{"role": "user", "content": FACTS[0][0]}, {"role": "assistant", "content": FACTS[0][1]}]
    want = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert tok.apply_chat_template(msgs) == list(want)
    ids, mask = encode_conversation(tok, msgs)
    assert tok.decode(ids[mask.astype(bool)]) == FACTS[0][1] + "<|im_end|>"


def _first_last_loss(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    return losses[0], losses[-1]


def test_sft_and_lora_train_it_and_export_back(imported, tmp_path):
    from llmcore.export.loading import load_model_and_tokenizer

    d, _ = imported
    common = ["--dtype", "fp32", "--no-progress", "--batch-size", "4", "--log-every", "1"]
    _main("sft")(["--init", str(d / "ck"), "--data", str(d / "sft.jsonl"), "--out", str(tmp_path / "sft"),
                  "--work", str(tmp_path / "work"), "--steps", "12", "--seq-len", "48", "--lr", "3e-3", "--warmup", "0",
                  *common])
    first, last = _first_last_loss(tmp_path / "sft")
    assert last < 0.7 * first, (first, last)
    _main("lora")(["--init", str(tmp_path / "sft"), "--data", str(d / "sft.jsonl"), "--out", str(tmp_path / "lora"),
                   "--steps", "12", "--lr", "1e-2", "--merge", "--max-len", "48", *common])
    first, last = _first_last_loss(tmp_path / "lora")
    assert last < first, (first, last)
    out = _main("export_hf")([str(tmp_path / "lora" / "merged"), str(tmp_path / "hf_out")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours, tok = load_model_and_tokenizer(tmp_path / "lora" / "merged")
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert hf.generation_config.eos_token_id == tok.eos_id
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": FACTS[1][0]}], True)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
    back = transformers.AutoTokenizer.from_pretrained(str(out))
    assert back.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tok.render_chat([{"role": "user", "content": "hi"}])
