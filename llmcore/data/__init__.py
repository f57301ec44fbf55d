"""llmcore.data — the data side of the pipeline (pure Python + numpy; torch only in datasets).

- `corpus`: the embedded, deterministic bilingual default corpus (`write_default_corpus`) and
  the exact-match rule for its eval files (`score_answer`).
- `tokenizer`: byte-level BPE with fixed special ids and ChatML (`train_tokenizer`, `Tokenizer`).
- `prep`: jsonl -> packed, pre-tokenized shards (`prepare_pretrain`, `prepare_sft`, `prepare_dpo`),
  and `prepare_default_data(workdir)`: corpus + tokenizer + every shard in one call (~7 s, "small").
- `datasets`: torch Datasets over those shards (imported on demand: it imports torch).
"""
from llmcore.data.corpus import score_answer, write_default_corpus  # noqa: F401
from llmcore.data.prep import prepare_default_data, prepare_dpo, prepare_pretrain, prepare_sft  # noqa: F401
from llmcore.data.tokenizer import Tokenizer, train_tokenizer  # noqa: F401
