"""The invented world of the default corpus: sizes, entities (countries, cities, people, pets), their
facts (relation, subject, value in English and Chinese), and the arithmetic tables."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from llmcore.data.corpus.templates import (
    ADD_MAX_A, ADD_MAX_B, COLORS, FOODS, JOBS, QA_MAX, SPECIES, SUB_MAX_A, SUB_MAX_B, _SYLLABLES,
)

# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSize:
    countries: int
    cities: int
    people: int
    pets: int
    pretrain_docs: int
    sft_convs: int
    dpo_pairs: int
    reason_convs: int
    eval_facts: int  # eval fact questions (both splits, both languages)
    eval_arith: int
    eval_dpo: int
    eval_reason: int
    unseen_fact_frac: float = 0.15
    unseen_arith_frac: float = 0.15
    zh_names: bool = False  # True: Chinese text uses transliterated names (卡洛米); False: the Latin ones
    # Pretraining mix: relative weights of the document kinds (generators._pretrain_docs). "qa" is a
    # question-and-answer transcript about facts and sums SFT also asks about (never a held-out one).
    mix: tuple = (("profile", 35), ("facts", 25), ("story", 10), ("dialogue", 10), ("arith", 15), ("chain", 5))
    # Extra statements of each held-out (unseen_fact) fact per language, each in a random template,
    # spread over their own short documents: a fact only pretraining teaches is seen often enough.
    unseen_repeats: int = 0
    rng_key: str = ""  # the name seeding the generator's random stream ("" = the size's own name)


SIZES = {
    "tiny": CorpusSize(3, 6, 10, 4, 300, 200, 50, 50, 40, 20, 10, 10),
    "micro": CorpusSize(2, 4, 8, 4, 12000, 4000, 1000, 1000, 80, 60, 50, 50),
    "small": CorpusSize(4, 8, 20, 8, 16000, 6000, 1500, 1500, 160, 80, 100, 100),
    # The quick start's world: fewer people and pets than "small" and a fact-heavy mix (less
    # arithmetic and story filler), so each fact is stated more often in the same pretraining budget.
    # rng_key "small": its held-out split and documents are drawn from the same random streams as
    # "small" (the measured configuration; see scripts/quickstart.py).
    "quick": CorpusSize(4, 8, 12, 6, 16000, 6000, 1500, 1500, 160, 80, 100, 100,
                        mix=(("profile", 40), ("facts", 30), ("story", 10), ("dialogue", 10), ("arith", 7), ("chain", 3)),
                        rng_key="small"),
    "large": CorpusSize(10, 40, 160, 60, 300000, 100000, 20000, 20000, 800, 400, 400, 400, zh_names=True),
}

# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------


@dataclass
class Entity:
    kind: str
    en: str
    zh: str
    attrs: dict = field(default_factory=dict)  # relation -> value (en, zh) or Entity


@dataclass
class Fact:
    rel: str
    subj: Entity
    v_en: str
    v_zh: str

    @property
    def key(self) -> tuple:
        return (self.rel, self.subj.en)

    def name(self, lang: str) -> str:
        return self.subj.en if lang == "en" else self.subj.zh

    def value(self, lang: str) -> str:
        return self.v_en if lang == "en" else self.v_zh


def _make_names(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n distinct invented names (English, Chinese) of 2-3 syllables; Chinese names unique too."""
    seen_en, seen_zh, out = set(), set(), []
    while len(out) < n:
        k = 2 if rng.random() < 0.6 else 3
        syl = [rng.choice(_SYLLABLES) for _ in range(k)]
        en = "".join(s[0] for s in syl).capitalize()
        zh = "".join(s[1] for s in syl)
        if en in seen_en or zh in seen_zh or len(set(zh)) < len(zh):
            continue
        seen_en.add(en)
        seen_zh.add(zh)
        out.append((en, zh))
    return out


@dataclass
class World:
    countries: list
    cities: list
    people: list
    pets: list
    facts: list

    def facts_of(self, ent: Entity) -> list:
        """A fresh list of the facts whose subject is `ent` (in world order)."""
        index = self.__dict__.setdefault("_by_subject", {})
        if not index:
            for f in self.facts:
                index.setdefault(id(f.subj), []).append(f)
        return list(index.get(id(ent), ()))


def build_world(seed: int, size: CorpusSize) -> World:
    rng = random.Random(f"llmcore-world-{seed}")
    names = _make_names(rng, size.countries + size.cities + size.people + size.pets)
    if not size.zh_names:
        names = [(en, en) for en, _ in names]
    it = iter(names)
    countries = [Entity("country", *next(it)) for _ in range(size.countries)]
    cities = [Entity("city", *next(it)) for _ in range(size.cities)]
    people = [Entity("person", *next(it)) for _ in range(size.people)]
    pets = [Entity("pet", *next(it)) for _ in range(size.pets)]
    # Every country gets at least one city; its capital is one of its cities.
    for i, c in enumerate(cities):
        c.attrs["country"] = countries[i] if i < len(countries) else rng.choice(countries)
    for k in countries:
        mine = [c for c in cities if c.attrs["country"] is k]
        k.attrs["capital"] = rng.choice(mine)
    for p in people:
        p.attrs["home"] = rng.choice(cities)
        p.attrs["food"] = rng.choice(FOODS)
        p.attrs["color"] = rng.choice(COLORS)
        age = rng.randint(18, 80)
        p.attrs["age"] = (str(age), str(age))
        p.attrs["job"] = rng.choice(JOBS)
    for q in pets:
        q.attrs["species"] = rng.choice(SPECIES)
        q.attrs["pet_color"] = rng.choice(COLORS)
        q.attrs["owner"] = rng.choice(people)
    facts = []
    for ent in countries + cities + people + pets:
        for rel, v in ent.attrs.items():
            if isinstance(v, Entity):
                facts.append(Fact(rel, ent, v.en, v.zh))
            else:
                facts.append(Fact(rel, ent, v[0], v[1]))
    return World(countries, cities, people, pets, facts)


def _all_arith_table() -> list:
    table = [(a, b, "+") for a in range(ADD_MAX_A + 1) for b in range(ADD_MAX_B + 1)]
    table += [(a, b, "-") for a in range(SUB_MAX_A + 1) for b in range(min(a, SUB_MAX_B) + 1)]
    return table


def _qa_arith_table() -> list:
    """Single-step arithmetic asked in SFT/eval: a, b <= QA_MAX (a >= b for subtraction)."""
    return [(a, b, op) for (a, b, op) in _all_arith_table() if a <= QA_MAX and b <= QA_MAX]
