"""Fixtures shared by the data tests: the tiny default corpus and a tokenizer trained on it."""
import pytest

from llmcore.data.corpus import write_default_corpus
from llmcore.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return write_default_corpus(tmp_path_factory.mktemp("corpus"), seed=0, size="tiny")


@pytest.fixture(scope="session")
def tok_dir(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([tiny_corpus["pretrain"], tiny_corpus["sft"], tiny_corpus["reason"]], vocab_size=6400, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    from llmcore.data.tokenizer import Tokenizer

    return Tokenizer.load(tok_dir)
