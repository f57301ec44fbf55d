"""The embedded default corpus: a small, deterministic, bilingual (English + Chinese) world.

`write_default_corpus(out_dir, seed, size)` generates, with no download and in pure Python, a
corpus in minimind's jsonl formats about an invented world, designed so a tiny model trained for a
few CPU minutes measurably learns it:

- **World**: invented countries, cities, people and pets (each with an English and a Chinese
  name), a handful of attributes with short one-word answers: a country's capital, a city's
  country, a person's home town / favourite food / favourite colour / age / job, a pet's species /
  colour / owner. Plus an arithmetic table: a + b (a <= 60, b <= 20) and a - b (b <= a <= 40,
  b <= 20), numbers in Arabic digits in both languages.
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
- **eval_reason.jsonl**: held-out reasoning questions (entities / number triples that reason.jsonl
  never uses) with answers, format of eval.jsonl plus "reasoning" (the reference trace).

Sizes: "tiny" (tests, well under a second), "small" (the CPU default: ~1 M tokens of pretraining)
and "large" (a bigger world and ~20x more text, for a GPU run). Same (seed, size) -> same bytes.

`score_answer(prediction, answer)` is the exact-match rule for the eval files.
"""
from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

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


SIZES = {
    "tiny": CorpusSize(3, 6, 10, 4, 300, 200, 50, 50, 40, 20, 10, 10),
    "small": CorpusSize(5, 15, 40, 15, 16000, 6000, 1500, 1500, 240, 120, 100, 100),
    "large": CorpusSize(10, 40, 160, 60, 300000, 100000, 20000, 20000, 800, 400, 400, 400),
}

# ----------------------------------------------------------------------------------------------
# Vocabulary of the world
# ----------------------------------------------------------------------------------------------

# English syllable -> Chinese transliteration character.
_SYLLABLES = [
    ("ka", "卡"), ("lo", "洛"), ("mi", "米"), ("ra", "拉"), ("ten", "滕"), ("vo", "沃"),
    ("su", "苏"), ("ri", "里"), ("da", "达"), ("ne", "内"), ("po", "波"), ("li", "莉"),
    ("ba", "巴"), ("zo", "佐"), ("fe", "菲"), ("gu", "古"), ("ha", "哈"), ("me", "梅"),
    ("ta", "塔"), ("no", "诺"), ("ven", "文"), ("sa", "萨"), ("ki", "基"), ("mo", "莫"),
    ("lan", "兰"), ("do", "多"), ("ru", "鲁"), ("si", "西"), ("pa", "帕"), ("te", "特"),
]

COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"),
          ("white", "白色"), ("black", "黑色"), ("purple", "紫色"), ("orange", "橙色")]
FOODS = [("apples", "苹果"), ("rice", "米饭"), ("noodles", "面条"), ("fish", "鱼"),
         ("bread", "面包"), ("cheese", "奶酪"), ("soup", "汤"), ("cake", "蛋糕"),
         ("dumplings", "饺子"), ("grapes", "葡萄")]
SPECIES = [("cat", "猫"), ("dog", "狗"), ("rabbit", "兔子"), ("horse", "马"), ("bird", "鸟"), ("fox", "狐狸")]
JOBS = [("teacher", "老师"), ("doctor", "医生"), ("farmer", "农民"), ("painter", "画家"),
        ("cook", "厨师"), ("driver", "司机"), ("singer", "歌手")]

SYSTEM_PROMPTS = [
    ("en", "You are a helpful assistant."),
    ("en", "You are a small assistant. Answer briefly."),
    ("zh", "你是一个乐于助人的助手。"),
    ("zh", "你是一个小助手，请简短回答。"),
]

SMALL_TALK = [
    ("en", "Hello!", "Hello! How can I help you?"),
    ("en", "Hi", "Hi! What would you like to know?"),
    ("en", "Who are you?", "I am a small language model trained by llmcore."),
    ("en", "What can you do?", "I can answer questions about my little world and do simple arithmetic."),
    ("en", "Thank you!", "You are welcome!"),
    ("en", "Goodbye.", "Goodbye! Have a nice day."),
    ("zh", "你好", "你好！有什么可以帮你的吗？"),
    ("zh", "你是谁？", "我是一个由llmcore训练的小语言模型。"),
    ("zh", "你会做什么？", "我可以回答关于我的小世界的问题，也会做简单的算术。"),
    ("zh", "谢谢！", "不客气！"),
    ("zh", "再见。", "再见！祝你愉快。"),
]

