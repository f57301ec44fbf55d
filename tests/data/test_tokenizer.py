"""Tokenizer: fixed special ids, round trips, ChatML rendering equal to transformers' jinja."""
import json

import pytest

from llmcore.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, render_chat, train_tokenizer

TEXTS = [
    "Hello, world! The capital of Kalomi is Vosuri.",
    "卡洛米的首都是沃苏里。你好，世界！",
    "12 + 7 = 19; 40 - 16 = 24",
    "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n<think>3 + 4 = 7</think><answer>7</answer><|im_end|>\n",
    "  leading and trailing spaces  \n\ttabs\n",
    "emoji 🙂 and rare 龘 and accents éü",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "洛文住在哪里？"},
     {"role": "assistant", "content": "鲁帕哈"}, {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "You are welcome!"}],
    [{"role": "user", "content": "Compute 8 + 17 + 13."},
     {"role": "assistant", "content": "<think>8 + 17 = 25. 25 + 13 = 38.</think><answer>38</answer>"}],
    [{"role": "user", "content": "  spaces \n\n and newlines\n"}, {"role": "assistant", "content": "\nok "}],
    [{"role": "user", "content": "emoji 🙂"}],
]


def test_special_ids_fixed(tok):
    assert SPECIAL_TOKENS == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
        assert tok.encode(t) == [i]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 0, 1, 2)
    assert (tok.im_start_id, tok.im_end_id, tok.think_start_id, tok.think_end_id) == (1, 2, 3, 4)
    assert (tok.answer_start_id, tok.answer_end_id) == (5, 6)
    assert 263 < tok.vocab_size <= 6400


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_decode_skip_special(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>a</think><answer>b</answer><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>a</think><answer>b</answer>"


def test_digits_and_cjk_split(tok):
    pieces = [tok.id_to_token(i) for i in tok.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]
    # each CJK character is its own token (all of these occur in the tiny corpus)
    assert len(tok.encode("的首都是")) == 4


def test_special_tokens_atomic_inside_words(tok):
    ids = tok.encode("x<think>y</think>z")
    assert tok.think_start_id in ids and tok.think_end_id in ids
    assert tok.decode(ids) == "x<think>y</think>z"


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).exists()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == cfg["unk_token"] == "<|endoftext|>"
    back = Tokenizer.load(tmp_path)
    assert back.hash == tok.hash
    for t in TEXTS:
        assert back.encode(t) == tok.encode(t)


def test_train_is_deterministic(tiny_corpus, tok):
    again = train_tokenizer([tiny_corpus["pretrain"], tiny_corpus["sft"], tiny_corpus["reason"]], vocab_size=6400)
    assert again.hash == tok.hash


def test_train_rejects_tiny_vocab(tiny_corpus):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([tiny_corpus["sft"]], vocab_size=100)


def test_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_render_chat(tok, conv):
    text = render_chat(conv)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
    assert render_chat(conv, add_generation_prompt=True) == text + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(conv) == tok.encode(text)
    assert tok.decode(tok.apply_chat_template(conv)) == text


# ---- transformers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _ids(x):
    if isinstance(x, dict) or hasattr(x, "keys"):  # transformers >= 5 returns a BatchEncoding
        x = x["input_ids"]
    return list(x)


def test_transformers_loads_special_tokens(hf_tok, tok):
    assert (hf_tok.pad_token_id, hf_tok.unk_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 0, 1, 2)
    assert len(hf_tok) == tok.vocab_size
    assert hf_tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    for t in TEXTS:
        assert hf_tok.encode(t, add_special_tokens=False) == tok.encode(t)
        assert hf_tok.decode(tok.encode(t)) == tok.decode(tok.encode(t))


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(hf_tok, tok, conv, gen):
    ref_text = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert ref_text == tok.render_chat(conv, add_generation_prompt=gen)
    ref = _ids(hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen))
    assert ref == tok.apply_chat_template(conv, add_generation_prompt=gen)
