"""The embedded default corpus: a small, deterministic, bilingual (English + Chinese) world.

`write_default_corpus(out_dir, seed, size)` generates, with no download and in pure Python, a
corpus in minimind's jsonl formats about an invented world, designed so a tiny model trained for a
few CPU minutes measurably learns it:

- **World**: invented countries, cities, people and pets, a handful of attributes with short
  one-word answers: a country's capital, a city's country, a person's home town / favourite food /
  favourite colour / age / job, a pet's species / colour / owner ("small": 4 countries, 8 cities,
  20 people, 8 pets = 136 facts). Names are written the same (Latin) way in both languages by
  default, so a fact is one association whatever the language ("Kalomi的家乡是Vosuri。");
  size "large" gives the Chinese text transliterated names instead (卡洛米). Plus an arithmetic
  table: a + b and a - b for a <= 19, b <= 9 (b <= a), Arabic digits in both languages;
  single-step questions use single-digit operands.
- **pretrain.jsonl** `{"text"}`: every fact stated many times, in varied English and Chinese
  sentence templates, in entity profiles, mixed fact lists, short stories and first-person
  dialogues; arithmetic lists and worked chains. Documents are short (< ~200 tokens).
- **sft.jsonl** `{"conversations": [{role, content}]}`: questions about facts and arithmetic with
  short answers (the bare value: "Velora", "红色", "17"), some multi-turn, some with a system
  prompt, plus a little small talk.
- **dpo.jsonl** `{"chosen": [...], "rejected": [...]}`: the same prompt answered right (chosen)
  and wrong (rejected: another value of the same attribute, or an off-by-a-little sum).
- **reason.jsonl**: SFT format whose assistant replies are
  `<think>steps</think><answer>value</answer>`: multi-step additions and two-hop fact lookups.
- **eval.jsonl** `{"question", "answer", "kind": "fact"|"arith", "lang": "en"|"zh", "split"}`
  (plus "relation" and "subject" for facts, "expr" such as "7 + 5" for arithmetic):
  held-out questions. No eval question text occurs in sft/dpo/reason (nor in pretrain), while every
  fact it asks about is stated in pretrain. Two splits: "unseen_template" (a fact also asked in SFT,
  here phrased with a question template SFT never uses) and "unseen_fact" (a fact SFT never asks
  about at all, phrased with an SFT template: knowledge must come from pretraining).
- **eval_dpo.jsonl**: held-out preference pairs (on the held-out facts), same format as dpo.
- **facts.jsonl** `{"kind", "relation", "subject", "answer", "lang", "split": "train"|"unseen_fact"}`:
  every fact and single-step arithmetic item with whether SFT asks about it (for the baselines of
  `baselines.py`: the relation-prior guess).
- **eval_reason.jsonl**: held-out reasoning questions (entities / number triples that reason.jsonl
  never uses) with answers, format of eval.jsonl plus "reasoning" (the reference trace).

Sizes: "tiny" (tests, well under a second), "micro" (an 18-entity world, 58 facts, with
~0.5 M tokens of pretraining: each fact seen ~2.5x more often than in "small", for the
shortest CPU runs), "small" (the CPU default: ~0.8 M tokens of
pretraining, generated in about a second) and "large" (a 4x bigger world, ~20x more text, for a
GPU run). Same (seed, size) -> same bytes.

Modules: `templates` (vocabulary, statement and question templates), `world` (sizes, entities,
facts), `generators` (documents, conversations, the files), `scoring` (`score_answer`, the strict
exact-match rule for the eval files), `baselines` (the relation-prior guess).
"""
from llmcore.data.corpus.baselines import (  # noqa: F401
    format_split_table, prior_accuracy, relation_prior, split_accuracy,
)
from llmcore.data.corpus.generators import CORPUS_VERSION, generate_default_corpus, write_default_corpus  # noqa: F401
from llmcore.data.corpus.scoring import (  # noqa: F401
    ANSWER_SEPARATORS, first_answer_span, normalize_answer, score_answer,
)
from llmcore.data.corpus.templates import (  # noqa: F401
    ADD_ASK_EN, ADD_ASK_ZH, ADD_MAX_A, ADD_MAX_B, ARITH_STATE_EN, ARITH_STATE_ZH, COLORS, FOODS, JOBS, QA_MAX,
    RELATIONS, SMALL_TALK, SPECIES, SUB_ASK_EN, SUB_ASK_ZH, SUB_MAX_A, SUB_MAX_B, SUB_STATE_EN, SUB_STATE_ZH,
    SYSTEM_PROMPTS, Relation,
)
from llmcore.data.corpus.world import SIZES, CorpusSize, Entity, Fact, World, build_world  # noqa: F401