# ----------------------------------------------------------------------------------------------
# Relations: statement templates (pretrain) and question templates (SFT / eval)
# {s} = subject name, {v} = value, in the template's language.
# The LAST `held` question templates of each list are held out: only eval.jsonl uses them.
# ----------------------------------------------------------------------------------------------


@dataclass
class Relation:
    name: str
    subject: str  # entity kind
    state_en: list
    state_zh: list
    ask_en: list
    ask_zh: list
    held: int = 1


RELATIONS = {
    "capital": Relation(
        "capital", "country",
        ["The capital of {s} is {v}.", "{v} is the capital of {s}.", "{s} has its capital in {v}.",
         "The capital city of {s} is {v}.", "People in {s} call {v} their capital."],
        ["{s}的首都是{v}。", "{v}是{s}的首都。", "{s}的首都叫{v}。", "{s}以{v}为首都。"],
        ["What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital of {s}.",
         "What city is {s}'s capital?", "Tell me the capital of {s}."],
        ["{s}的首都是哪里？", "{s}的首都是哪个城市？", "请说出{s}的首都。", "{s}的首都叫什么？"],
    ),
    "country": Relation(
        "country", "city",
        ["{s} is a city in {v}.", "{s} is in {v}.", "The city of {s} lies in {v}.", "{s} belongs to {v}.",
         "You can find {s} in {v}."],
        ["{s}是{v}的一个城市。", "{s}位于{v}。", "{s}在{v}。", "{s}属于{v}。"],
        ["Which country is {s} in?", "In which country is {s}?", "What country does {s} belong to?",
         "Where is the city of {s}?", "Tell me the country of {s}."],
        ["{s}在哪个国家？", "{s}属于哪个国家？", "{s}位于哪个国家？", "{s}是哪个国家的城市？"],
    ),
    "home": Relation(
        "home", "person",
        ["{s} lives in {v}.", "{s} comes from {v}.", "The home town of {s} is {v}.", "{s}'s home town is {v}.",
         "{s} was born in {v}."],
        ["{s}住在{v}。", "{s}来自{v}。", "{s}的家乡是{v}。", "{s}出生在{v}。"],
        ["Where does {s} live?", "Which city does {s} come from?", "What is the home town of {s}?",
         "Where is {s}'s home?", "In which city was {s} born?"],
        ["{s}住在哪里？", "{s}来自哪个城市？", "{s}的家乡是哪里？", "{s}出生在哪个城市？"],
    ),
    "food": Relation(
        "food", "person",
        ["{s}'s favourite food is {v}.", "{s} likes {v} best.", "The favourite food of {s} is {v}.",
         "{s} loves to eat {v}.", "More than anything, {s} likes eating {v}."],
        ["{s}最喜欢的食物是{v}。", "{s}最爱吃{v}。", "{s}最喜欢吃{v}。", "{s}喜欢的食物是{v}。"],
        ["What is {s}'s favourite food?", "What does {s} like to eat best?", "What food does {s} love?",
         "Which food does {s} like most?", "What is the favourite food of {s}?"],
        ["{s}最喜欢的食物是什么？", "{s}最爱吃什么？", "{s}最喜欢吃什么？", "{s}喜欢吃的是什么？"],
    ),
    "color": Relation(
        "color", "person",
        ["{s}'s favourite colour is {v}.", "{s} likes the colour {v}.", "The favourite colour of {s} is {v}.",
         "{s} loves the colour {v}.", "Of all colours, {s} likes {v} best."],
        ["{s}最喜欢的颜色是{v}。", "{s}最爱{v}。", "{s}喜欢的颜色是{v}。", "{s}最喜欢{v}。"],
        ["What is {s}'s favourite colour?", "Which colour does {s} like best?", "What colour does {s} love?",
         "What is the favourite colour of {s}?", "Which colour is {s}'s favourite?"],
        ["{s}最喜欢什么颜色？", "{s}最喜欢的颜色是什么？", "{s}最爱哪种颜色？", "{s}喜欢的颜色是什么？"],
    ),
    "age": Relation(
        "age", "person",
        ["{s} is {v} years old.", "{s}'s age is {v}.", "The age of {s} is {v}.", "{s} has lived for {v} years.",
         "{s} turned {v} this year."],
        ["{s}今年{v}岁。", "{s}{v}岁了。", "{s}的年龄是{v}岁。", "{s}已经{v}岁了。"],
        ["How old is {s}?", "What is {s}'s age?", "What is the age of {s}?", "How many years old is {s}?",
         "Tell me how old {s} is."],
        ["{s}今年多大？", "{s}几岁了？", "{s}的年龄是多少？", "{s}今年几岁？"],
    ),
    "job": Relation(
        "job", "person",
        ["{s} works as a {v}.", "{s} is a {v}.", "The job of {s} is {v}.", "{s}'s job is {v}.",
         "By profession, {s} is a {v}."],
        ["{s}是一名{v}。", "{s}的工作是{v}。", "{s}的职业是{v}。", "{s}当{v}。"],
        ["What does {s} do for a living?", "What is {s}'s job?", "What is the job of {s}?",
         "What work does {s} do?", "What is {s}'s profession?"],
        ["{s}是做什么工作的？", "{s}的工作是什么？", "{s}的职业是什么？", "{s}做什么工作？"],
    ),
    "species": Relation(
        "species", "pet",
        ["{s} is a {v}.", "{s} is a pet {v}.", "The pet named {s} is a {v}.", "{s} is a little {v}.",
         "The animal called {s} is a {v}."],
        ["{s}是一只{v}。", "{s}是宠物{v}。", "名叫{s}的宠物是一只{v}。", "{s}是一只小{v}。"],
        ["What kind of animal is {s}?", "What animal is {s}?", "What is {s}?", "Which animal is the pet {s}?",
         "What species is {s}?"],
        ["{s}是什么动物？", "{s}是哪种动物？", "宠物{s}是什么动物？", "{s}是什么宠物？"],
    ),
    "pet_color": Relation(
        "pet_color", "pet",
        ["The colour of {s} is {v}.", "{s} is {v}.", "{s} has {v} fur.", "{s} is a {v} animal.",
         "The pet {s} is {v}."],
        ["{s}是{v}的。", "{s}的颜色是{v}。", "{s}的毛是{v}的。", "宠物{s}是{v}的。"],
        ["What colour is {s}?", "What is the colour of {s}?", "Which colour is the pet {s}?",
         "What colour is the fur of {s}?", "Tell me the colour of {s}."],
        ["{s}是什么颜色的？", "{s}的颜色是什么？", "{s}的毛是什么颜色？", "宠物{s}是什么颜色？"],
    ),
    "owner": Relation(
        "owner", "pet",
        ["{s} belongs to {v}.", "The owner of {s} is {v}.", "{v} owns {s}.", "{v} takes care of {s}.",
         "{s} is {v}'s pet."],
        ["{s}的主人是{v}。", "{v}养了{s}。", "{s}是{v}的宠物。", "{v}照顾{s}。"],
        ["Who owns {s}?", "Who is the owner of {s}?", "Whose pet is {s}?", "Who takes care of {s}?",
         "Who does {s} belong to?"],
        ["{s}的主人是谁？", "谁养了{s}？", "{s}是谁的宠物？", "谁照顾{s}？"],
    ),
}

