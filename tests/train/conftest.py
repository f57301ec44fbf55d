"""One tiny SFT model shared by the stage tests (session scope): the bundled corpus (size "small"),
a 1024-token BPE tokenizer, and a 2-layer dim-128 model trained with SFT from scratch on the bundled
conversations (no pretraining: the stage tests need a model that chats in ChatML, not one that knows
the world). """
import copy

import pytest
import torch

SFT_STEPS = 200
SEQ = 64


def tiny_config(vocab_size, **kw):
    from llmcore.model import get_config

    # backend "torch": these tests are about the stages, not the kernels (tested in tests/ops), and the
    # plain-PyTorch path is the fastest on CPU while some ops still run as pure-PyTorch stand-ins
    return get_config("tiny", **{**dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                        max_seq_len=256, backend="torch"), **kw})


def quick_cfg(out_dir, steps, lr, batch_size=16, **kw):
    from llmcore.train.loop import TrainConfig

    return TrainConfig(out_dir=str(out_dir), max_steps=steps, batch_size=batch_size, lr=lr,
                       warmup_steps=min(20, steps // 10), dtype="fp32", progress=False, tensorboard=False,
                       plot=False, log_every=max(1, steps // 5), **kw)


@pytest.fixture(scope="session")
def bundled(tmp_path_factory):
    from llmcore.data.corpus import write_default_corpus
    from llmcore.data.tokenizer import train_tokenizer

    work = tmp_path_factory.mktemp("pipeline2")
    corpus = write_default_corpus(work / "corpus", seed=0, size="small")
    tok = train_tokenizer([corpus["pretrain"], corpus["sft"], corpus["reason"]], 1024, work / "tokenizer")
    return {"work": work, "corpus": corpus, "tok": tok}


@pytest.fixture(scope="session")
def sft_model(bundled):
    """(model, seconds) — a frozen-in-time SFT model; tests take copy.deepcopy of it."""
    from llmcore.model import build_model
    from llmcore.train.chatdata import ChatDataset, pad_collate
    from llmcore.train.loop import train

    torch.manual_seed(0)
    model = build_model(tiny_config(bundled["tok"].vocab_size))
    ds = ChatDataset(bundled["corpus"]["sft"], bundled["tok"], SEQ)
    hist = train(model, ds, quick_cfg(bundled["work"] / "sft", SFT_STEPS, 2e-3), collate=pad_collate)
    model.eval()
    return model, hist


@pytest.fixture
def sft_copy(sft_model):
    return copy.deepcopy(sft_model[0])
