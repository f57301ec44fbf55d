"""Vocabulary and sentence templates of the default corpus: names' syllables, attribute values,
system prompts, small talk, each relation's statement and question templates (the last `held` question
templates of a relation are held out for eval.jsonl), and the arithmetic templates and table bounds;
plus the functions that fill them in. {s} = subject name, {v} = value, in the template's language."""
from __future__ import annotations

import random
from dataclasses import dataclass

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
# The arithmetic table: a + b and a - b for a <= 19, b <= 9 (b <= a for subtraction): 355 facts,
# few enough for a tiny model to see each one often. Chains of single-digit addends keep every
# running sum inside the table.
ADD_MAX_A, ADD_MAX_B = 19, 9
SUB_MAX_A, SUB_MAX_B = 19, 9
QA_MAX = 9  # single-step arithmetic questions: single-digit a, b (155 items of the table)


def _state(rng: random.Random, fact, lang: str) -> str:
    """One statement of `fact` (a world.Fact) in a random statement template of its relation."""
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