ARITH_STATE_EN = ["{a} plus {b} equals {c}.", "{a} + {b} = {c}", "The sum of {a} and {b} is {c}.",
                  "Adding {b} to {a} gives {c}.", "{a} and {b} make {c}."]
ARITH_STATE_ZH = ["{a}加{b}等于{c}。", "{a} + {b} = {c}", "{a}和{b}的和是{c}。", "{a}加上{b}得{c}。"]
SUB_STATE_EN = ["{a} minus {b} equals {c}.", "{a} - {b} = {c}", "Taking {b} from {a} leaves {c}.",
                "The difference of {a} and {b} is {c}.", "{a} take away {b} is {c}."]
SUB_STATE_ZH = ["{a}减{b}等于{c}。", "{a} - {b} = {c}", "{a}减去{b}得{c}。", "{a}和{b}的差是{c}。"]
# Question templates; the last one of each list is held out for eval.jsonl.
ADD_ASK_EN = ["What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "How much is {a} plus {b}?",
              "Add {a} and {b}."]
ADD_ASK_ZH = ["{a}加{b}等于多少？", "{a} + {b} 等于几？", "计算{a}加{b}。", "{a}加上{b}是多少？"]
SUB_ASK_EN = ["What is {a} - {b}?", "What is {a} minus {b}?", "Compute {a} - {b}.", "How much is {a} minus {b}?",
              "Subtract {b} from {a}."]
SUB_ASK_ZH = ["{a}减{b}等于多少？", "{a} - {b} 等于几？", "计算{a}减{b}。", "{a}减去{b}是多少？"]
ADD_MAX_A, ADD_MAX_B = 60, 20
SUB_MAX_A, SUB_MAX_B = 40, 20
QA_MAX = 20  # single-step arithmetic questions use a, b <= 20 (facts of the table)

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
        return [f for f in self.facts if f.subj is ent]


