"""Load a model + tokenizer from whatever path a user gives a CLI: an llmcore checkpoint directory
(meta.json + model.safetensors), a training output directory (its latest checkpoint), or a
transformers directory written by `export_hf` (config.json)."""
from __future__ import annotations

from pathlib import Path


def find_tokenizer(path: Path):
    """The llmcore Tokenizer in `path`, its parents (up to 2 levels) or the meta's tokenizer entry."""
    import json

    from llmcore.data.tokenizer import Tokenizer

    cands = [path, path.parent, path.parent.parent]
    meta = path / "meta.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        for k in ("tokenizer_dir", "tokenizer"):
            if isinstance(m.get(k), str):
                cands.insert(0, Path(m[k]))
    for c in cands:
        for d in (c, c / "tokenizer"):
            if (d / "tokenizer.json").exists():
                return Tokenizer.load(d)
    return None


def load_model_and_tokenizer(path, tokenizer=None, backend: str | None = None, device: str = "cpu"):
    """(model in eval mode, Tokenizer or None)."""
    from llmcore.data.tokenizer import Tokenizer

    path = Path(path)
    if (path / "config.json").exists() and not (path / "meta.json").exists():
        from llmcore.export.hf import import_hf

        model, tok = import_hf(path, backend=backend)
        model = model.to(device)
    else:
        from llmcore.train.checkpoint import load_model, resolve_checkpoint

        ckpt = resolve_checkpoint(path)  # FileNotFoundError saying what was looked for
        model = load_model(ckpt, device=device, backend=backend)  # LoRA / QLoRA checkpoints: merged
        tok = find_tokenizer(Path(ckpt))
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    return model.eval(), tok
