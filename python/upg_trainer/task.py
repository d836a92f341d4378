"""The embedded task: procedurally generated arithmetic word problems with verifiable answers.

Each problem has a prompt ("Tom has 3 apples. He buys 4 more. How many apples does he have now?"),
an integer answer ("7") and a short worked demonstration ("3+4=7. \\boxed{7}"). Difficulty levels:

    1  one addition or subtraction, numbers 0-9
    2  one addition or subtraction, numbers 10-59
    3  two steps (add then subtract), numbers 0-9
    4  one multiplication, factors 2-9
    5  level 1 with a distractor: two kinds of objects, the question is about the second one

Generation is a pure function of (seed, index), so train and held-out sets are reproducible and
disjoint (different seeds). The task ships its own tiny word-level tokenizer
(``assets/tokenizer.json``) and a tiny Qwen2-style model config (``assets/tiny_qwen2.json``).
"""
from __future__ import annotations

import random
import re
from typing import Optional

NAMES = [("Tom", "he"), ("Sam", "he"), ("Leo", "he"), ("Max", "he"),
         ("Ann", "she"), ("Mia", "she"), ("Eva", "she"), ("Zoe", "she")]
OBJECTS = ["apples", "pens", "books", "cards", "coins", "eggs", "cups", "toys"]
LEVELS = (1, 2, 3, 4, 5)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def make_problem(rng: random.Random, level: int) -> dict:
    """One problem of the given level: dict(prompt, answer, demonstration, level)."""
    name, pron = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    if level in (1, 2):
        lo, hi = (0, 9) if level == 1 else (10, 59)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if rng.random() < 0.5:
            c = a + b
            prompt = (f"{name} has {a} {obj}. {_cap(pron)} buys {b} more. "
                      f"How many {obj} does {pron} have now?")
            steps = f"{a}+{b}={c}."
        else:
            a, b = max(a, b), min(a, b)
            c = a - b
            prompt = f"{name} has {a} {obj} and gives {b} away. How many {obj} are left?"
            steps = f"{a}-{b}={c}."
    elif level == 3:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        s = a + b
        d = rng.randint(0, s)
        c = s - d
        prompt = (f"{name} has {a} {obj}, buys {b} more and gives {d} away. "
                  f"How many {obj} are left?")
        steps = f"{a}+{b}={s}. {s}-{d}={c}."
    elif level == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = a * b
        prompt = f"{name} has {a} bags with {b} {obj} in each. How many {obj} are there?"
        steps = f"{a}*{b}={c}."
    elif level == 5:
        other = rng.choice([o for o in OBJECTS if o != obj])
        x, a, b = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            c = a + b
            prompt = (f"{name} has {x} {other} and {a} {obj}. {_cap(pron)} buys {b} more {obj}. "
                      f"How many {obj} does {pron} have now?")
            steps = f"{a}+{b}={c}."
        else:
            a, b = max(a, b), min(a, b)
            c = a - b
            prompt = (f"{name} has {x} {other} and {a} {obj}. {_cap(pron)} gives {b} {obj} away. "
                      f"How many {obj} are left?")
            steps = f"{a}-{b}={c}."
    else:
        raise ValueError(f"unknown level {level}: levels are {LEVELS}")
    return {"prompt": prompt, "answer": str(c), "demonstration": f"{steps} \\boxed{{{c}}}",
            "level": level}


def make_dataset(n: int, seed: int = 0, levels=(1, 2, 3)) -> list[dict]:
    """``n`` problems, levels drawn uniformly from ``levels``; deterministic in ``seed``."""
    if n < 0:
        raise ValueError("n must be >= 0")
    levels = tuple(int(x) for x in levels)
    bad = [lv for lv in levels if lv not in LEVELS]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
    rng = random.Random(f"upg-task-{seed}")
    return [make_problem(rng, rng.choice(levels)) for _ in range(n)]


_BOXED = re.compile(r"\\boxed\s*\{\s*([^{}]*?)\s*\}")


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` in ``text`` (no nested braces), or None."""
    found = _BOXED.findall(text or "")
    return found[-1] if found else None


def verify(completion: str, answer: str) -> float:
    """1.0 if the last boxed answer equals ``answer`` as an integer, else 0.0."""
    got = extract_boxed(completion)
    if got is None:
        return 0.0
    try:
        return float(int(got.replace(" ", "")) == int(str(answer).strip()))
    except ValueError:
        return 0.0


def task_reward(prompts, completions, answer=None, **_):
    """TRL-signature reward for the embedded task (``answer`` column)."""
    if answer is None:
        raise ValueError("task_reward needs the 'answer' column")
    return [verify(c, a) for c, a in zip(completions, answer)]


# ---------------------------------------------------------------- tokenizer (word-level, shipped)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# digits are single tokens without a leading space, so a number copied from the prompt into the
# worked solution is the same token sequence in both places
PRE_TOKENIZE_PATTERN = r" ?[A-Za-z]+|[0-9]|\\boxed\{|[^A-Za-z0-9 ]| "
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer_json(path: str) -> None:
    """(Re)build the shipped word-level tokenizer from the task's own vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    words = set()
    for name, pron in NAMES:
        words |= {name, pron, _cap(pron)}
    words |= set(OBJECTS)
    words |= {"has", "buys", "more", "How", "many", "does", "have", "now", "and", "gives", "away",
              "are", "left", "bags", "with", "in", "each", "there", "Compute", "the", "answer",
              "is", "What"}
    vocab_list = list(SPECIAL_TOKENS)
    vocab_list += sorted({w for w in words} | {" " + w for w in words})
    vocab_list += [str(d) for d in range(10)]
    vocab_list += ["\\boxed{", "}", "{", ".", ",", "?", "!", "+", "-", "*", "/", "=", "(", ")", " ",
                   ":", "\n"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKENIZE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(path)


def load_tokenizer(assets_dir: Optional[str] = None):
    """The shipped tokenizer as a ``PreTrainedTokenizerFast`` with its chat template."""
    import os

    from transformers import PreTrainedTokenizerFast

    d = assets_dir or os.path.join(os.path.dirname(__file__), "assets")
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"),
                                  pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
                                  bos_token=None)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


# ---------------------------------------------------------------- preference pairs (rm / dpo / demo)
def wrong_demonstration(row: dict, rng: random.Random) -> str:
    """The row's worked solution with a wrong final result (its last '=c.' and the boxed answer)."""
    c = int(row["answer"])
    w = c
    while w == c or w < 0:
        w = c + rng.choice([-3, -2, -1, 1, 2, 3])
    demo = row["demonstration"]
    head, sep, _tail = demo.rpartition(f"={c}.")
    if not sep:
        raise ValueError(f"demonstration {demo!r} has no final '={c}.'")
    return f"{head}={w}. \\boxed{{{w}}}"


def add_preference_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    """Rows + ``chosen`` (the correct worked solution) and ``rejected`` (the same with a wrong result):
    the embedded task as TRL-style ``prompt/chosen/rejected`` preference data; deterministic in ``seed``."""
    rng = random.Random(f"upg-pairs-{seed}")
    return [dict(r, chosen=r["demonstration"], rejected=wrong_demonstration(r, rng)) for r in rows]
