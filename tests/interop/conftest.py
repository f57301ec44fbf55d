"""Fixtures for the interop tests: a small tokenizer trained on the bundled corpus and tiny models."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from llmcore.data.corpus import write_default_corpus

    return write_default_corpus(tmp_path_factory.mktemp("corpus"), seed=0, size="tiny")


@pytest.fixture(scope="session")
def tok_dir(corpus, tmp_path_factory):
    from llmcore.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus["pretrain"], corpus["sft"]], vocab_size=1000, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    from llmcore.data.tokenizer import Tokenizer

    return Tokenizer.load(tok_dir)


def tiny_model(vocab, seed=0, **over):
    from llmcore.model import build_model, get_config

    torch.manual_seed(seed)
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, max_seq_len=128)
    kw.update(over)
    return build_model(get_config("tiny", **kw)).eval()