def build_world(seed: int, size: CorpusSize) -> World:
    rng = random.Random(f"llmcore-world-{seed}")
    names = _make_names(rng, size.countries + size.cities + size.people + size.pets)
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


def _state(rng: random.Random, fact: Fact, lang: str) -> str:
    rel = RELATIONS[fact.rel]
    tmpl = rng.choice(rel.state_en if lang == "en" else rel.state_zh)
    return tmpl.format(s=fact.name(lang), v=fact.value(lang))


def _ask_templates(rel: str, lang: str, held: bool) -> list:
    r = RELATIONS[rel]
    lst = r.ask_en if lang == "en" else r.ask_zh
    return lst[-r.held:] if held else lst[: -r.held]


def _arith(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b


def _arith_state(rng: random.Random, a: int, b: int, op: str, lang: str) -> str:
    if op == "+":
        t = rng.choice(ARITH_STATE_EN if lang == "en" else ARITH_STATE_ZH)
    else:
        t = rng.choice(SUB_STATE_EN if lang == "en" else SUB_STATE_ZH)
    return t.format(a=a, b=b, c=_arith(a, b, op))


def _arith_ask_templates(op: str, lang: str, held: bool) -> list:
    lst = {("+", "en"): ADD_ASK_EN, ("+", "zh"): ADD_ASK_ZH, ("-", "en"): SUB_ASK_EN, ("-", "zh"): SUB_ASK_ZH}[(op, lang)]
    return lst[-1:] if held else lst[:-1]


def _all_arith_table() -> list:
    table = [(a, b, "+") for a in range(ADD_MAX_A + 1) for b in range(ADD_MAX_B + 1)]
    table += [(a, b, "-") for a in range(SUB_MAX_A + 1) for b in range(min(a, SUB_MAX_B) + 1)]
    return table


def _qa_arith_table() -> list:
    """Single-step arithmetic asked in SFT/eval: a, b <= QA_MAX (a >= b for subtraction)."""
    return [(a, b, op) for (a, b, op) in _all_arith_table() if a <= QA_MAX and b <= QA_MAX]


# ----------------------------------------------------------------------------------------------
# Pretraining documents
# ----------------------------------------------------------------------------------------------

_JOIN = {"en": " ", "zh": ""}


def _doc_profile(rng, world, lang):
    ent = rng.choice(world.countries + world.cities + world.people + world.people + world.pets)
    facts = world.facts_of(ent)
    rng.shuffle(facts)
    sents = [_state(rng, f, lang) for f in facts[: rng.randint(min(2, len(facts)), len(facts))]]
    # Sometimes follow a link (a person's city, a pet's owner) for a longer document.
    if rng.random() < 0.5:
        linked = [v for v in ent.attrs.values() if isinstance(v, Entity)]
        if linked:
            other = rng.choice(linked)
            of = world.facts_of(other)
            rng.shuffle(of)
            sents += [_state(rng, f, lang) for f in of[: rng.randint(1, len(of))]]
    return _JOIN[lang].join(sents)


def _doc_fact_list(rng, world, lang):
    facts = rng.sample(world.facts, min(len(world.facts), rng.randint(3, 8)))
    sents = [_state(rng, f, lang) for f in facts]
    if rng.random() < 0.3:
        return "\n".join(sents)
    return _JOIN[lang].join(sents)


def _doc_story(rng, world, lang):
    p = rng.choice(world.people)
    city, food, color, job = p.attrs["home"], p.attrs["food"], p.attrs["color"], p.attrs["job"]
    pets = [q for q in world.pets if q.attrs["owner"] is p]
    if lang == "en":
        s = [f"{p.en} is a {job[0]} who lives in {city.en}, a city in {city.attrs['country'].en}.",
             f"Every evening {p.en} eats {food[0]}, because {food[0]} is {p.en}'s favourite food.",
             f"{p.en} wears {color[0]} clothes, since {color[0]} is {p.en}'s favourite colour.",
             f"{p.en} is {p.attrs['age'][0]} years old."]
        for q in pets:
            s.append(f"{p.en} has a {q.attrs['pet_color'][0]} {q.attrs['species'][0]} named {q.en}.")
        cap = city.attrs["country"].attrs["capital"]
        if cap is not city:
            s.append(f"One day {p.en} travelled to {cap.en}, the capital of {city.attrs['country'].en}.")
        else:
            s.append(f"{p.en} is proud that {city.en} is the capital of {city.attrs['country'].en}.")
    else:
        s = [f"{p.zh}是一名{job[1]}，住在{city.attrs['country'].zh}的{city.zh}。",
             f"{p.zh}每天晚上吃{food[1]}，因为{p.zh}最喜欢的食物是{food[1]}。",
             f"{p.zh}喜欢穿{color[1]}的衣服，{p.zh}最喜欢的颜色是{color[1]}。",
             f"{p.zh}今年{p.attrs['age'][1]}岁。"]
        for q in pets:
            s.append(f"{p.zh}有一只{q.attrs['pet_color'][1]}的{q.attrs['species'][1]}，名叫{q.zh}。")
        cap = city.attrs["country"].attrs["capital"]
        if cap is not city:
            s.append(f"有一天，{p.zh}去了{city.attrs['country'].zh}的首都{cap.zh}。")
        else:
            s.append(f"{p.zh}很自豪，因为{city.zh}是{city.attrs['country'].zh}的首都。")
    head, tail = s[:1], s[1:]
    rng.shuffle(tail)
    return _JOIN[lang].join(head + tail[: rng.randint(2, len(tail))])


def _doc_dialogue(rng, world, lang):
    p = rng.choice(world.people)
    facts = world.facts_of(p)
    rng.shuffle(facts)
    lines = []
    for f in facts[: rng.randint(2, 4)]:
        q = rng.choice(_ask_templates(f.rel, lang, held=False)).format(s=f.name(lang), v="")
        a = _state(rng, f, lang)
        if lang == "en":
            lines += [f"A: {q}", f"B: {a}"]
        else:
            lines += [f"甲：{q}", f"乙：{a}"]
    return "\n".join(lines)


def _doc_arith(rng, table, lang):
    n = rng.randint(4, 12)
    items = [rng.choice(table) for _ in range(n)]
    return "\n".join(_arith_state(rng, a, b, op, lang) for a, b, op in items)


def _chain_numbers(rng, k):
    """k addends <= 20 whose running sums stay <= ADD_MAX_A (so each step is a table fact)."""
    while True:
        xs = [rng.randint(1, QA_MAX) for _ in range(k)]
        if sum(xs[:-1]) <= ADD_MAX_A:
            return xs


def _chain_steps(xs, lang):
    steps, acc = [], xs[0]
    for x in xs[1:]:
        steps.append(f"{acc} + {x} = {acc + x}")
        acc += x
    return steps, acc


def _doc_arith_chain(rng, lang):
    xs = _chain_numbers(rng, rng.randint(3, 4))
    steps, total = _chain_steps(xs, lang)
    expr = " + ".join(map(str, xs))
    if lang == "en":
        return f"To compute {expr}, add step by step: " + ", ".join(steps) + f". So {expr} = {total}."
    return f"计算{expr}，一步一步加：" + "，".join(steps) + f"。所以{expr} = {total}。"


def _pretrain_docs(rng, world, n):
    table = _all_arith_table()
    docs = []
    kinds = ["profile"] * 30 + ["facts"] * 25 + ["story"] * 12 + ["dialogue"] * 8 + ["arith"] * 18 + ["chain"] * 7
    for _ in range(n):
        lang = "en" if rng.random() < 0.5 else "zh"
        k = rng.choice(kinds)
        if k == "profile":
            docs.append(_doc_profile(rng, world, lang))
        elif k == "facts":
            docs.append(_doc_fact_list(rng, world, lang))
        elif k == "story":
            docs.append(_doc_story(rng, world, lang))
        elif k == "dialogue":
            docs.append(_doc_dialogue(rng, world, lang))
        elif k == "arith":
            docs.append(_doc_arith(rng, table, lang))
        else:
            docs.append(_doc_arith_chain(rng, lang))
    # Every fact and every arithmetic-table entry is stated at least once in each language,
    # whatever the sampling did (small sizes).
    for lang in ("en", "zh"):
        facts = list(world.facts)
        rng.shuffle(facts)
        for i in range(0, len(facts), 6):
            docs.append(_JOIN[lang].join(_state(rng, f, lang) for f in facts[i:i + 6]))
        tab = list(table)
        rng.shuffle(tab)
        for i in range(0, len(tab), 10):
            docs.append("\n".join(_arith_state(rng, a, b, op, lang) for a, b, op in tab[i:i + 10]))
    rng.shuffle(docs)
    return [{"text": d} for d in docs]


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # "fact" | "arith"
    lang: str
    key: tuple  # the fact (relation, English subject) / arithmetic item (a, b, op) asked about
    subject: str = ""  # fact questions: the subject's name in `lang`


def _fact_qa(rng, fact: Fact, lang: str, held_template: bool) -> QA:
    t = rng.choice(_ask_templates(fact.rel, lang, held_template))
    return QA(t.format(s=fact.name(lang)), fact.value(lang), "fact", lang, fact.key, fact.name(lang))


def _arith_qa(rng, item, lang: str, held_template: bool) -> QA:
    a, b, op = item
    t = rng.choice(_arith_ask_templates(op, lang, held_template))
    return QA(t.format(a=a, b=b), str(_arith(a, b, op)), "arith", lang, item)


def _wrong_fact_value(rng, world, fact: Fact, lang: str) -> str:
    pool = sorted({f.value(lang) for f in world.facts if f.rel == fact.rel} - {fact.value(lang)})
    if not pool:  # a relation with one value in a tiny world: answer with another entity's name
        pool = sorted({e.en if lang == "en" else e.zh for e in world.cities + world.people} - {fact.value(lang)})
    return rng.choice(pool)


def _wrong_number(rng, right: int) -> str:
    d = rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
    w = right + d
    return str(w if w >= 0 and w != right else right + 1)


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------


def _dump(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _maybe_system(rng, lang, p=0.3):
    if rng.random() < p:
        return [{"role": "system", "content": rng.choice([s for l, s in SYSTEM_PROMPTS if l == lang])}]
    return []


def _reason_arith(rng, xs, lang):
    steps, total = _chain_steps(xs, lang)
    expr = " + ".join(map(str, xs))
    if lang == "en":
        q = rng.choice([f"What is {expr}?", f"Compute {expr} step by step.", f"Add up {expr}."])
        think = "Add step by step. " + ". ".join(steps) + f". The result is {total}."
    else:
        q = rng.choice([f"{expr}等于多少？", f"一步一步计算{expr}。", f"求{expr}的和。"])
        think = "一步一步加。" + "。".join(steps) + f"。结果是{total}。"
    return q, think, str(total)


_REASON_ARITH_HELD_EN = "Please work out {expr}."
_REASON_ARITH_HELD_ZH = "请算出{expr}。"


def _reason_twohop(rng, world, ent, lang, held=False):
    """Two-hop question about a person (country of home town) or a pet (owner's food / home)."""
    if ent.kind == "person":
        city = ent.attrs["home"]
        country = city.attrs["country"]
        if lang == "en":
            qs = ["In which country does {s} live?", "Which country is {s}'s home town in?"]
            q = (["What country is {s} from?"] if held else qs)
            q = rng.choice(q).format(s=ent.en)
            think = f"{ent.en} lives in {city.en}. {city.en} is in {country.en}."
            return q, think, country.en
        qs = ["{s}住在哪个国家？", "{s}的家乡在哪个国家？"]
        q = rng.choice(["{s}是哪个国家的人？"] if held else qs).format(s=ent.zh)
        think = f"{ent.zh}住在{city.zh}。{city.zh}在{country.zh}。"
        return q, think, country.zh
    owner = ent.attrs["owner"]
    food = owner.attrs["food"]
    if lang == "en":
        qs = ["What is the favourite food of {s}'s owner?", "What does the owner of {s} like to eat best?"]
        q = rng.choice(["What food does the person who owns {s} love?"] if held else qs).format(s=ent.en)
        think = f"The owner of {ent.en} is {owner.en}. {owner.en}'s favourite food is {food[0]}."
        return q, think, food[0]
    qs = ["{s}的主人最喜欢吃什么？", "{s}的主人最喜欢的食物是什么？"]
    q = rng.choice(["养{s}的人最爱吃什么？"] if held else qs).format(s=ent.zh)
    think = f"{ent.zh}的主人是{owner.zh}。{owner.zh}最喜欢的食物是{food[1]}。"
    return q, think, food[1]


def _reason_content(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def generate_default_corpus(seed: int = 0, size: str = "small") -> dict[str, list[dict]]:
    """All records of the default corpus, in memory: {"pretrain": [...], "sft": [...], ...}."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    cfg = SIZES[size]
    world = build_world(seed, cfg)
    rng = random.Random(f"llmcore-corpus-{seed}-{size}")

    # ---- held-out split: facts and arithmetic items SFT/DPO/reason never ask about --------
    fact_keys = sorted({f.key for f in world.facts})
    rng.shuffle(fact_keys)
    n_unseen = max(1, int(len(fact_keys) * cfg.unseen_fact_frac))
    unseen_facts = set(fact_keys[:n_unseen])
    seen_facts = [f for f in world.facts if f.key not in unseen_facts]
    held_facts = [f for f in world.facts if f.key in unseen_facts]

    qa_table = _qa_arith_table()
    arith_items = list(qa_table)
    rng.shuffle(arith_items)
    n_unseen_a = max(1, int(len(arith_items) * cfg.unseen_arith_frac))
    unseen_arith = set(arith_items[:n_unseen_a])
    seen_arith = [x for x in qa_table if x not in unseen_arith]
    held_arith = [x for x in qa_table if x in unseen_arith]

    # ---- eval questions first: their texts are then excluded everywhere else ----------------
    eval_recs, eval_texts = [], set()

    def add_eval(qa: QA, split: str):
        if qa.question in eval_texts:
            return
        eval_texts.add(qa.question)
        rec = {"question": qa.question, "answer": qa.answer, "kind": qa.kind, "lang": qa.lang, "split": split}
        if qa.kind == "fact":
            rec["relation"], rec["subject"] = qa.key[0], qa.subject
        else:
            rec["expr"] = f"{qa.key[0]} {qa.key[2]} {qa.key[1]}"
        eval_recs.append(rec)

    n_fact_unseen = cfg.eval_facts // 2
    tries = 0
    while sum(r["kind"] == "fact" and r["split"] == "unseen_fact" for r in eval_recs) < n_fact_unseen and tries < 50 * cfg.eval_facts:
        tries += 1
        f = rng.choice(held_facts)
        add_eval(_fact_qa(rng, f, rng.choice(["en", "zh"]), held_template=False), "unseen_fact")
    tries = 0
    while sum(r["kind"] == "fact" for r in eval_recs) < cfg.eval_facts and tries < 50 * cfg.eval_facts:
        tries += 1
        f = rng.choice(seen_facts)
        add_eval(_fact_qa(rng, f, rng.choice(["en", "zh"]), held_template=True), "unseen_template")
    tries = 0
    while sum(r["kind"] == "arith" and r["split"] == "unseen_fact" for r in eval_recs) < cfg.eval_arith // 2 and tries < 50 * cfg.eval_arith:
        tries += 1
        add_eval(_arith_qa(rng, rng.choice(held_arith), rng.choice(["en", "zh"]), held_template=False), "unseen_fact")
    tries = 0
    while sum(r["kind"] == "arith" for r in eval_recs) < cfg.eval_arith and tries < 50 * cfg.eval_arith:
        tries += 1
        add_eval(_arith_qa(rng, rng.choice(seen_arith), rng.choice(["en", "zh"]), held_template=True), "unseen_template")

    def sample_train_qa() -> QA:
        """A training question (seen fact or arithmetic item, training template) not in eval."""
        while True:
            lang = "en" if rng.random() < 0.5 else "zh"
            if rng.random() < 0.7:
                qa = _fact_qa(rng, rng.choice(seen_facts), lang, held_template=False)
            else:
                qa = _arith_qa(rng, rng.choice(seen_arith), lang, held_template=False)
            if qa.question not in eval_texts:
                return qa

    # ---- SFT ---------------------------------------------------------------------------------
    sft = []
    for _ in range(cfg.sft_convs):
        r = rng.random()
        lang = "en" if rng.random() < 0.5 else "zh"
        if r < 0.05:
            l2, q, a = rng.choice(SMALL_TALK)
            msgs = _maybe_system(rng, l2) + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        elif r < 0.75:
            qa = sample_train_qa()
            msgs = _maybe_system(rng, qa.lang) + [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
        else:
            msgs = _maybe_system(rng, lang)
            for _ in range(rng.randint(2, 3)):
                qa = sample_train_qa()
                msgs += [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
        sft.append({"conversations": msgs})

    # ---- DPO (train on seen facts; eval_dpo on held-out facts / arithmetic) -----------------
    def dpo_pair(qa: QA, sys_p=0.2):
        if qa.kind == "fact":
            fact = next(f for f in world.facts if f.key == qa.key)
            wrong = _wrong_fact_value(rng, world, fact, qa.lang)
        else:
            wrong = _wrong_number(rng, int(qa.answer))
        prompt = _maybe_system(rng, qa.lang, sys_p) + [{"role": "user", "content": qa.question}]
        return {"chosen": prompt + [{"role": "assistant", "content": qa.answer}],
                "rejected": prompt + [{"role": "assistant", "content": wrong}]}

    dpo = [dpo_pair(sample_train_qa()) for _ in range(cfg.dpo_pairs)]
    eval_dpo = []
    while len(eval_dpo) < cfg.eval_dpo:
        lang = rng.choice(["en", "zh"])
        if rng.random() < 0.7:
            qa = _fact_qa(rng, rng.choice(held_facts), lang, held_template=False)
        else:
            qa = _arith_qa(rng, rng.choice(held_arith), lang, held_template=False)
        eval_dpo.append(dpo_pair(qa))

    # ---- reasoning ---------------------------------------------------------------------------
    # Held out for eval_reason: some people/pets (two-hop) and addend tuples never in reason.jsonl.
    twohop_ents = world.people + world.pets
    ents = list(twohop_ents)
    rng.shuffle(ents)
    held_ents = ents[: max(1, len(ents) // 6)]
    train_ents = ents[len(held_ents):]
    reason, eval_reason, used_tuples = [], [], set()
    eval_reason_texts = set()
    while len(eval_reason) < cfg.eval_reason:
        lang = rng.choice(["en", "zh"])
        if rng.random() < 0.5:
            xs = tuple(_chain_numbers(rng, rng.randint(3, 4)))
            if xs in used_tuples:
                continue
            used_tuples.add(xs)
            expr = " + ".join(map(str, xs))
            steps, total = _chain_steps(list(xs), lang)
            q = (_REASON_ARITH_HELD_EN if lang == "en" else _REASON_ARITH_HELD_ZH).format(expr=expr)
            _, think, ans = _reason_arith(rng, list(xs), lang)
            kind = "arith"
        else:
            q, think, ans = _reason_twohop(rng, world, rng.choice(held_ents), lang, held=True)
            kind = "fact"
        if q in eval_reason_texts:
            continue
        eval_reason_texts.add(q)
        eval_reason.append({"question": q, "answer": ans, "kind": kind, "lang": lang, "split": "heldout", "reasoning": think})
    for _ in range(cfg.reason_convs):
        lang = rng.choice(["en", "zh"])
        if rng.random() < 0.6:
            xs = _chain_numbers(rng, rng.randint(3, 4))
            if tuple(xs) in used_tuples:
                continue
            q, think, ans = _reason_arith(rng, xs, lang)
        else:
            q, think, ans = _reason_twohop(rng, world, rng.choice(train_ents), lang)
        msgs = _maybe_system(rng, lang, 0.2) + [{"role": "user", "content": q},
                                                {"role": "assistant", "content": _reason_content(think, ans)}]
        reason.append({"conversations": msgs})

    pretrain = _pretrain_docs(rng, world, cfg.pretrain_docs)
    # Eval question texts never occur verbatim in pretraining text either.
    forbidden = eval_texts | eval_reason_texts
    pretrain = [d for d in pretrain if not any(q in d["text"] for q in _contained_candidates(d["text"], forbidden))]
    return {"pretrain": pretrain, "sft": sft, "dpo": dpo, "reason": reason, "eval": eval_recs,
            "eval_dpo": eval_dpo, "eval_reason": eval_reason}


def _contained_candidates(text: str, forbidden: set) -> list:
    """Forbidden questions that could occur in `text` (cheap prefilter on the question mark)."""
    if "?" not in text and "？" not in text:
        return []
    return [q for q in forbidden if q in text]


def write_default_corpus(out_dir: str | os.PathLike, seed: int = 0, size: str = "small") -> dict[str, Path]:
    """Write the default corpus as jsonl files into `out_dir`; returns {name: path} for the
    names pretrain, sft, dpo, reason, eval, eval_dpo, eval_reason. Deterministic in (seed, size)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = generate_default_corpus(seed, size)
    return {name: _dump(out / f"{name}.jsonl", rs) for name, rs in recs.items()}


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S)
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize_answer(s: str) -> str:
    """NFKC, lower case, punctuation (ASCII and CJK) -> space, whitespace collapsed."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = _PUNCT.sub(" ", s)
    return " ".join(s.split())


def _is_cjk(s: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in s)


def score_answer(prediction: str, answer: str) -> bool:
    """Exact-match rule for eval.jsonl / eval_reason.jsonl.

    1. If the prediction has `<answer>...</answer>`, only its inside counts; otherwise any
       `<think>...</think>` block is dropped.
    2. Only the first line of what remains counts (a model rambling on after its answer).
    3. Both sides are normalized (`normalize_answer`: NFKC, lower case, punctuation removed).
    4. True when the normalized answer is the whole prediction, or its first word(s), or occurs in
       it as whole words (space-separated; so "7" matches "it is 7" but not "17"). For a Chinese
       answer (no spaces in Chinese), plain substring containment is used ("红色" in "它是红色的").
    An empty prediction never matches.
    """
    m = _ANSWER_TAG.search(prediction)
    text = m.group(1) if m else _THINK.sub(" ", prediction)
    text = text.strip().split("\n", 1)[0] if text.strip() else ""
    p, a = normalize_answer(text), normalize_answer(answer)
    if not p or not a:
        return False
    if p == a or p.startswith(a + " "):
        return True
    if _is_cjk(a):
        return a in p
    return f" {a} " in f" {p} "
