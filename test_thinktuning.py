"""Tests for thinktuning.py: CPU only, offline, tiny models built in code.

Expected values are worked out by hand (or by an independent formula written here), never taken from the
function under test.
"""
import ast
import functools
import hashlib
import html
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from html.parser import HTMLParser
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

# Grading a class: THINKTUNING_FILE=path/to/a/student's/thinktuning.py tests that file instead of the neighbour
# (python test_thinktuning.py --grade FILES... runs the exercises' tests on each and prints a table; README).
GRADING = os.environ.get("THINKTUNING_FILE")
if GRADING:
    import importlib.util  # noqa: E402
    _spec = importlib.util.spec_from_file_location("thinktuning", GRADING)
    tt = sys.modules["thinktuning"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(tt)
else:
    import thinktuning as tt  # noqa: E402

# One thread: tiny models gain nothing from a second one, and on a busy 2-core machine two threads wait on
# each other (measured: the learning tests took 75 s with two threads, 10 s with one).
torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------- exercises
# In a handout (python thinktuning.py --exercise NAME > handout/thinktuning.py) some functions are stubs. A unit
# test that reaches a stub other than the one it tests is skipped, so that `pytest -k NAME` goes green exactly
# when NAME is written; end-to-end tests are never skipped: they are the integration gate.
STUB = "exercise: write"


def _names_used(tree, prefix=""):
    """Module-level names a syntax tree refers to: `tt.x` as 'tt.x', bare names as prefix + name."""
    out = set()
    for x in ast.walk(tree):
        if isinstance(x, ast.Attribute) and isinstance(x.value, ast.Name) and x.value.id == "tt":
            out.add("tt." + x.attr)
        elif isinstance(x, ast.Name):
            out.add(prefix + x.id)
    return out


@functools.lru_cache(maxsize=None)
def _call_graph():
    """Who refers to whom, over the functions of thinktuning.py ('tt.x') and of this file (bare names)."""
    graph = {}
    for module, prefix in ((tt, "tt."), (sys.modules[__name__], "")):
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                graph[prefix + node.name] = _names_used(node, prefix)
    return graph


@functools.lru_cache(maxsize=None)
def _stubs():
    return frozenset(n for n in tt.EXERCISES if STUB in inspect.getsource(getattr(tt, n)))


@pytest.fixture(autouse=True)
def _skip_when_another_exercise_is_a_stub(request):
    stubs = _stubs()
    name = request.node.originalname
    if not stubs or "end_to_end" in name or GRADING:  # when grading, a test that needs an unwritten exercise fails
        return
    graph, seen, todo = _call_graph(), set(), [name]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += graph.get(n, ())
    missing = sorted(s for s in stubs if "tt." + s in seen and not name.startswith(f"test_{s}_"))
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, an exercise not written yet")


# --------------------------------------------------------------------------------------------- fixtures
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TAGS = ["<opinion>", "</opinion>", "<reason>", "</reason>", "<phrase>", "</phrase>"]
WORDS = ["<unk>", "user", "assistant", "system", "correct", "incorrect", "checked", "answer", "the", "is", "so",
         "wait", "boxed", "\\", "{", "}", ".", ",", ":", "+", "-", "=", "x"] + [str(d) for d in range(10)] \
    + [f"w{i}" for i in range(60)]
# The reply a "bigram" model writes greedily after the assistant header: a well-formed teacher reply.
CHAIN = ["assistant", "<opinion>", "correct", "</opinion>", "<reason>", "checked", "</reason>", "<phrase>", "so",
         "\\", "boxed", "{", "5", "}", "</phrase>", "<|im_end|>"]


def make_tokenizer():
    """Word-level tokenizer with a ChatML template; pad == EOS on purpose (as in many real models)."""
    vocab = {w: i for i, w in enumerate(["<|im_start|>", "<|im_end|>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<unk>", chat_template=CHAT)


def make_model(tok, seed=0):
    # Llama: AutoTokenizer maps qwen2 folders to Qwen2Tokenizer, which would swap in its own pre-tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def make_bigram_model(tok, scale=0.25, chain=CHAIN):
    """A real transformer whose layers write nothing (zeroed output projections), so its next-token logits
    depend on the current token only; the LM head is set so that CHAIN is its most likely path. Greedy, it
    writes a valid teacher reply; sampled at T=1, it does so about 80% of the time."""
    model = make_model(tok)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = model.lm_head.weight
        head.zero_()
        hidden = model.model.norm(model.model.embed_tokens.weight)  # what reaches the head for each token
        ids = tok.convert_tokens_to_ids(chain)
        for a, b in zip(ids, ids[1:]):
            head[b] += scale * hidden[a]
    return model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("models")
    for name, model in (("random", make_model(tok)), ("bigram", make_bigram_model(tok))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"random": str(root / "random"), "bigram": str(root / "bigram")}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"question": f"w{i} is 2 + 3", "answer": f"w{i} w{i + 1}\n#### {5 if i % 2 == 0 else 7}"}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(argv):
    return tt.main([str(a) for a in argv])


def rollout(response, prompt=(0, 4), **fields):
    """A Rollout with the given response ids (and prompt ids), finished; other fields by keyword."""
    return tt.Rollout("q", "5", list(prompt), list(response), finished=True, **fields)


# --------------------------------------------------------------------------------------------- grader
# (response, gold, expected). Our own cases across the grader's categories (README, "The grader"), right and wrong.
GRADER_CASES = [
    # boxed answers, nested braces
    ("So the total is 18 + 4 = 22.\n\n\\boxed{22}", "22", True),
    ("The sum is \\boxed{21}.", "22", False),
    ("Thus $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),
    ("Thus $x = \\boxed{\\frac{1}{3}}$.", "\\frac{1}{2}", False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{\\dfrac{\\sqrt3}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{3}}{2}", False),
    ("The answer is $\\boxed 7$.", "7", True),
    ("The answer is $\\boxed 8$.", "7", False),
    ("\\fbox{42}", "42", True),
    ("First I thought \\boxed{10}, but recomputing gives \\boxed{12}.\n\nSo the answer is \\boxed{12}.", "12", True),
    ("First I thought \\boxed{10}, but recomputing gives\n\n\\boxed{12}", "10", False),
    ("\\boxed{}", "0", False),
    ("\\boxed{ }", "0", False),
    ("the area is \\boxed{10\\sqrt{2}}", "10\\sqrt{2}", True),
    ("the area is \\boxed{10\\sqrt2}", "10\\sqrt{2}", True),
    ("the area is \\boxed{10\\sqrt{3}}", "10\\sqrt{2}", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{\\text{Evelyn}}", "Evelyn", True),
    ("\\boxed{\\text{Alice}}", "Evelyn", False),
    ("\\boxed{x^2 + 2x + 1}", "x^2+2x+1", True),
    ("\\boxed{x^2 + 2x - 1}", "x^2+2x+1", False),
    # equivalent numbers: 1/2 vs 0.5 vs \frac12, and near misses
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac12}", "0.5", True),
    ("\\boxed{1/2}", "\\frac{1}{2}", True),
    ("\\boxed{0.05}", "0.5", False),
    ("\\boxed{0.5}", "0.05", False),
    ("\\boxed{.5}", "0.5", True),
    ("\\boxed{2.50}", "2.5", True),
    ("\\boxed{2.05}", "2.5", False),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", True),
    ("\\boxed{\\frac{-3}{4}}", "-\\frac{3}{4}", True),
    ("\\boxed{\\frac{3}{4}}", "-\\frac{3}{4}", False),
    ("\\boxed{1\\frac{4}{5}}", "\\frac{9}{5}", True),
    ("\\boxed{1 4/5}", "1.8", True),
    ("\\boxed{1\\frac{4}{5}}", "\\frac{4}{5}", False),
    ("\\boxed{0.\\overline{3}}", "\\frac{1}{3}", True),
    ("\\boxed{0.1\\overline{6}}", "\\frac{1}{6}", True),
    ("\\boxed{0.33}", "\\frac{1}{3}", False),
    ("\\boxed{3.14}", "\\pi", False),
    ("\\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}", False),
    ("\\boxed{\\frac{1}{2^{99}}}", "\\frac{1}{2^{99}}", True),
    ("\\boxed{10}", "10.0", True),
    ("\\boxed{100}", "10", False),
    ("\\boxed{1e3}", "1000", False),  # not a form we accept: when unsure, wrong
    ("\\boxed{1.5 \\times 10^{3}}", "1500", True),
    ("\\boxed{1.5 \\times 10^{3}}", "150", False),
    ("\\boxed{2 \\cdot 10^{-2}}", "0.02", True),
    ("The answer is $\\boxed {7}$.", "7", True),
    ("So it is \\boxed{5}.\n\nWait, I made a mistake in the second step. The final answer is 7.", "7", True),
    ("So it is \\boxed{5}.\n\nWait, I made a mistake in the second step. The final answer is 7.", "5", False),
    ("So it is \\boxed{5}.\n\nWait, I made a mistake in step 2.", "2", False),  # no new answer given
    # thousands separators vs tuple commas
    ("She earns \\boxed{1,234} dollars.", "1234", True),
    ("She earns \\boxed{1{,}234} dollars.", "1234", True),
    ("She earns \\boxed{12,34} dollars.", "1234", False),
    ("The total is $1,000,000.", "1000000", True),
    ("The total is $1,000,001.", "1000000", False),
    ("\\boxed{(1,2)}", "(1,2)", True),
    ("\\boxed{(1, 2)}", "(1,2)", True),
    ("\\boxed{(2,1)}", "(1,2)", False),
    ("\\boxed{(1,234)}", "(1,234)", True),
    ("\\boxed{(1,234)}", "1234", False),
    # tuples vs intervals
    ("\\boxed{(1,2]}", "(1,2]", True),
    ("\\boxed{(1,2]}", "(1,2)", False),
    ("\\boxed{[1,2)}", "(1,2)", False),
    ("\\boxed{[-1, \\frac{1}{2}]}", "[-1,0.5]", True),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", True),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3)", False),
    ("\\boxed{x \\in [2, 5]}", "[2,5]", True),
    # unordered lists
    ("The solutions are \\boxed{3, -2}.", "-2, 3", True),
    ("The solutions are \\boxed{3, 2}.", "-2, 3", False),
    ("The solutions are \\boxed{3}.", "-2, 3", False),
    ("The solutions are $\\boxed{-2}$ and $\\boxed{3}$.", "-2,3", True),
    # units, degrees, percent, currency
    ("The angle measures \\boxed{90^\\circ}.", "90", True),
    ("The angle measures \\boxed{90^{\\circ}}.", "90", True),
    ("The angle measures \\boxed{45^\\circ}.", "90", False),
    ("\\boxed{25\\%}", "25", True),
    ("\\boxed{25\\%}", "0.25", False),
    ("\\boxed{\\$18.00}", "18", True),
    ("\\boxed{\\$18.50}", "18", False),
    ("\\boxed{12 \\text{ cm}^2}", "12", True),
    ("\\boxed{12\\mbox{ inches}}", "12", True),
    ("\\boxed{13 \\text{ cm}}", "12", False),
    ("The answer is 5 apples.", "5", True),
    ("The answer is 6 apples.", "5", False),
    ("\\boxed{\\text{north}}", "north", True),
    ("\\boxed{\\text{North}}", "north", True),
    ("\\boxed{\\text{south}}", "north", False),
    # equations: the right side, unless the gold is an equation
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{x=6}", "5", False),
    ("\\boxed{2 + 3 = 5}", "5", True),
    ("\\boxed{y = 2x + 3}", "y=2x+3", True),
    ("\\boxed{y = 2x + 4}", "y=2x+3", False),
    ("\\boxed{k = -\\frac{1}{2}}", "-\\frac12", True),
    # <answer> tags and answer phrases
    ("<think>2+2</think><answer>4</answer>", "4", True),
    ("<answer>5</answer>", "4", False),
    ("After adding everything, the final answer is 72.", "72", True),
    ("After adding everything, the final answer is 73.", "72", False),
    ("Final Answer: 1,080", "1080", True),
    ("Final Answer: $11,\\! 111,\\! 111,\\! 100$", "11,\\! 111,\\! 111,\\! 100", True),  # \\! is a thin space
    ("Final Answer: $\\frac{3}{5}$", "0.6", True),
    ("Final Answer: $\\frac{3}{5}$", "0.5", False),
    ("So the answer is:\n\n15", "15", True),
    ("So, the final answer is:\n\n$$\n\\frac{3}{4}\n$$", "0.75", True),
    ("So, the final answer is:\n\n$$\n\\frac{3}{4}\n$$", "\\frac{4}{3}", False),
    ("The final answer is:\n\\[\nx = 12\n\\]\nThis completes the solution.", "12", True),
    ("The final answer is:\n\\[\n\\frac{15}{1500} = 25\n\\]", "9", False),
    ("So the answer is:\n$$\n\\frac{1}{2", "\\frac{1}{2}", False),  # block never closed
    ("The answer is 18. I hope this helps!", "18", True),
    ("The answer is $18.50. That is what she pays.", "18.5", True),
    ("The answer is 3.5 hours.", "3.5", True),
    ("The answer is 35 hours.", "3.5", False),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", True),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 71", "72", False),
    ("**Final Answer:** **42**", "42", True),
    # last-number fallback: only from the final sentence or line
    ("She buys 3 packs of 4 pens. 3 * 4 = 12 pens in total.", "12", True),
    ("She buys 3 packs of 4 pens. So she has 12 pens.", "13", False),
    ("She buys 3 packs of 4 pens, so 3 * 4 = 12.\nThat means she has", "12", False),
    ("There are 12 eggs in a dozen. Then she", "12", False),
    ("She starts with 20 apples and gives away 5.\n\nLet me set up the equation", "15", False),
    ("Step 1: 20 - 5 = 15\nStep 2: 15 * 2 = 30", "30", True),
    ("", "5", False),
    ("I am not sure how to solve this.", "5", False),
    # hedges and retractions
    ("The answer is 18 or 20.", "18", False),
    ("The answer is 18 or 20.", "20", False),
    ("It is either \\boxed{18} or \\boxed{20}.", "18", False),
    ("The answer is 5. Or maybe 6.", "5", False),
    ("The answer is \\boxed{5}. Or 6, if the discount applies.", "5", False),
    ("The answer is \\boxed{5}. Or, to put it in words, five.", "5", True),
    ("So x is \\boxed{4} or \\boxed{5}", "5", False),
    ("The answer is \\boxed{12}. Wait, that's wrong, I double counted.", "12", False),
    ("The answer is 12. Actually, I made a mistake in step 2.", "12", False),
    ("The answer is \\boxed{12}. Hold on, I made an error.", "12", False),
    ("Wait, I made a mistake earlier. Recomputing: the answer is \\boxed{14}.", "14", True),
    ("The answer is \\boxed{12}.\n\nLet me double check: 3 * 4 = 12. Yes.", "12", True),
    ("The answer is \\boxed{12}.", "12.0", True),
    ("\\boxed{12}\n\nWait, let me double-check: 3 x 4 = 12. Yes, that's right.", "12", True),
    ("So there are \\boxed{63} points. It is a common mistake to count the squares instead, which gives 48.", "63", True),
    ("The answer is \\boxed{12}. Wait, no, I should subtract first.", "12", False),
    ("d = 15.975 inches, that is $\\boxed{15\\frac{39}{40}}$, or $\\boxed{\\frac{639}{40}}$ inches.", "\\frac{639}{40}", True),
    ("So, the final answer is 156 + 30 = 186 cents.", "186", True),
    ("So, the final answer is 156 + 30 = 186 cents.", "156", False),
    ("So John spends 60 minutes driving, which is 4 * 60 =", "60", False),  # cut off mid-equation
    ("The profit is 1.2% of 8,000, which is 0.012 * 8,", "8", False),
    ("The volume is $45\\times 10^{-2}$ cubic cm.", "-2", False),  # an exponent is not the answer
    ("The volume is $45\\times 10^{-2}$ cubic cm.", "45", False),  # not a committed answer either
    ("$180 + 24 = 204$. -sepehr2010", "2010", False),  # digits glued to a name
    ("The answer is (B) because the others violate energy conservation.", "B", True),
    ("The answer is A reasonable guess would be (C).", "A", False),  # a capital starting a word is no letter
    ("The correct answer is a combination of both effects.", "A", False),
    ("The answer is \\boxed{12.5}.", "12", False),
    # truncated inside a box
    ("Therefore the answer is \\boxed{\\frac{1}{2", "\\frac{1}{2}", False),
    ("Therefore the answer is \\boxed{3", "3", False),
    # multiple choice letters (GPQA style)
    ("Comparing the options, the answer is (B).", "B", True),
    ("Comparing the options, the answer is (C).", "B", False),
    ("Reasoning...\n\nAnswer: B", "B", True),
    ("Reasoning...\n\nAnswer: D", "B", False),
    ("**Answer: C**", "C", True),
    ("**Answer: A**", "C", False),
    ("\\boxed{B}", "B", True),
    ("\\boxed{\\text{(B)}}", "B", True),
    ("\\boxed{(D)}", "B", False),
    ("The correct option is B) 42 kJ.", "B", True),
    ("Final answer: b", "B", True),
    ("Because B is a base and A is an acid, C must be right.\n\nThe answer is (C).", "C", True),
    ("Because B is a base and A is an acid.", "B", False),  # a letter in the text is not an answer
    ("Option A seems plausible, and so does B.", "A", False),
    ("The final answer is \\boxed{A}", "B", False),
    ("After careful thought:\n(A)", "A", True),
    ("After careful thought:\n(A)", "D", False),
    # GSM8K-style full outputs
    ("Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 eggs remain. She sells "
     "them at $2 each, so she makes 9 * 2 = $18.\n\n\\boxed{18}", "18", True),
    ("Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 eggs remain. She sells "
     "them at $2 each, so she makes 9 * 2 = $18.\n\n\\boxed{16}", "18", False),
    ("A robe takes 2 bolts of blue fiber and half that much white fiber. 2 / 2 = 1 bolt of white. Total: 2 + 1 = "
     "3 bolts.\nThe answer is 3.", "3", True),
    ("He bought the house for $80,000 and put in $50,000 of repairs, so the cost is $130,000. The value went "
     "up to 80,000 * 2.5 = $200,000, so the profit is 200,000 - 130,000 = \\boxed{\\$70,000}.", "70000", True),
    ("He bought the house for $80,000 and put in $50,000 of repairs, so the cost is $130,000. The value went "
     "up to 80,000 * 2.5 = $200,000, so the profit is \\boxed{\\$200,000}.", "70000", False),
    # MATH-style
    ("Completing the square, $(x-3)^2 + (y+1)^2 = 4$, so the center is $\\boxed{(3, -1)}$.", "(3,-1)", True),
    ("Completing the square, the center is $\\boxed{(-3, 1)}$.", "(3,-1)", False),
    ("The remainder is $\\boxed{\\textbf{(4)}}$", "4", True),
    ("So $a+b = \\boxed{\\left( \\frac{1}{2}, 3 \\right)}$", "(\\frac{1}{2},3)", True),
    ("The matrix is $\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}$.",
     "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("The matrix is $\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}}$.",
     "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False),
    ("The base is $\\boxed{2516_8}$.", "2516_8", True),
    ("The base is $\\boxed{2561_8}$.", "2516_8", False),
    # AIME-style integers
    ("Therefore $m+n = \\boxed{033}$.", "33", True),
    ("Therefore $m+n = \\boxed{330}$.", "33", False),
    ("Therefore $m+n = 204$.", "204", True),
]


@pytest.mark.parametrize("response,gold,expected", GRADER_CASES)
def test_grade_cases(response, gold, expected):
    assert tt.grade(response, gold) is expected


def test_grade_case_balance():
    # the cases hold right and wrong answers in similar numbers, and grade credits exactly the right ones
    right = sum(e for *_, e in GRADER_CASES)
    assert len(GRADER_CASES) >= 150 and 0.4 < right / len(GRADER_CASES) < 0.6
    assert sum(tt.grade(r, g) for r, g, _ in GRADER_CASES) == right


def test_extract_answer_uses_brace_counting():
    assert tt.extract_answer("so \\boxed{\\frac{a}{b^{2}}} done") == "\\frac{a}{b^{2}}"
    assert tt.extract_answer("\\boxed{1}.\n\nSo \\boxed{\\{2, 3\\}}") == "\\{2, 3\\}"


def test_normalize_answer_rules():
    assert tt.normalize_answer("\\left( 1,2 \\right)") == "(1,2)"
    assert tt.normalize_answer("\\$1,234.50") == "1234.50"
    assert tt.normalize_answer("\\tfrac12") == "\\frac{1}{2}"
    assert tt.normalize_answer("x = \\sqrt2") == "\\sqrt{2}"
    assert tt.normalize_answer("(1,234)") == "(1,234)"  # tuple commas stay


def test_to_number_exact():
    F = tt.Fraction
    assert tt.to_number("0.\\overline{142857}") == F(1, 7)
    assert tt.to_number("2\\frac{1}{3}") == F(7, 3)
    assert tt.to_number("-2\\frac{1}{3}") == F(-7, 3)
    assert tt.to_number("3/0") is None
    assert tt.to_number("\\sqrt{2}") is None


def test_grade_fuzz_no_exceptions_and_bounded_time():
    rnd = random.Random(1234)
    pieces = ["\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "{{", "}}", "1", "22", "3.5", "1,000", "\\frac", "x=",
              " or ", "The answer is ", "Final Answer:", "####", ". ", "\n", "$", "\\text{", "(", ")", "[", "]",
              "<answer>", "</answer>", "wait", "a", " ", "\\overline{", "-", "/", "^\\circ", "%", ","]
    worst = 0.0
    for n in (10, 100, 1000, 20000):
        for _ in range(20):
            text = "".join(rnd.choice(pieces) for _ in range(n))[:100_000]
            t0 = time.perf_counter()
            tt.grade(text, "1")
            tt.grade(text, "(1,2)")
            tt.grade(text, "B")
            worst = max(worst, time.perf_counter() - t0)
    # hand-made adversarial inputs: unclosed boxes, deep braces, long digit runs, many phrases
    for text in ["\\boxed{" * 14000, "{" * 100_000, "\\boxed{" + "{" * 99_000, "9" * 100_000,
                 "The answer is " * 7000, "1," * 50_000, ("\\frac" * 20000)[:100_000], "a or " * 20000,
                 "\\boxed{" + "1" * 99_990 + "}", "<answer>" * 12000]:
        t0 = time.perf_counter()
        for gold in ("1", "(1,2)", "B"):
            assert tt.grade(text, gold) in (True, False)
        worst = max(worst, (time.perf_counter() - t0) / 3)
    assert worst < 1.0, f"slowest 100 kB grade took {worst:.3f} s"  # generous: a quadratic rule takes many seconds


# --------------------------------------------------------------------------------------------- grader: symbolic equivalence
EQUIVALENT = [
    ("\\frac{5a+2}{9}", "\\frac{2+5a}{9}"),
    ("4(n-3)", "4n-12"),
    ("-q+p", "p-q"),
    ("\\frac{s}{7}+\\frac{3}{7}", "\\frac{s+3}{7}"),
    ("\\sqrt{72}", "6\\sqrt2"),
    ("\\sqrt{50}", "5\\sqrt{2}"),
    ("\\frac{6}{\\sqrt3}", "2\\sqrt3"),
    ("2\\pi+7", "7+2\\pi"),
    ("\\frac{3}{4}\\sqrt5", "\\frac{3\\sqrt5}{4}"),
    ("-5i+1", "1-5i"),
    ("(x+1)^2", "x^2+2x+1"),
    ("x^2-9", "(x-3)(x+3)"),
    ("2x \\cdot 3y", "6xy"),
    ("a \\times b", "b \\cdot a"),
    ("\\dfrac{\\pi}{4}", "\\frac{1}{4}\\pi"),
    ("\\sqrt[3]{16}", "2\\sqrt[3]{2}"),
    ("e^{i\\pi}", "-1"),
    ("\\sin^2 x + \\cos^2 x + x", "x + 1"),
    ("\\ln(e^3)", "3"),
    ("\\log 1000", "3"),
    ("\\exp(0)", "1"),
    ("\\frac{1}{2}x", "\\frac{x}{2}"),
    ("0.5x", "\\frac{x}{2}"),
    ("\\sqrt{\\frac{9}{16}}", "0.75"),
    ("2^{10}", "1024"),
    ("(2+3i)(2-3i)", "13"),
]
NOT_EQUIVALENT = [
    ("\\frac{5a+2}{9}", "\\frac{5a+3}{9}"),
    ("4(n-3)", "4n-3"),
    ("p-q", "q-p"),
    ("\\sqrt{72}", "6\\sqrt3"),
    ("2\\pi+7", "7\\pi+2"),
    ("-5i+1", "1+5i"),
    ("x^2-9", "(x-3)^2"),
    ("6xy", "6x"),  # a dropped variable
    ("6x", "6t"),  # another variable
    ("3.14159265", "\\pi"),  # a decimal never equals an irrational
    ("1.41421356237", "\\sqrt2"),
    ("0.3333333333333", "\\frac{1}{3}"),  # plain numbers compare exactly
    ("0.3333333333333x", "\\frac{x}{3}"),  # so do rational expressions, at rational points
    ("\\frac{1}{3^{40}}", "\\frac{1}{3^{41}}"),
    ("1000000001", "1000000000"),
    ("\\log 1000", "\\ln 1000"),
    ("\\sin(2x)", "2\\sin x"),
    ("2e", "5.43656365692"),
    ("north", "thorn"),  # words are text, not products of letters
    ("\\text{no}", "\\text{on}"),
    ("1/2x", "\\frac{x}{2}"),  # ambiguous: refused rather than guessed
]


@pytest.mark.parametrize("pred,gold", EQUIVALENT)
def test_answers_match_equivalent_forms(pred, gold):
    assert tt.answers_match(pred, gold) and tt.answers_match(gold, pred)


@pytest.mark.parametrize("pred,gold", NOT_EQUIVALENT)
def test_answers_match_refuses_other_values(pred, gold):
    assert not tt.answers_match(pred, gold) and not tt.answers_match(gold, pred)


def test_grade_equivalent_boxed_expression():
    assert tt.grade("Combining the fractions gives $\\boxed{\\frac{2+5a}{9}}$.", "\\frac{5a+2}{9}")
    assert tt.grade("So the area is $\\boxed{\\sqrt{72}}$ square units.", "6\\sqrt{2}")
    assert not tt.grade("So the area is $\\boxed{\\sqrt{73}}$ square units.", "6\\sqrt{2}")


def test_answers_match_unparseable_falls_back_to_strings():
    assert tt.answers_match("\\infty", "\\infty")
    assert not tt.answers_match("\\infty", "-\\infty")
    assert tt.answers_match("x\\pm2", "x\\pm 2")  # \pm is no operator we know: the same string still counts


def test_answers_match_bounded_parser():
    assert not tt.answers_match("2^{2^{2^{2^{2^{2}}}}}", "2")  # a tower is refused, not computed
    assert not tt.answers_match("\\frac{1}{0}", "1")
    assert not tt.answers_match("(" * 300 + "1" + ")" * 300, "2")
    assert tt.answers_match("(" * 12 + "y+1" + ")" * 12, "1+y")  # real nesting is fine ...
    assert not tt.answers_match("(" * 60 + "y+1" + ")" * 60, "1+y")  # ... 60 levels is an attack, refused
    assert tt.answers_match("\\frac{1}{2^{300}}", "2^{-300}")


# --------------------------------------------------------------------------------------------- grader: property test
def _poly(rnd, names):
    """A random sum of terms c * x^k * y^m as (coefficient, exponents) pairs."""
    terms = {}
    for _ in range(rnd.randint(2, 4)):
        exps = tuple(rnd.randint(0, 2) for _ in names)
        terms[exps] = terms.get(exps, 0) + rnd.choice([-5, -3, -2, -1, 1, 2, 3, 4, 7])
    return [(c, e) for e, c in terms.items() if c]


def _latex(terms, names, shuffle=None):
    """LaTeX of a term list; shuffle (a Random) commutes the terms and the factors inside each term."""
    terms = list(terms)
    if shuffle:
        shuffle.shuffle(terms)
    out = ""
    for c, exps in terms:
        factors = [f"{v}^{{{k}}}" if k > 1 else v for v, k in zip(names, exps) if k]
        if shuffle:
            shuffle.shuffle(factors)
        body = "".join(factors)
        coef = str(abs(c)) if abs(c) != 1 or not body else ""
        out += ("-" if c < 0 else "+" if out else "") + coef + body
    return out


@pytest.mark.parametrize("seed", range(40))
def test_answers_match_property_rewrites(seed):
    rnd = random.Random(seed)
    terms = []
    while len(terms) < 2 or all(not any(e) for _, e in terms):  # at least two terms, one with a variable
        names = rnd.sample("abcdmnpqrstuvwxyz", rnd.randint(1, 2))
        terms = _poly(rnd, names)
    gold = _latex(terms, names)
    # equivalent: commuted terms and factors
    assert tt.answers_match(_latex(terms, names, shuffle=rnd), gold)
    # equivalent: a constant factored out, k(...) and (...)k
    k = rnd.choice([2, 3, 5])
    scaled = _latex([(c * k, e) for c, e in terms], names)
    assert tt.answers_match(f"{k}({gold})", scaled) and tt.answers_match(f"({gold})\\cdot {k}", scaled)
    # equivalent: an expanded product (v + h)(gold) against its expansion
    v, h = names[0], rnd.randint(1, 6)
    expanded = {}
    for c, e in terms:
        for cc, ee in ((c, tuple(x + (i == 0) for i, x in enumerate(e))), (c * h, e)):
            expanded[ee] = expanded.get(ee, 0) + cc
    expanded_latex = _latex([(c, e) for e, c in expanded.items() if c], names, shuffle=rnd)
    assert tt.answers_match(f"({v}+{h})({gold})", expanded_latex)
    # perturbed: one coefficient changed
    i = rnd.randrange(len(terms))
    changed = [(c + (1 if j == i else 0) or 2, e) for j, (c, e) in enumerate(terms)]
    assert not tt.answers_match(_latex(changed, names, shuffle=rnd), gold)
    # perturbed: a variable dropped from one term that has one
    i = next(j for j, (_, e) in enumerate(terms) if any(e))
    c, e = terms[i]
    dropped = terms[:i] + [(c, tuple(0 if x and j == e.index(next(y for y in e if y)) else x
                                     for j, x in enumerate(e)))] + terms[i + 1:]
    assert not tt.answers_match(_latex(dropped, names), gold)


def test_answers_match_property_irrational_rewrites():
    rnd = random.Random(99)
    for _ in range(30):
        a, b, n = rnd.randint(2, 9), rnd.randint(1, 9), rnd.choice([2, 3, 5, 6, 7])
        gold = f"{a}\\sqrt{{{n}}}+{b}\\pi"
        assert tt.answers_match(f"{b}\\pi+\\sqrt{{{a * a * n}}}", gold)
        assert not tt.answers_match(f"{b}\\pi+\\sqrt{{{a * a * n + 1}}}", gold)
        assert not tt.answers_match(f"{b + 1}\\pi+{a}\\sqrt{{{n}}}", gold)


# --------------------------------------------------------------------------------------------- grader: matrices, vectors, bases
def test_answers_match_matrix_any_environment():
    gold = "\\begin{pmatrix} 3/7 \\\\ -2 \\\\ 0.5 \\end{pmatrix}"
    assert tt.answers_match("\\begin{bmatrix}\\frac{3}{7}\\\\-2\\\\\\frac12\\end{bmatrix}", gold)
    assert tt.answers_match("\\begin{array}{c} \\dfrac{3}{7} \\\\ -2 \\\\ 1/2 \\end{array}", gold)
    assert not tt.answers_match("\\begin{bmatrix}\\frac{3}{7}\\\\2\\\\\\frac12\\end{bmatrix}", gold)
    assert not tt.answers_match("\\begin{bmatrix}\\frac{3}{7}\\\\-2\\end{bmatrix}", gold)  # another shape
    assert not tt.answers_match("\\begin{pmatrix} 3/7 & -2 & 0.5 \\end{pmatrix}", gold)  # a row, not a column
    m = "\\begin{vmatrix} 1 & \\sqrt{8} \\\\ x+x & 0 \\end{vmatrix}"
    assert tt.answers_match(m, "\\begin{pmatrix} 1 & 2\\sqrt2 \\\\ 2x & 0 \\end{pmatrix}")


def test_grade_matrix_in_box():
    response = "Hence $\\mathbf{v} = \\boxed{\\begin{pmatrix} \\frac{4}{9} \\\\ 1 \\end{pmatrix}}$."
    assert tt.grade(response, "\\begin{pmatrix} 4/9 \\\\ 1 \\end{pmatrix}")
    assert not tt.grade(response, "\\begin{pmatrix} 9/4 \\\\ 1 \\end{pmatrix}")


def test_answers_match_base_subscripts_as_written():
    assert tt.answers_match("1022_{3}", "1022_3")
    assert tt.answers_match("\\boxed{}", "") is False
    assert not tt.answers_match("1022", "1022_3")
    assert not tt.answers_match("1022_{3}", "1022")
    assert not tt.answers_match("1022_{4}", "1022_3")


def test_normalize_answer_base_subscript():
    assert tt.normalize_answer("413_{5}") == tt.normalize_answer("413_5") == "413_5"


# --------------------------------------------------------------------------------------------- grader: units, letters, scale words
@pytest.mark.parametrize("pred,gold", [
    ("48 \\text{ km}", "48"), ("15\\text{ cm}^2", "15"), ("\\$7.25", "7.25"), ("12 \\mbox{ minutes}", "12"),
    ("30^\\circ", "30"), ("30 \\text{ degrees}", "30"), ("9 \\text{ square feet}", "9"), ("65 mph", "65"),
    ("2.5 \\text{ hours}", "\\frac{5}{2}"), ("\\frac{3}{4} \\text{ cups}", "0.75"), ("20 \\text{ sq units}", "20"),
])
def test_answers_match_known_units_are_dropped(pred, gold):
    assert tt.answers_match(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("9t", "9"), ("2i", "2"), ("5", "5m"), ("8", "8k^2"), ("4", "4i"), ("3\\pi", "3"),
    ("6 \\text{ hundred}", "6"), ("6 \\text{ hundred}", "600"), ("4 thousand", "4"), ("3 dozen", "3"),
    ("2 \\text{ million}", "2"),
])
def test_answers_match_letters_and_scale_words_are_kept(pred, gold):
    assert not tt.answers_match(pred, gold) and not tt.answers_match(gold, pred)


def test_grade_units_on_both_sides():
    assert tt.grade("The rope is \\boxed{14 \\text{ meters}} long.", "14\\text{ m}") is False  # m is a letter
    assert tt.grade("The rope is \\boxed{14 \\text{ meters}} long.", "14\\text{ meters}")
    assert tt.grade("The answer is 14 meters.", "14")
    assert not tt.grade("\\boxed{9r^2}", "9")
    assert not tt.grade("\\boxed{9}", "9r^2")
    assert not tt.grade("The answer is 3 dozen.", "3")
    assert not tt.grade("The answer is 2 thirds.", "2")
    assert tt.grade("The answer is 31 marbles.", "31")
    # a count noun after the result of a sum, as a small model learns to write it (these were graded wrong)
    assert tt.grade("There are 3 birds and 5 more land.\nThe answer is 3 + 5 = 8 birds.", "8")
    assert tt.grade("The answer is 6 + 5 = 11 birds on the tree now.", "11")
    assert tt.grade("So the final answer: 1 apples + 7 apples = 8 apples", "8")
    assert not tt.grade("The answer is 6 + 5 = 11 birds on the tree now.", "6")
    assert not tt.grade("The answer is 2 + 3 = 5 dozen.", "5") and not tt.grade("The answer is 2 x 2 = 4 m.", "4")
    assert not tt.grade("The answer is 2 and three.", "2") and not tt.grade("The answer is x = 2 and three", "2")


@pytest.mark.parametrize("response,gold,expected", [
    # an explanation after the answer is not the answer (a false positive for 24 and 3 before)
    ("The answer is 30, since 5 * 7 = 35.", "35", False), ("The answer is 30, since 5 * 7 = 35.", "30", True),
    ("The answer is 14 pencils, which is 2 pencils per box.", "2", False),
    ("The answer is 14 pencils, which is 2 pencils per box.", "14", True),
    ("The answer is 25 cookies, which is 5 more than 20.", "25", True),
    ("The answer is 25 (because 17 + 8 = 25).", "25", True), ("The answer is 9 (marbles).", "9", True),
    ("The answer is 9 (or 10).", "9", False),  # a hedge in brackets still refuses
    ("The answer is 30, not 35.", "30", True), ("The answer is 30, not 35.", "35", False),
    ("The smallest $n$ is 14, which is even.", "14", True),
    ("The answer is x = 4, y = 9.", "9", False),  # a list of values, not the value of its last equation
    # a sign before a currency symbol, and a markdown bullet that is no sign
    ("So the account ends at -$12.", "12", False), ("So the account ends at -$12.", "-12", True),
    ("The answer is:\n- 21 dollars", "21", True), ("The answer is:\n- 21 dollars", "-21", False),
    # a comment after the answer is not a later answer
    ("The answer is 16.\nThe answer is correct.", "16", True), ("#### 16\nMy answer is verified.", "16", True),
    # a count noun inside a box or math: the number; a scale word still is not
    ("\\boxed{16 \\text{ eggs}}", "16", True), ("\\boxed{6 apples}", "6", True),
    ("The answer is $9\\text{ birds}$.", "9", True), ("\\boxed{9 \\text{ hundred}}", "9", False),
    ("Step 1: find the answer: 20 - 4 - 6 = 10.\nStep 2: 10 * 3 = 30.\nSo Ana earns $30 a day.", "10", False),
    ("Step 1: find the answer: 20 - 4 - 6 = 10.\nStep 2: 10 * 3 = 30.\nSo Ana earns $30 a day.", "30", True),
    ("The answer is 3 pairs.", "3", False), ("The answer is `42`.", "42", True),  # markdown code
])
def test_grade_explanations_comments_and_count_nouns(response, gold, expected):
    assert tt.grade(response, gold) is expected


def test_normalize_answer_units():
    assert tt.normalize_answer("12 \\text{ inches}") == "12"
    assert tt.normalize_answer("7y") == "7y"
    assert tt.normalize_answer("5 \\text{ hundred}") == "5hundred"


# --------------------------------------------------------------------------------------------- grader: relations
@pytest.mark.parametrize("pred", ["z != 11", "z <= 11", "z >= 11", "z < 11", "z > 11", "z \\le 11", "z \\ge 11",
                                  "z \\leq 11", "z \\geq 11", "z \\neq 11", "z \\ne 11", "z ≤ 11"])
def test_answers_match_relation_is_not_its_right_side(pred):
    assert not tt.answers_match(pred, "11")


def test_answers_match_relation_against_relation_gold():
    assert tt.answers_match("z \\le 11", "z\\le11")
    assert tt.answers_match("t = 11", "11")  # an equation still gives its right side
    assert tt.answers_match("t = 0", "0") and tt.answers_match("3 - 3 = 0", "0")
    assert not tt.answers_match("2a + 3b - 6 = 0", "0")  # ... but an equation set to zero is not the value 0


@pytest.mark.parametrize("response", [
    "So the count is not 11.", "Then we need z > 11.", "Let's check whether 11 fits.", "Does 11 satisfy it?",
    "The value is at least 11.", "Suppose the answer were 11.", "This means z \\geq 11.", "It cannot be 11.",
])
def test_grade_noncommittal_final_sentence(response):
    assert not tt.grade("We try a few values.\n\n" + response, "11")


def test_grade_committed_final_sentence_still_counts():
    assert tt.grade("We try a few values.\n\nSo she has 11 stickers left.", "11")
    assert tt.grade("Adding up, 5 + 6 = 11.", "11")


# --------------------------------------------------------------------------------------------- grader: commas
def test_normalize_answer_decimal_comma():
    assert tt.normalize_answer("2{,}75") == "2.75"
    assert tt.normalize_answer("12{,}500") == "12500"
    assert tt.normalize_answer("1{,}234{,}567") == "1234567"


@pytest.mark.parametrize("response,gold,expected", [
    ("\\boxed{2{,}75}", "275", False), ("\\boxed{2{,}75}", "2.75", True), ("\\boxed{12{,}500}", "12500", True),
    ("\\boxed{7, 250}", "7250", False), ("The answer is 7, 250.", "7250", False),
    ("\\boxed{314, 159, 265}", "314159265", False), ("\\boxed{4,321,000}", "4321000", True),
    ("\\boxed{43,21}", "4321", False), ("Final answer: 12,500", "12500", True),
])
def test_grade_commas(response, gold, expected):
    assert tt.grade(response, gold) is expected


# --------------------------------------------------------------------------------------------- grader: multiple-choice letters
@pytest.mark.parametrize("response", [
    "Reasoning.\n\nAnswer: D.", "Reasoning.\n\n**D**", "Reasoning.\n\n$D$", "Reasoning.\n\n\\boxed{\\textbf{D}}",
    "Reasoning.\n\n\\boxed{D}", "Reasoning.\n\n(D)", "Reasoning.\n\nD)", "The correct option is D.",
    "The answer is option D.", "The answer is (D)", "Reasoning.\n\nD", "Final answer: **(D)**",
    "\\boxed{\\text{D}}", "The correct choice is $\\mathrm{D}$.",
])
def test_grade_letter_forms(response):
    assert tt.grade(response, "D")
    assert not tt.grade(response, "B")


@pytest.mark.parametrize("response", [
    "Dalton's law applies here.", "Options A and D both seem wrong.", "Reasoning.\n\nAnswer: D or B",
    "The answer is (D) or (B).", "The answer is A, B, C or D.", "Data point D is an outlier.",
    "I would go with D if pressed, but B is also possible.",
])
def test_grade_letter_never_from_text(response):
    assert not tt.grade(response, "D")


# --------------------------------------------------------------------------------------------- grader: empty boxes, trailing comma
def test_extract_answer_empty_box_does_not_block():
    assert tt.extract_answer("I must put the result in \\boxed{}.\n\nThe final answer is 64.") == "64"
    assert tt.extract_answer("\\boxed{64}\n\n(As requested, the answer is in \\boxed{}.)") == "64"
    assert tt.extract_answer("Format: \\boxed{ }. Work... so \\boxed{64}. Done, see \\boxed{}") == "64"
    assert tt.extract_answer("\\boxed{}") is None


def test_grade_trailing_comma_after_committed_answer():
    assert tt.grade("Adding the three parts, the answer is 305,", "305")
    assert not tt.grade("Adding the three parts, the answer is 305,", "30")
    assert not tt.grade("Adding the three parts gives 305,", "305")  # not committed: cut off mid-list


# --------------------------------------------------------------------------------------------- grader: retractions vs checks
@pytest.mark.parametrize("response", [
    "\\boxed{56}\n\nIs that right? Let me recalculate: 7 * 8 = 56. Yes.",
    "So the total is \\boxed{56}.\n\nLet me verify by dividing: 56 / 8 = 7, which matches.",
    "The answer is \\boxed{56}. Let me double-check with another method: 8 + 8 + ... = 56. Confirmed.",
    "So there are \\boxed{56} seats. Choice A is wrong because it forgets the balcony.",
    "The answer is 56. Checking: 7 * 8 = 56, correct.",
    "\\boxed{56}. Let me recalculate.",
    "Final answer: 56\n\nNote that 48 would be a common mistake.",
])
def test_grade_checking_is_not_retracting(response):
    assert tt.grade(response, "56")


@pytest.mark.parametrize("response,old", [
    ("\\boxed{56}\n\nHmm, that's wrong: I forgot the balcony. The answer is 64.", "56"),
    ("The answer is \\boxed{56}. Let me recalculate: 7 * 9 = 63. So the final answer is 63.", "56"),
    ("\\boxed{56}. Actually, I made an error in the second row.", "56"),
    ("The answer is 56. Scratch that, I misread the question.", "56"),
    ("It's 56, or maybe 64.", "56"),
    ("\\boxed{56} or \\boxed{64}", "56"),
    ("Answer: 56 or 64", "56"),
    ("\\boxed{56}\n\nMy answer is incorrect, the rows have 9 seats.", "56"),
])
def test_grade_retraction_or_hedge(response, old):
    assert not tt.grade(response, old)


def test_grade_later_different_answer_replaces_box():
    response = "\\boxed{56}\n\nHmm, that's wrong: I forgot the balcony. The answer is 64."
    assert tt.grade(response, "64")
    assert tt.extract_answer("\\boxed{C}\n\nOn reflection the answer is (B).") == "(B)"


# --------------------------------------------------------------------------------------------- grader: extraction
def test_extract_answer_statement_after_phrase():
    assert tt.extract_answer("Final Answer: The largest possible $n$ is 27.") == "27"
    assert tt.grade("Final Answer: The number of handshakes is 45.", "45")
    assert not tt.grade("Final Answer: The number of handshakes is 45.", "44")
    # two statements in one sentence commit to neither
    assert not tt.grade("Final Answer: The apples are 12 and the pears are 5.", "5")


@pytest.mark.parametrize("marker", ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|im_start|>user\n"])
def test_extract_answer_cut_at_chat_template_marker(marker):
    response = "So she pays \\boxed{36}." + marker + "Now what about \\boxed{99}? The answer is 99."
    assert tt.extract_answer(response) == "36"
    assert tt.grade(response, "36") and not tt.grade(response, "99")


def test_extract_answer_framebox():
    assert tt.extract_answer("so $\\framebox{204}$ minutes in all") == "204"


# --------------------------------------------------------------------------------------------- grader: issue 22
# False positives first: a number read out of the wrong place is a reward an RL policy learns to exploit.
@pytest.mark.parametrize("response,gold,expected", [
    # the final-sentence fallback reads an unboxed math expression as one answer, or none
    ("Dividing, the ratio comes to $\\frac{10}{9}$.", "9", False), ("Dividing, the ratio comes to $\\frac{10}{9}$.",
                                                                    "10/9", True),
    ("So the diagonal measures $4\\sqrt{2}$.", "2", False), ("So the diagonal measures $4\\sqrt{2}$.", "\\sqrt{32}", True),
    ("Hence the ratio is $\\frac{1+\\sqrt{5}}{2}$.", "2", False), ("So the slope is \\frac{7}{3}", "3", False),
    ("So the slope is \\frac{7}{3}", "7/3", False), ("\\frac{7}{3}", "7/3", True), ("\\frac{7}{3}", "3", False),
    ("We get \\[\n x = \\frac{7}{3}\n\\]", "\\frac73", True), ("Simplify: $(8+4)$", "12", True),
    ("Thus $y \\geq 4$ is the solution.", "y \\ge 4", True), ("Thus $y \\geq 4$ is the solution.", "4", False),
    # a restated given or a side fact in the final sentence is not the answer
    ("So Maya has 15 stickers, which is 3 more than Tom.", "3", False),
    ("So Maya has 15 stickers, which is 3 more than Tom.", "15", True),
    ("Recall that each crate holds 12 melons.", "12", False), ("We are given that the bus carries 40 people.", "40", False),
    # a range or a bound is not its end point
    ("The walk takes 10-15 minutes.", "15", False), ("Prices ran from 10 to 20 dollars.", "20", False),
    ("So she needs more than 10 boxes.", "10", False), ("It costs less than 8 dollars.", "8", False),
    ("So it takes between 4 and 6 hours.", "6", False), ("So 20 - 5 = 15 apples are left.", "15", True),
    # a scale word or a percent sign is part of the value
    ("The town now has 1.5 million people.", "1.5", False), ("The town now has 1.5 million people.", "1500000", True),
    ("They raised 5 thousand dollars.", "5", False), ("\\boxed{0.25\\%}", "0.25", False),
    ("The yearly rate is 0.25\\%.", "0.25", False), ("\\boxed{0.25\\%}", "0.25\\%", True),
    # a correction after the answer is followed; a box the text calls a rejected draft loses
    ("The answer is 15... no, 12.", "15", False), ("Answer: C ... actually it's D", "C", False),
    ("The answer is 15... no, 12.", "12", True), ("Answer: C ... actually it's D", "D", True),
    ("Final answer: 12\n\n(My rejected draft was \\boxed{15}.)", "15", False),
    ("Final answer: 12\n\n(My rejected draft was \\boxed{15}.)", "12", True),
    # a bare list of numbers, and an expression cut off by the length limit, commit to nothing
    ("So the result is $\\frac{3}{4", "4", False),
    ("Thus x equals 2 + \\frac{1}{3", "3", False),
])
def test_grade_issue22_number_from_the_wrong_place(response, gold, expected):
    assert tt.grade(response, gold) is expected


@pytest.mark.parametrize("response", [
    "Answer: A) 12 B) 15 C) 18 D) 20", "\\boxed{A) 3 B) 4}", "\\boxed{A. 3, B. 4}", "\\boxed{A: yes, B: no}",
    "\\boxed{A) or C)}", "Answer: [A][B]",
])
def test_grade_a_list_of_options_earns_no_letter(response):
    # restating every option would otherwise earn the first option's reward a quarter of the time
    assert not tt.grade(response, "A") and not tt.grade(response, "B")


@pytest.mark.parametrize("response,gold", [("\\boxed{1.5 2}", "1.52"), ("\\boxed{12 34}", "1234"),
                                           ("\\boxed{1 2 3}", "123"), ("The answer is 3 4.", "34")])
def test_grade_digits_apart_are_not_one_number(response, gold):
    assert not tt.grade(response, gold) and tt.grade("\\boxed{12 000}", "12000")  # a thousands space stays


def test_grade_issue22_bare_list_of_numbers_is_no_answer():
    assert not tt.grade(" ".join(str(k) for k in range(1, 5001)), "5000")
    assert not tt.grade("Counting up: 1 2 3 4 5 6 7 8", "8") and not tt.grade("1, 2, 3, 4, 5", "5")


@pytest.mark.parametrize("pred,gold", [
    ("\\pi + 10^{-12}", "\\pi"), ("e - 10^{-14}", "e"), ("\\sqrt{2} + 10^{-12}", "\\sqrt{2}"),
    ("\\sqrt{x^2}", "x"), ("|y|", "y"), ("\\sqrt{4t^2}", "2t"),  # identities that hold only for x >= 0
    ("\\pm 5", "5"), ("\\{3,2\\}", "1, 2, 3"), ("-2 \\text{ and } 3", "2, 3"), ("(2,3)", "(p,q) = (3,2)"),
    ("5", "x + y = 5"), ("0.07 \\text{ yuan}", "0.06 \\text{ yuan}"), ("24", "5!"), ("3", "\\log_2 9"), ("5", "|-6|"),
    ("10⁴", "104"), ("½", "2"), ("x³", "x^2"), ("0.25\\%", "0.25"), ("25", "0.25\\%"), ("six", "5"),
    ("25\\%", "0.25"), ("0.25", "25\\%"), ("12.5\\%", "12.5"),  # a percent is its number, not a fraction
    ("5 \\text{ hundred}", "5"), ("3 dozen", "3"), ("(-\\infty, 3)", "x \\le 3"), ("x \\ge 3", "(-\\infty, 3]"),
    ("1.5e3", "1.5"), ("1.5e3", "15000"), ("\\cfrac{1}{3}", "3"), ("x = 1, y = 2", "x = 2, y = 1"),
])
def test_answers_match_issue22_refuses(pred, gold):
    assert not tt.answers_match(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("x = -2 \\text{ or } x = 3", "-2, 3"), ("\\{3,2,1\\}", "1, 2, 3"), ("\\pm 5", "-5, 5"), ("-2 and 3", "3, -2"),
    ("x=\\pm\\sqrt{2}", "\\sqrt2, -\\sqrt2"), ("(1,2), (3,4)", "(3,4), (1,2)"), ("(1;2)", "(1,2)"),
    ("(3,2)", "(p,q) = (3,2)"), ("1", "|AB| = 1"), ("7:3", "V_1 : V_2 = 7:3"), ("2x+5", "f(x) = 2x + 5"),
    ("a_2 = 5, a_{10} = 9", "a_{10} = 9, a_2 = 5"), ("4, 9", "x = 4,\\ y = 9"),
    ("0.06 \\text{ yuan}", "0.06 \\text{ yuan}"), ("120", "5!"), ("\\binom{4}{2}", "6"), ("3", "\\log_2 8"),
    ("5", "|-5|"), ("\\sqrt{x^2}", "|x|"), ("\\sec^2 y", "\\tan^2 y + 1"),
    ("½", "\\frac{1}{2}"), ("2√2", "2\\sqrt{2}"), ("10⁴", "10000"), ("x²", "x^2"), ("1½", "1.5"), ("3×4", "12"),
    ("25\\%", "25"), ("25", "25\\%"), ("25 percent", "25\\%"), ("0.25", "0.25\\%"), ("28 pct", "28\\%"),
    ("five", "5"), ("\\text{Twelve}", "12"),
    ("5 \\text{ thousand}", "5000"), ("3 dozen", "36"), ("1.5 million", "1500000"),
    ("x \\le 3", "(-\\infty, 3]"), ("3 \\ge x", "x \\le 3"), ("-2 < x \\le 7", "(-2, 7]"), ("x > 1", "(1, \\infty)"),
    ("x \\lt 3", "x < 3"), ("x != 5", "x \\neq 5"), ("x \\in [-2, 7]", "-2 \\le x \\le 7"),
    ("\\cfrac{1}{3}", "\\frac{1}{3}"), ("1.5e3", "1500"), ("2.5E-2", "0.025"),
    ("x = 3 + 4 = 7", "7"), ("x = 3 + 4 = 7", "x = 7"), ("x \\approx 11", "11"), ("y = 1/3 \\approx 0.33", "1/3"),
    ("2x + 4y - 3 = 0", "y = -\\frac{1}{2}x + \\frac{3}{4}"), ("-x - 2y + 1 = 0", "x + 2y - 1 = 0"),
    ("\\left[\\begin{array}{cc}1 & 2\\\\3 & 4\\end{array}\\right]", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
])
def test_answers_match_issue22_accepts(pred, gold):
    assert tt.answers_match(pred, gold)


@pytest.mark.parametrize("response,gold", [
    ("I choose option B.", "B"), ("After weighing them, B is the correct answer.", "B"), ("Answer: B) 3.2 eV", "B"),
    ("Answer: [B]", "B"), ("The total is 24 * 3 = **72**", "72"), ("The answer is five.", "5"),
    ("So the solutions are \\boxed{-2} and \\boxed{3}, and \\boxed{5}.", "-2, 3, 5"),
    ("$$\\boxed{(x, y) = (5, 8) \\quad \\text{and} \\quad (8, 5)}$$", "(5, 8), (8, 5)"),
    ("So $|x| \\le 2$, that is \\boxed{x \\in [-2, 2]}.", "-2 \\le x \\le 2"),
    ("The roots are $x = -2$ or $x = 3$, so \\boxed{x = -2 \\text{ or } x = 3}.", "-2, 3"),
    ("Thus the area is \\boxed{\\log_2 8}.", "3"), ("The population is \\boxed{1.5 \\text{ million}}.", "1500000"),
])
def test_grade_issue22_forms_a_human_accepts(response, gold):
    assert tt.grade(response, gold)
    assert not tt.grade(response, "C" if gold == "B" else "4")


# --------------------------------------------------------------------------------------------- grader: safety
def _nested_quantifiers(pattern):
    """Groups that repeat (*, +, {n,}) and hold a variable quantifier themselves: (a+)+, (?:\\s*x)*."""
    found, opens, in_class, k = [], [], False, 0
    while k < len(pattern):
        ch = pattern[k]
        if ch == "\\":
            k += 2  # an escape: \( or \+ is a literal
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class, k = True, k + (2 if pattern[k + 1:k + 2] == "]" else 1)  # "[]...]": a literal ]
            continue
        elif ch == "(":
            opens.append(k)
        elif ch == ")" and opens:
            body = re.sub(r"\[[^\]]*\]|\\.", "x", pattern[opens.pop() + 1:k])  # classes and escapes are one atom
            if re.match(r"[*+]|\{\d*,", pattern[k + 1:]) and re.search(r"[*+]|\{\d*,", body):
                found.append(body)
        k += 1
    return found


def test_grade_no_nested_quantifiers_in_patterns():
    assert _nested_quantifiers(r"(?:a+)+") and _nested_quantifiers(r"(\s*[)}])*")
    assert _nested_quantifiers(r"(?:x|y*){2,}")
    assert not _nested_quantifiers(r"(?:,\d{3})+") and not _nested_quantifiers(r"(?:\s*[)}])?\(+")
    patterns = [v.pattern for v in vars(tt).values() if isinstance(v, re.Pattern)]
    assert len(patterns) > 10 and not [p for p in patterns if _nested_quantifiers(p)]


def test_grade_adversarial_inputs_are_fast():
    n = 100_000
    texts = [
        "7" + " " * (n - 1), "y" * (n - 2000) + "7" + " " * 1990 + "x", "The answer is 7" + " " * 3000 + "or",
        "Final answer: 7" + "\t" * 5000 + " or 8", "8" * n, "7," * (n // 2), "1" + ",000" * (n // 4 - 1) + ",00",
        "\\boxed{" * (n // 7), "{" * n, "\\boxed{}" * (n // 8), "The answer is " * (n // 14), "1{,}" * (n // 4),
        "\\boxed{" + "\\sqrt{" * 60 + "2" + "}" * 61, "\\boxed{" + "2^{" * 60 + "9" + "}" * 61,
        "\\boxed{" + "-" * 390 + "1}", "\\boxed{" + "(" * 195 + "x" + ")" * 195 + "}", "<|im_end|" * (n // 9),
        "\\boxed{1}" + " wait" * (n // 5), "\\boxed{1} " + "The answer is 2. " * (n // 17), "1,\\! " * (n // 5),
        "\\boxed{" + ",".join(f"x+{k}" for k in range(10, 88)) + "}\nThe answer is "
        + ",".join(f"x+{k}" for k in reversed(range(10, 88))),
    ]
    rnd = random.Random(5)
    pieces = ["\\boxed{", "}", "{", "1", "2.5", "\\frac", "\\sqrt", "^", "x", " or ", "The answer is ", "\n", ". ",
              "{,}", ",", "\\le", "?", "not", "<|im_end|>", "(", ")", "\\pi", "$", "=", " "]
    texts += ["".join(rnd.choice(pieces) for _ in range(30_000))[:n] for _ in range(10)]
    worst = 0.0
    for text in texts:
        tt._values.cache_clear()
        t0 = time.perf_counter()
        for gold in ("7", "x+1", "D", "(1,2)"):
            assert tt.grade(text, gold) in (True, False)
        worst = max(worst, (time.perf_counter() - t0) / 4)
    # typically ~10 ms; the bound is generous so that a busy machine passes, a quadratic rule (seconds) does not
    assert worst < 0.5, f"slowest 100 kB grade took {worst * 1000:.1f} ms"


def test_grade_hedge_pattern_is_linear_in_whitespace():
    # the final sentence is at most 2 kB, where a quadratic pattern still passes at 50 ms; 20 kB shows the growth
    for text in ("7" + " " * 20_000 + "x", "7)" + "\t" * 20_000 + "or", "7" + " \n" * 10_000 + "and/or y"):
        took = []
        for _ in range(3):  # the best of three: a busy machine can pause any single call
            t0 = time.perf_counter()
            tt._HEDGE.search(text)
            took.append(time.perf_counter() - t0)
        assert min(took) < 0.5  # linear: well under 1 ms; the quadratic pattern took seconds at this length


# --------------------------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    # group 1: rewards 1,0,0,0 -> mean 0.25, Bessel std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    # group 2: all equal -> 0 (no spread, no signal); group 3: 1,1,0,0 -> mean 0.5, std sqrt(4*0.25/3)
    r = torch.tensor([1., 0., 0., 0., 1., 1., 1., 1., 1., 1., 0., 0.])
    a = tt.group_advantages(r, 4)
    s3 = math.sqrt(1 / 3)
    expected = [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, 0, 0, 0, 0,
                0.5 / (s3 + 1e-6), 0.5 / (s3 + 1e-6), -0.5 / (s3 + 1e-6), -0.5 / (s3 + 1e-6)]
    assert torch.allclose(a, torch.tensor(expected), atol=1e-6)


def test_reward_needs_eos_and_the_right_answer():
    assert tt.reward("So the answer is \\boxed{5}.", True, "5") == 1.0
    assert tt.reward("So the answer is \\boxed{5}.", False, "5") == 0.0  # right answer, but cut off before EOS
    assert tt.reward("So the answer is \\boxed{6}.", True, "5") == 0.0


def test_group_advantages_all_zero_groups():
    assert torch.equal(tt.group_advantages(torch.zeros(10), 5), torch.zeros(10))


# --------------------------------------------------------------------------------------------- loss
def one_token(logp, old_logp, adv, guided):
    """policy_loss on a single token: returns (loss, grad wrt logp)."""
    lp = torch.tensor([[logp]], dtype=torch.float64, requires_grad=True)
    loss, stats = tt.policy_loss(lp, torch.tensor([[old_logp]], dtype=torch.float64),
                                 torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1),
                                 torch.tensor([[guided]]))
    loss.backward()
    return loss.item(), lp.grad.item(), stats


@pytest.mark.parametrize("adv,ratio,active", [(1.0, 0.5, False), (1.0, 1.5, True), (-1.0, 0.5, True),
                                               (-1.0, 1.5, False), (1.0, 1.1, False)])
def test_policy_loss_clip_frac_counts_only_active_clips(adv, ratio, active):
    # a ratio outside [0.8, 1.2] is clipped only where the clipped term is the larger loss: A > 0 above 1.2,
    # A < 0 below 0.8 (then the gradient is 0); elsewhere the full gradient flows and nothing counts as clipped
    _, grad, stats = one_token(math.log(ratio), 0.0, adv, False)
    assert stats["clip_frac"] == float(active) and (grad == 0) == active


@pytest.mark.parametrize("adv,ratio,expected", [
    (1.0, 1.5, -1.2),   # A > 0, ratio above 1 + eps: clipped at 1.2
    (1.0, 0.5, -0.5),   # A > 0, ratio below: unclipped (pessimistic max)
    (-1.0, 0.5, 0.8),   # A < 0, ratio below 1 - eps: clipped at 0.8
    (-1.0, 1.1, 1.1),   # A < 0, inside the trust region
    (-1.0, 5.0, 3.0),   # A < 0, ratio far above: dual clip caps the loss at -A * c = 3
    (-2.0, 2.0, 4.0),   # A < 0, ratio 2 < c: max(4, 2.4) = 4, below the dual-clip cap 6
])
def test_policy_loss_ppo_branches(adv, ratio, expected):
    loss, grad, _ = one_token(math.log(0.3 * ratio), math.log(0.3), adv, False)
    assert loss == pytest.approx(expected, rel=1e-9)
    # gradient: -A * ratio when the unclipped term is active, 0 when clipped
    active = (adv, ratio) in [(1.0, 0.5), (-1.0, 1.1), (-2.0, 2.0)]
    assert grad == pytest.approx(-adv * ratio if active else 0.0, abs=1e-12)


@pytest.mark.parametrize("adv,p,gamma", [
    (2.0, 0.5, 0.0005),      # gamma = A / 4000
    (8.0, 0.3, 0.001),       # clipped at +0.001
    (-2.0, 0.5, -0.0005),
    (-8.0, 0.2, -0.001),     # clipped at -0.001
    (1.0, 0.005, 0.00025),   # unlikely token, A > 0: AAS still applies (it damps the push)
])
def test_policy_loss_aas_value_and_gradient(adv, p, gamma):
    old = math.log(0.9)  # AAS ignores the old log-prob: no ratio, no clip
    loss, grad, stats = one_token(math.log(p), old, adv, True)
    assert loss == pytest.approx(-adv * p / (p + gamma), rel=1e-9)
    assert grad == pytest.approx(-adv * p / (p + gamma), rel=1e-9)  # d l / d log p = -A p / (p + gamma)
    assert stats["aas_tokens"] == 1 and stats["aas_weight"] == pytest.approx(p / (p + gamma), rel=1e-9)


def test_policy_loss_statistics_count_only_what_they_name():
    # two guided rows: A = 1 with p = 0.002 (weight p / (p + 0.00025)) and A = 0 (weight 1, as with --kl-beta all
    # rows reach the loss); no PPO token at all
    p = torch.tensor([[0.002], [0.3]])
    loss, st = tt.policy_loss(p.log(), p.log(), torch.tensor([1.0, 0.0]), torch.ones(2, 1), torch.ones(2, 1))
    assert st["aas_tokens"] == 2 and st["aas_scored"] == 1
    assert st["aas_weight"] == pytest.approx(0.002 / 0.00225, rel=1e-6)  # not diluted toward 1 by the A = 0 row
    assert math.isnan(st["clip_frac"]) and math.isnan(st["dual_clip_frac"])  # no PPO token: no value, not 0


def test_update_aas_weight_is_a_mean_over_tokens(tok):
    # micro-batches of one row each, of 2, 4 and 3 guided tokens; one mini-batch, so every token's weight is
    # p / (p + gamma) with p from the old log-probs, worked out here (A < 0 and p < 0.01 would go to PPO)
    items = [tt.Rollout("q", "1", [3, 4], response=[5 + i] * n + [tok.eos_token_id], finished=True, guided=True,
                        n_student=0, adv=adv) for i, (n, adv) in enumerate(((1, 1.0), (3, 1.0), (2, -1.0)))]
    model, args = make_model(tok), learn_args(minibatches=1, micro_batch=1)
    tt.score_old(model, None, items, args)
    per_row = []
    for r in items:
        g = min(max(r.adv / 4000, -1e-3), 1e-3)
        per_row.append([p / (p + g) for p in r.old_logp.exp().tolist() if not (r.adv < 0 and p < 0.01)])
    tokens = [w for row in per_row for w in row]
    rows_mean = sum(sum(row) / len(row) for row in per_row) / len(per_row)
    mean = sum(tokens) / len(tokens)
    assert abs(mean - rows_mean) > 20e-5 * mean  # the mean over micro-batches would be another number
    stats = tt.update(model, items, tt.MasterAdamW(model, 1e-3, 0.0), args, random.Random(0))
    assert stats["aas_weight"] == pytest.approx(mean, rel=1e-5)


def test_aas_gamma_values():
    got = tt.aas_gamma(torch.tensor([-100.0, -2.0, 0.0, 0.4, 4.0, 100.0]))
    assert torch.allclose(got, torch.tensor([-0.001, -0.0005, 0.0, 0.0001, 0.001, 0.001]))


def test_policy_loss_aas_denominator_above_one():
    # p = 0.9995, A = 4: p + gamma = 1.0005 > 1, so d = p / 0.9999 and the loss is -A * 0.9999
    loss, grad, _ = one_token(math.log(0.9995), 0.0, 4.0, True)
    assert loss == pytest.approx(-4 * 0.9999, rel=1e-9)
    assert grad == pytest.approx(-4 * 0.9999, rel=1e-9)


def test_policy_loss_routing_falls_back_to_ppo():
    # guided, A < 0 and p < 0.01: PPO with the ratio, not AAS
    loss, grad, stats = one_token(math.log(0.005), math.log(0.004), -1.0, True)
    assert stats["aas_tokens"] == 0
    assert loss == pytest.approx(1.25, rel=1e-9)  # ratio 1.25: max(-A * 1.25, -A * 1.2) = 1.25, unclipped
    assert grad == pytest.approx(1.25, rel=1e-9)


def test_policy_loss_routing_boundary_p_at_threshold_uses_aas():
    loss, _, stats = one_token(math.log(0.02), math.log(0.02), -1.0, True)
    assert stats["aas_tokens"] == 1 and loss == pytest.approx(0.02 / (0.02 - 0.00025), rel=1e-9)


def test_policy_loss_finite_when_p_underflows():
    # a teacher-written token with log p = -120: p = exp(-120) is 0 in float32, so sg(p) + gamma(0) = 0. Hand
    # values, second token p = exp(-0.5): A = 1 -> l = -p / (p + 1/4000); A = -1 -> the first token falls back
    # to PPO (ratio 1: l = 1, dl/dlogp = 1), the second keeps AAS with d = p - 1/4000; A = 0 -> 0 everywhere.
    p = math.exp(-0.5)
    want = {1.0: (-p / (p + 0.00025) / 2, [0.0, -p / (p + 0.00025) / 2]),
            -1.0: ((1 + p / (p - 0.00025)) / 2, [0.5, p / (p - 0.00025) / 2]),
            0.0: (0.0, [0.0, 0.0])}
    for adv, (loss_want, grad_want) in want.items():
        logp = torch.tensor([[-120.0, -0.5]], requires_grad=True)
        loss, _ = tt.policy_loss(logp, logp.detach().clone(), torch.tensor([adv]), torch.ones(1, 2),
                                 torch.ones(1, 2))
        loss.backward()
        assert loss.item() == pytest.approx(loss_want, rel=1e-6, abs=1e-12), adv
        assert logp.grad[0].tolist() == pytest.approx(grad_want, rel=1e-6, abs=1e-12), adv


def test_policy_loss_token_mean_and_mask():
    # two rows, one padded: the loss is the sum over real tokens divided by their count (3), not by 4 or 2
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.9]], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.1]], dtype=torch.float64))
    mask = torch.tensor([[1., 1.], [1., 0.]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, _ = tt.policy_loss(logp, old, adv, mask, torch.zeros(2, 2, dtype=torch.bool))
    # row 0: two tokens at ratio 1 -> -1 each; row 1: one token at ratio 1 -> +1; padded ratio-9 token ignored
    assert loss.item() == pytest.approx((-1 - 1 + 1) / 3)


def test_policy_loss_gradient_matches_formula_on_random_batch():
    g = torch.Generator().manual_seed(0)
    N, T = 6, 7
    logp = (-torch.rand(N, T, generator=g, dtype=torch.float64) * 6).requires_grad_()
    old = logp.detach() + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * 0.6
    adv = torch.randn(N, generator=g, dtype=torch.float64) * 2
    mask = (torch.arange(T)[None] < torch.tensor([7, 5, 3, 7, 1, 6])[:, None]).double()
    guided = torch.zeros(N, T, dtype=torch.bool)
    guided[[1, 4]] = True
    guided[3, 4:] = True
    loss, _ = tt.policy_loss(logp, old, adv, mask, guided)
    loss.backward()
    # independent per-token gradient, written from the README's equations
    expected = torch.zeros(N, T, dtype=torch.float64)
    for i in range(N):
        for t in range(T):
            if not mask[i, t]:
                continue
            A, lp, lo = adv[i].item(), logp[i, t].item(), old[i, t].item()
            p, r = math.exp(lp), math.exp(lp - lo)
            if guided[i, t] and not (A < 0 and p < 0.01):
                gam = min(max(A / 4000, -0.001), 0.001)
                d = p + gam
                d = p / 1.0001 if d < 0 else p / 0.9999 if d > 1 else d
                expected[i, t] = -A * p / d
            else:
                unclipped, clipped = -A * r, -A * min(max(r, 0.8), 1.2)
                if A < 0 and max(unclipped, clipped) > -3 * A:
                    expected[i, t] = 0.0  # dual clip: constant
                else:
                    expected[i, t] = unclipped if unclipped >= clipped else 0.0
    assert torch.allclose(logp.grad * mask.sum(), expected, atol=1e-10)


def test_kl_k3_by_hand():
    # delta = ref - logp; k3 = exp(delta) - delta - 1: 0 when equal, and 0.5 + ln 2 - 1 for p = 0.5, ref = 0.25
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    got = tt.kl_k3(logp, torch.log(torch.tensor([[0.25, 0.3]])))
    assert torch.allclose(got, torch.tensor([[0.5 + math.log(2) - 1, 0.0]]), atol=1e-6)


# --------------------------------------------------------------------------------------------- schedule, selection
def test_guidance_pct_authors_setting():
    on = [s for s in range(1, 59) if tt.guidance_pct(s, 50) > 0]
    assert on == list(range(1, 9))
    assert tt.guidance_pct(1, 50) == pytest.approx(0.1)
    assert tt.guidance_pct(2, 50) == pytest.approx(0.1 - 0.09 / 16)
    assert tt.guidance_pct(8, 50) == pytest.approx(0.1 - 0.09 * 7 / 16)


def test_guidance_pct_threshold_decided_exactly():
    # pct <= 0.06 exactly when 0.09 m / Q >= 0.04; in floating point 0.1 - 0.09 * 4/9 is 0.060000000000000005
    assert tt.guidance_pct(5, 27) == 0.0 and tt.guidance_pct(4, 27) == pytest.approx(0.07)
    for total in range(1, 400):
        q = max(1, total // 3)
        for step in range(1, q + 3):
            exact = Fraction(1, 10) - Fraction(9, 100) * min(step - 1, q) / q
            assert (tt.guidance_pct(step, total) > 0) == (exact > Fraction(6, 100)), (step, total)


def test_guidance_pct_short_runs():
    assert [tt.guidance_pct(s, 2) for s in (1, 2, 3)] == [pytest.approx(0.1), 0.0, 0.0]  # Q = 1
    assert tt.guidance_pct(1, 1) == pytest.approx(0.1)


def test_select_for_guidance_only_among_finished():
    finished = [False, True, False, True, True,   # group 0: 3 finished
                False, False, False, False, False,  # group 1: none -> no guidance
                True, False, False, False, False]  # group 2: only index 10
    rng = random.Random(0)
    for _ in range(50):
        chosen = tt.select_for_guidance(finished, 5, 0.1, rng)
        assert len(chosen) == 2 and chosen[0] in (1, 3, 4) and chosen[1] == 10
    assert tt.select_for_guidance(finished, 5, 0.0, rng) == []


def test_select_for_guidance_count_follows_pct():
    chosen = tt.select_for_guidance([True] * 40, 40, 0.1, random.Random(0))
    assert len(chosen) == 4 and len(set(chosen)) == 4  # floor(40 * 0.1)
    assert len(tt.select_for_guidance([True] * 40, 40, 0.01, random.Random(0))) == 1  # max(1, floor(0.4))
    picks = [tt.select_for_guidance([True] * 5, 5, 0.1, random.Random(s))[0] for s in range(200)]
    assert set(picks) == {0, 1, 2, 3, 4}  # uniform over the group, not always the first


# --------------------------------------------------------------------------------------------- teacher text
def test_parse_teacher_good():
    text = "<opinion>incorrect</opinion>\n<reason>Wait, I used 18 for the child.</reason>\n<phrase>So 63.</phrase>"
    assert tt.parse_teacher(text) == ("incorrect", "Wait, I used 18 for the child.", "So 63.")
    assert tt.parse_teacher("  <opinion> Correct </opinion><reason>a</reason><phrase>b</phrase>\n") \
        == ("correct", "a", "b")


@pytest.mark.parametrize("text", [
    "",
    "<opinion>correct</opinion><reason>a</reason>",                      # phrase missing
    "<reason>a</reason><opinion>correct</opinion><phrase>b</phrase>",    # wrong order
    "<opinion>correct</opinion><reason> </reason><phrase>b</phrase>",    # empty reason
    "<opinion>correct</opinion><reason>a</reason><phrase></phrase>",     # empty phrase
    "<opinion>maybe</opinion><reason>a</reason><phrase>b</phrase>",      # not correct/incorrect
    "<opinion>correct</opinion><reason>a</reason><phrase>b</phrase> and more",  # trailing text
    "Sure! <opinion>correct</opinion><reason>a</reason><phrase>b</phrase>",     # leading text
    "<opinion>correct</opinion><reason>a<reason>b</reason><phrase>c</phrase>",  # nested tag
    "<opinion>correct</opinion><reason>a</reason><phrase>b",             # phrase never closed (truncated)
])
def test_parse_teacher_rejects_malformed(text):
    assert tt.parse_teacher(text) is None


def test_render_chat_template_and_fallbacks():
    tok = make_tokenizer()
    ids = tt.render_chat(tok, [{"role": "user", "content": "w1 is"}])
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "user", "w1", "is", "<|im_end|>", "<|im_start|>",
                                              "assistant"]
    # a template that rejects a system turn: the system text is folded into the first user turn
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    ids = tt.render_chat(tok, [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"}])
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "w1", "w2", "<|im_end|>"]
    tok.chat_template = None  # a base model: "User: w1 is\n\nAssistant:" ("User", "Assistant" are unknown words here)
    ids = tt.render_chat(tok, [{"role": "user", "content": "w1 is"}])
    assert tok.convert_ids_to_tokens(ids) == ["<unk>", ":", "w1", "is", "<unk>", ":"]
    # a base model whose tokenizer starts every text with BOS (Llama, Gemma) keeps its BOS without a template
    from tokenizers import processors
    raw = make_tokenizer().backend_tokenizer
    raw.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                       special_tokens=[("<|im_start|>", 0)])
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      unk_token="<unk>")
    ids = tt.render_chat(bos_tok, [{"role": "user", "content": "w1 is"}])
    assert bos_tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "<unk>", ":", "w1", "is", "<unk>", ":"]


def test_splice_ids(tok):
    eos = tok.eos_token_id
    response = [5, 6, 7, eos]
    ids, n_student = tt.splice(response, "checked", "so 5", tok, eos)
    expected_tail = tok("\n\nchecked\n\nso 5", add_special_tokens=False)["input_ids"]
    assert expected_tail == tok.convert_tokens_to_ids(["checked", "so", "5"])  # whitespace is not a token here
    assert ids == [5, 6, 7] + expected_tail + [eos] and n_student == 3


def test_guided_mask_options(tok):
    item = rollout([1, 2, 3, 4, 5], guided=True, n_student=2)
    assert tt.guided_mask(item).tolist() == [1, 1, 1, 1, 1]
    assert tt.guided_mask(item, teacher_tokens_only=True).tolist() == [0, 0, 1, 1, 1]
    assert tt.guided_mask(rollout([1, 2]), teacher_tokens_only=True).tolist() == [0, 0]


# --------------------------------------------------------------------------------------------- masks, log-probs
def test_cut_at_stop_with_pad_equal_eos(tok):
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    assert tt.cut_at_stop([5, 7, eos, eos, eos], {eos}) == ([5, 7, eos], True)
    assert tt.cut_at_stop([5, 7, 9], {eos}) == ([5, 7, 9], False)


def test_response_logprobs_keep_eos_and_ignore_padding(tok):
    model = make_model(tok)
    eos = tok.eos_token_id
    prompts = [[0, 3, 9, 1], [0, 3, 10, 11, 12, 13, 14, 1]]
    responses = [[eos, 14, eos], [15]]  # an EOS inside and at the end of a response; pad is EOS too
    # rows of 7 and 9 tokens: the first ends in two pads (= EOS), which must change nothing before them
    lp = tt.response_logprobs(model, prompts, responses, 1.0)
    assert lp.shape == (2, 3) and lp[1, 1:].abs().sum() == 0  # past the response: exactly zero
    for i, (p, r) in enumerate(zip(prompts, responses)):  # independent: full logits of each unpadded sequence
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0].log_softmax(-1)
        for t, y in enumerate(r):
            assert lp[i, t].item() == pytest.approx(logits[len(p) + t - 1, y].item(), abs=1e-5)


def test_response_logprobs_pass_no_attention_mask(tok, monkeypatch):
    # the end padding is hidden by causality alone; with a mask transformers would copy K and V to every head
    from transformers.integrations import sdpa_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    seen, sdpa = [], sdpa_attention.sdpa_attention_forward

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", probe)
    # rows of 6 and 9 tokens: the first is padded
    tt.response_logprobs(make_model(tok), [[0, 3, 9, 1], [0, 3, 10, 11, 12, 1]], [[14, 15], [16, 17, 1]], 1.0)
    assert len(seen) == 2 and all(m is None for m in seen)  # one call per layer


def test_response_logprobs_temperature(tok):
    model = make_model(tok)
    p, r = [[0, 3, 9, 1]], [[14, 15]]
    lp = tt.response_logprobs(model, p, r, 0.5)
    with torch.no_grad():
        logits = (model(torch.tensor([p[0] + r[0]])).logits[0] / 0.5).log_softmax(-1)
    assert lp[0, 1].item() == pytest.approx(logits[4, 15].item(), abs=1e-5)


def test_response_logprobs_with_soft_capped_head(tok):
    from transformers import Gemma2Config
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(200)  # logits large enough for the cap to matter
    p, r = [[0, 3, 9, 1]], [[14, 15, 16]]
    lp = tt.response_logprobs(model, p, r, 1.0)
    with torch.no_grad():
        out = model(torch.tensor([p[0] + r[0]]), output_hidden_states=True)
        capped = out.logits[0].log_softmax(-1)  # the model applies the cap itself
        uncapped = model.lm_head(out.hidden_states[-1][0]).log_softmax(-1)
    for t, y in enumerate(r[0]):
        assert lp[0, t].item() == pytest.approx(capped[3 + t, y].item(), abs=1e-4)
    assert (capped - uncapped).abs().max() > 0.1


def test_score_old_returns_each_rollouts_own_logprobs(tok):
    # score_old batches rollouts sorted by length; each result must still belong to its own rollout.
    # Reference: every rollout scored alone (no padding, no batching) by an explicit log-softmax.
    student, ref = make_model(tok, seed=6), make_model(tok, seed=7)
    items = [rollout([20, 21, 22, 23, 24, 1], [0, 3, 9, 1, 0, 4], adv=1.0), rollout([30], [0, 4], adv=-1.0),
             rollout([25, 26, 1], [0, 3, 10, 11, 12, 1, 0, 4], adv=0.5),
             rollout([27, 28, 29, 31, 32, 33, 34], [0, 5, 1, 0, 4], adv=2.0), rollout([35, 36], [0, 6, 1, 0, 4], adv=-1)]
    args = type("A", (), {"micro_batch": 1, "temperature": 0.7, "kl_beta": 0.0})()  # 4 rows per forward
    tt.score_old(student, ref, items, args)
    for it in items:
        lp, lr = it.old_logp, it.ref_logp
        seq, n = torch.tensor([it.prompt + it.response]), len(it.prompt)
        for model, got in ((student, lp), (ref, lr)):
            with torch.no_grad():
                logits = model(seq).logits[0, n - 1:-1] / 0.7  # [T, V]: the outputs that predict the response
            want = logits.log_softmax(-1).gather(-1, seq[0, n:, None]).squeeze(-1)
            assert got.shape == (len(it.response),) and torch.allclose(got, want, atol=1e-5)
    tt.score_old(student, None, items, args)
    assert [it.ref_logp for it in items] == [None] * len(items)


def test_load_model_trainable_has_no_dropout(tok, tmp_path):
    # the update runs in train mode; with dropout its log-probs would differ from the old ones (ratio != 1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.9,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    args = type("A", (), {"dtype": "float32", "device": "cpu", "grad_ckpt": False})()
    p, r = [[0, 3, 9, 1, 0, 4]], [[20, 21, 22, 23, 1]]
    raw = AutoModelForCausalLM.from_pretrained(tmp_path).train()  # as saved: dropout active in train mode
    assert not torch.equal(tt.response_logprobs(raw, p, r, 1.0), tt.response_logprobs(raw, p, r, 1.0))
    model = tt.load_model(str(tmp_path), args, trainable=True)
    with torch.no_grad():
        old = tt.response_logprobs(model.eval(), p, r, 1.0)
    new = tt.response_logprobs(model.train(), p, r, 1.0)
    assert torch.allclose(new, old, atol=1e-6)
    model.save_pretrained(tmp_path / "saved")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config.attention_dropout == 0.9


def test_right_pad_layout(tok):
    pad = tok.pad_token_id
    ids = tt.right_pad([[3, pad, 4], [pad], [5, 6]], "cpu", pad)  # a real token equal to pad is just a token
    assert ids.tolist() == [[3, pad, 4], [pad, pad, pad], [5, 6, pad]]


# --------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_generate_static_matches_generate_plain(tok, temperature):
    model = make_model(tok, seed=3)
    prompts = [[0, 3, 9, 1, 0, 4], [0, 3, 10, 11, 12, 13, 14, 1, 0, 4], [0, 4]]
    stops = [tok.eos_token_id]
    torch.manual_seed(7)
    plain = tt.generate_plain(model, prompts, tt.Sampling(stops, tok.pad_token_id, 12, temperature))
    torch.manual_seed(7)
    fast = tt.generate_static(model, prompts, tt.Sampling(stops, tok.pad_token_id, 12, temperature, batch=4, prompt_len=16))
    cut = lambda rows: [tt.cut_at_stop(r, set(stops)) for r in rows]  # noqa: E731
    assert cut(plain) == cut(fast)
    if temperature > 0:
        assert len({tuple(r) for r in plain}) > 1


def test_generate_plain_ignores_the_checkpoints_sampling_defaults(tok):
    # a checkpoint's generation_config may carry top_k, min_p or a repetition penalty (many instruct models
    # do); rollouts must come from the policy itself at --temperature, as the fast path samples them
    model = make_model(tok, seed=3)
    model.generation_config.top_k, model.generation_config.min_p = 2, 0.3
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.5, 2
    prompts, stops = [[0, 3, 9, 1, 0, 4], [0, 4]], [tok.eos_token_id]
    for temperature in (1.0, 0.0):
        torch.manual_seed(5)
        plain = tt.generate_plain(model, prompts, tt.Sampling(stops, tok.pad_token_id, 12, temperature))
        torch.manual_seed(5)
        fast = tt.generate_static(model, prompts, tt.Sampling(stops, tok.pad_token_id, 12, temperature, batch=2, prompt_len=8))
        assert [tt.cut_at_stop(r, set(stops)) for r in plain] == [tt.cut_at_stop(r, set(stops)) for r in fast]
    assert model.generation_config.top_k == 2 and model.generation_config.min_p == 0.3  # handed back intact


def test_generate_static_without_any_padding(tok):
    # equal-length prompts and a cache exactly that long: no row is padded, so only the causal mask keeps the
    # decode step from attending to cache slots not written yet (transformers may skip an all-ones mask)
    model = make_model(tok, seed=3)
    prompts, stops = [[0, 3, 9, 1, 0, 4], [0, 3, 10, 11, 1, 4]], [tok.eos_token_id]
    for rows in (prompts[:1], prompts):
        plain = tt.generate_plain(model, rows, tt.Sampling(stops, tok.pad_token_id, 12, 0.0))
        fast = tt.generate_static(model, rows, tt.Sampling(stops, tok.pad_token_id, 12, 0.0, batch=len(rows), prompt_len=6))
        assert fast == plain


def test_static_decoder_compiled_step_samples_as_generate_plain(tok):
    # the GPU path compiles the one-token step; inductor compiles it on the CPU too (CUDA graphs aside)
    model = make_model(tok, seed=3)
    prompts, stops = [[0, 3, 9, 1, 0, 4], [0, 3, 10, 11, 12, 13, 14, 1, 0, 4], [0, 4]], [tok.eos_token_id]
    tt._static_decoder(model, 4, 16 + 12, compile_step=True)  # the entry generate_static will use
    torch.manual_seed(7)
    plain = tt.generate_plain(model, prompts, tt.Sampling(stops, tok.pad_token_id, 12, 1.0))
    for _ in range(2):  # the second call reuses the compiled step
        torch.manual_seed(7)
        fast = tt.generate_static(model, prompts, tt.Sampling(stops, tok.pad_token_id, 12, 1.0, batch=4, prompt_len=16))
        assert [tt.cut_at_stop(r, set(stops)) for r in fast] == [tt.cut_at_stop(r, set(stops)) for r in plain]
    assert tt._STATIC[(id(model), 4, 28)]["step"] is not tt._STATIC[(id(model), 4, 28)]["eager"]


@pytest.mark.parametrize("B,L,masked", [(3, 11, 4), (3, 512, 300), (40, 64, 20)])
def test_decode_attention_matches_repeated_kv(B, L, masked):
    # one query token, 8 query heads sharing 2 KV heads, a padding mask: against SDPA on repeated KV heads.
    # 3 rows x 2 KV heads take split_kv_attention (L = 512: 8 chunks of 64, the first four fully masked in row
    # 0); 40 rows x 2 KV heads take SDPA.
    g = torch.Generator().manual_seed(0)
    H, KVH, D = 8, 2, 16
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, 1), (KVH, L), (KVH, L)))
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[0, ..., :masked] = False
    module = torch.nn.Module()
    module.num_key_value_groups = H // KVH
    out, _ = tt.decode_attention(module, q, k, v, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1), attn_mask=mask, scale=0.25)
    assert out.shape == (B, 1, H, D) and torch.allclose(out, ref.transpose(1, 2), atol=1e-6)


def _decode_step_shapes(model, tok, B=2, P=8, new=3):
    """Shapes of every tensor in the graph(s) torch.compile captures from the fast path's one-token step."""
    prompts = [[0, 3, 9, 1, 0, 4], [0, 4]]
    tt.generate_static(model, prompts, tt.Sampling([tok.eos_token_id], tok.pad_token_id, new, 0.0, batch=B, prompt_len=P))
    step = tt._static_decoder(model, B, P + new)["eager"]  # its cache now holds the prompts
    shapes = []

    def capture(gm, example_inputs):  # a torch.compile backend that records the graph and runs it as is
        shapes.extend(tuple(n.meta["example_value"].shape) for n in gm.graph.nodes
                      if isinstance(n.meta.get("example_value"), torch.Tensor))
        return gm.forward

    _, mask = tt.left_pad(prompts, tok.pad_token_id, "cpu", width=P)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(step, backend=capture, dynamic=False)(torch.tensor([[3], [4]]), mask.sum(-1, keepdim=True),
                                                            torch.cat([mask, mask.new_ones(B, new)], 1))
    return shapes


def test_decode_attention_compiled_step_reads_kv_cache_once(tok, monkeypatch):
    # the speed claim behind decode_attention: the compiled step never copies the cache to every query head.
    # 4 query heads share 2 KV heads (head dim 8); the cache has 2 rows x 11 slots.
    repeated, own = (2, 4, 11, 8), (2, 2, 11, 8)  # [B, H, L, D] would be the repeated cache; [B, KVH, L, D] is it
    ours = _decode_step_shapes(make_model(tok), tok)
    assert own in ours and repeated not in ours
    monkeypatch.setattr(tt, "_use_decode_attention", lambda model: None)  # transformers' own SDPA path
    assert repeated in _decode_step_shapes(make_model(tok), tok)


def test_decode_attention_does_not_leak_into_checkpoints(tok, tmp_path):
    model = make_model(tok)
    tt._use_decode_attention(model)  # what the fast path does to the student on the GPU
    assert model.config._attn_implementation == "thinktuning_decode"
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_release_static_cache_and_reuse(tok):
    # on the GPU the cache's tensors are freed after every call; the next call must allocate them again
    model = make_model(tok, seed=4)
    prompts, stops = [[0, 3, 9, 1, 0, 4], [0, 4]], [tok.eos_token_id]
    torch.manual_seed(1)
    first = tt.generate_static(model, prompts, tt.Sampling(stops, tok.pad_token_id, 10, 1.0, batch=2, prompt_len=8))
    tt._release(tt._static_decoder(model, 2, 18)["cache"])
    torch.manual_seed(1)
    again = tt.generate_static(model, prompts, tt.Sampling(stops, tok.pad_token_id, 10, 1.0, batch=2, prompt_len=8))
    assert first == again


def _update_once(tok, rollouts, monkeypatch, compute_all):
    """Parameters and AdamW state after one update of a fresh copy of the same model (old log-probs from
    score_old), with rows of A = 0 skipped or, as a reference, every row scored and back-propagated."""
    model = make_model(tok, seed=9)
    args = type("A", (), {"minibatches": 2, "temperature": 1.0, "clip_eps": 0.2, "dual_clip": 3.0, "kl_beta": 0.0,
                          "grad_clip": 1.0, "micro_batch": 2, "guide_teacher_tokens_only": False})()
    with monkeypatch.context() as m:
        if compute_all:
            m.setattr(tt, "moves_weights", lambda rollout, args: True)
        items = [tt.Rollout(r.question, r.gold, r.prompt, r.response, r.finished, r.guided, r.n_student, adv=r.adv)
                 for r in rollouts]
        tt.score_old(model, None, items, args)
        optim = tt.MasterAdamW(model, 1e-3, 0.01)
        tt.update(model, items, optim, args, random.Random(0))
    return [p.detach().clone() for p in model.parameters()], optim.opt.state_dict()["state"]


def test_update_skips_rows_with_zero_advantage_exactly(tok, monkeypatch):
    # groups of 2: one with spread (A = +-0.707), one all-equal (A = 0: skipped), guided rows, mixed lengths
    rollouts = [rollout([20, 21, 22, 1], [0, 3, 9, 1, 0, 4], adv=0.7071), rollout([30, 1], adv=-0.7071),
                rollout([25, 26, 27, 28, 29, 1], [0, 5, 1, 0, 4], adv=0.0, guided=True, n_student=2),
                rollout([35, 36, 1], [0, 6, 1, 0, 4], adv=0.0),
                rollout([40, 41, 42, 1], [0, 7, 1, 0, 4], adv=-0.7071, guided=True, n_student=1),
                rollout([43, 1], adv=0.7071), rollout([44, 45, 1], adv=0.0), rollout([46, 1], adv=0.0)]
    skipped, state = _update_once(tok, rollouts, monkeypatch, compute_all=False)
    every, state_every = _update_once(tok, rollouts, monkeypatch, compute_all=True)
    start = [p.detach() for p in make_model(tok, seed=9).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(skipped, start))  # the step moved the weights
    assert all(torch.allclose(a, b, atol=1e-7, rtol=0) for a, b in zip(skipped, every))
    for key in state_every:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[key][name], state_every[key][name], atol=1e-9, rtol=1e-5)


def test_update_with_all_zero_advantages_still_decays_the_weights(tok, monkeypatch):
    # every row has A = 0: no forward, no backward, yet each of the 2 AdamW steps applies weight decay (the
    # gradient is zero, so Adam's update is 0/(0 + eps) = 0): w <- w (1 - lr wd) twice
    rollouts = [rollout([20, 21, 1], adv=0.0), rollout([30, 1], adv=0.0, guided=True, n_student=1),
                rollout([31, 32, 33, 1], adv=0.0), rollout([34, 1], adv=0.0)]
    skipped, state = _update_once(tok, rollouts, monkeypatch, compute_all=False)
    every, _ = _update_once(tok, rollouts, monkeypatch, compute_all=True)
    start = [p.detach() for p in make_model(tok, seed=9).parameters()]
    for a, b, w in zip(skipped, every, start):
        assert torch.equal(a, b) and torch.allclose(a, w * (1 - 1e-3 * 0.01) ** 2, atol=1e-8, rtol=1e-6)
    assert all(int(s["step"]) == 2 for s in state.values())


def test_token_share_micro_batches_add_up_to_the_mini_batch_token_mean(tok, monkeypatch):
    # L = sum(m * l) / sum(m) over the whole mini-batch: accumulating micro-batches of 1 or 2 rows must give
    # the gradient of one forward over all rows (rows of different lengths, guided and not, some ratios clipped)
    model = make_model(tok, seed=8)
    items = [rollout([20, 21, 22, 23, 1], [0, 3, 9, 1, 0, 4], adv=1.2),
             rollout([30, 31], [0, 4], adv=-0.7, guided=True, n_student=1),
             rollout([25, 26, 27, 28, 29, 32, 1], [0, 5, 1, 0, 4], adv=-1.5),
             rollout([35, 1], [0, 6, 1, 0, 4], adv=0.4, guided=True, n_student=1)]
    args = type("A", (), {"minibatches": 1, "temperature": 1.0, "clip_eps": 0.2, "dual_clip": 3.0, "kl_beta": 0.0,
                          "grad_clip": 1.0, "micro_batch": 4, "guide_teacher_tokens_only": False})()
    g = torch.Generator().manual_seed(0)
    tt.score_old(model, None, items, args)
    for it in items:  # ratios away from 1, so some tokens are clipped
        it.old_logp = it.old_logp + 0.3 * torch.randn(len(it.old_logp), generator=g)
    old = [it.old_logp for it in items]
    # reference: one forward over all four rows, the loss of the README, one backward
    logp = tt.response_logprobs(model, [it.prompt for it in items], [it.response for it in items], 1.0)  # [4, 7]
    T = logp.shape[1]
    mask = tt.pad_rows([torch.ones(len(it.response)) for it in items], T)
    guided = tt.pad_rows([tt.guided_mask(it) for it in items], T)
    loss, st = tt.policy_loss(logp, tt.pad_rows(old, T), torch.tensor([it.adv for it in items]), mask, guided)
    assert st["clip_frac"] > 0
    loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    seen = []

    optim = tt.MasterAdamW(model, 1e-3, 0.0)

    def probe(clip):  # in place of the optimizer step: record the gradient it would apply
        seen.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return 1.0, True

    monkeypatch.setattr(optim, "step", probe)
    for micro in (1, 2):
        args.micro_batch = micro
        out = tt.update(model, items, optim, args, random.Random(0))
        assert out["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seen[-1], want))


def test_kv_cache_bytes_for_real_shapes():
    # Llama-3.2-3B: 28 layers, 8 KV heads of 128; bf16 K and V: 2 * 28 * 8 * 128 * 2 = 114,688 bytes per slot
    llama = LlamaConfig(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8, num_hidden_layers=28)
    assert tt.kv_cache_bytes(llama, 160, 1344, 2) == 114_688 * 160 * 1344
    # Qwen2.5-1.5B: 28 layers, 2 KV heads of 128 (hidden 1536 / 12 heads): 28,672 bytes per slot, the README's
    # 2.4 GB for 64 rows x 1,280 slots
    from transformers import Qwen2Config
    qwen = Qwen2Config(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, num_hidden_layers=28)
    assert tt.kv_cache_bytes(qwen, 64, 1280, 2) == 28_672 * 64 * 1280 == 2_348_810_240


def test_activation_bytes_for_real_shapes():
    # Qwen2.5-1.5B (h 1536, I 8960, 28 layers), bf16, one micro-batch of 16 rows x 1,280 tokens = 20,480 tokens.
    # A layer keeps 12 h + 3 I = 18,432 + 26,880 = 45,312 values per token: 90,624 bytes.
    from transformers import Qwen2Config
    qwen = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                       num_hidden_layers=28)
    # without checkpointing every layer keeps them: 28 x 90,624 x 20,480 = 51.97 GB, which with the 24.7 GB of
    # weights, master weights, moments and gradients is more than an 80 GB H100 holds (measured: out of memory)
    assert tt.activation_bytes(qwen, 20_480, 2, checkpointed=False) == 28 * 90_624 * 20_480 == 51_967_426_560
    # with it, each layer's input (28 x 1536 x 2 bytes per token) plus one layer being recomputed
    assert tt.activation_bytes(qwen, 20_480, 2, checkpointed=True) == (86_016 + 90_624) * 20_480 == 3_617_587_200
    # a forward without gradient (prefill, old log-probs): 4 h + 3 I = 33,024 values per token
    assert tt.forward_bytes(qwen, 64 * 768, 2) == 66_048 * 64 * 768
    from transformers import GPT2Config
    assert tt.forward_bytes(GPT2Config(n_embd=64), 10, 4) == (4 * 64 + 3 * 256) * 4 * 10  # no MLP width set: 4 h


@pytest.mark.parametrize("group_size,rows_per_prompt", [(2, 1), (5, 1), (10, 1), (19, 1), (20, 2), (31, 3)])
def test_teacher_rows_bound_the_guided_rollouts(group_size, rows_per_prompt):
    args = type("A", (), {"prompts_per_step": 7, "group_size": group_size})()
    assert tt.teacher_rows(args) == 7 * rows_per_prompt
    # no step can choose more: the largest k is at pct = 0.1 with every rollout finished
    rng = random.Random(0)
    assert len(tt.select_for_guidance([True] * 7 * group_size, group_size, 0.1, rng)) == 7 * rows_per_prompt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_master_adamw_chunked_step_matches_plain_adamw(tok, dtype):
    # stepped in small chunks, two optimizer steps, against clip_grad_norm_ + AdamW on fp32 copies. bf16: fp32
    # master copies; float32 (the CPU): the weights are their own masters, so while one chunk steps no weight of
    # another chunk may hold a gradient (AdamW would step it too, unclipped, once per chunk)
    model = make_model(tok, seed=5).to(dtype)
    params = list(model.parameters())
    ref = [p.detach().float().clone().requires_grad_() for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01)
    optim = tt.MasterAdamW(model, 1e-3, 0.01)
    ps, master = optim.params, optim.master
    assert optim.separate == (dtype == torch.bfloat16) and master[0].dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    for scale, clipped in ((0.002, False), (0.05, True)):  # below the clip (the scale is capped at 1), then above
        for p, r in zip(params, ref):
            p.grad = (torch.randn(p.shape, generator=g) * scale).to(dtype)
            r.grad = p.grad.float().clone()  # a copy: the clip below scales it in place
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        assert (ref_norm > 1.5 if clipped else ref_norm < 0.5)  # the clip is active only in the second step
        ref_opt.step()
        norm, ok = optim.step(1.0, chunk=3000)  # many chunks
        assert ok and norm == pytest.approx(ref_norm.item(), rel=1e-5)
        for r, m, p in zip(ref, master, ps):
            assert torch.allclose(r, m, atol=1e-7) and torch.equal(p, m.to(dtype)) and p.grad is None
    assert {int(st["step"]) for st in optim.opt.state.values()} == {2}  # every weight stepped exactly twice


def test_generate_stops_at_eos_with_bigram_model(tok):
    model = make_bigram_model(tok)
    prompt = tt.render_chat(tok, [{"role": "user", "content": "w1 is 2 + 3"}])
    for fast in (False, True):
        (resp,), (done,) = tt.generate(model, [prompt], tt.Sampling([tok.eos_token_id], tok.pad_token_id, 30, 0.0, fast))
        assert done and tok.convert_ids_to_tokens(resp) == CHAIN[1:]


# --------------------------------------------------------------------------------------------- end to end
def base_args(model_dir, train_file, out, *extra):
    return ["--model", model_dir, "--train-data", train_file, "--out", out, "--device", "cpu", "--steps", 2,
            "--prompts-per-step", 2, "--group-size", 4, "--max-new-tokens", 20, "--teacher-max-new-tokens", 24,
            "--minibatches", 2, "--micro-batch", 4, "--seed", 1, *extra]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def weights(path):
    m = AutoModelForCausalLM.from_pretrained(path)
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_end_to_end_teacher_text_max_counts_the_teacher_tokens(model_dirs, train_file, tmp_path):
    # the limit counts the spliced teacher tokens, not the stop token that follows them
    run(base_args(model_dirs["bigram"], train_file, tmp_path / "a", "--steps", 1, "--log-samples", 8))
    s = next(s for s in read_jsonl(tmp_path / "a" / "samples.jsonl") if s.get("guided"))
    k = len(s["tokens"]) - s["n_student"] - 1  # teacher tokens between the student's text and the stop token
    for limit, passed in ((k, True), (k - 1, False)):
        out = tmp_path / f"limit{limit}"
        run(base_args(model_dirs["bigram"], train_file, out, "--steps", 1, "--teacher-text-max", limit))
        replies = [r for r in read_jsonl(out / "samples.jsonl") if r.get("kind") == "teacher_reply"]
        assert replies and all(r["passed"] == passed for r in replies)
        assert passed or all(r["why"] == "longer than --teacher-text-max" for r in replies)


def test_end_to_end_two_steps_with_teacher(model_dirs, train_file, tmp_path):
    out = tmp_path / "tt"
    assert run(base_args(model_dirs["bigram"], train_file, out, "--log-samples", 8)) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    # the bigram student finishes most rollouts, so every group has one guided rollout, and the real
    # teacher (a frozen copy, generating greedily) writes a reply the strict parser accepts
    assert first["n_selected"] == 2 and first["teacher_asked"] == 2
    assert first["n_guided"] == 2 and first["teacher_format_pass"] == 1.0
    assert first["aas_tokens"] > 0 and math.isfinite(first["loss"])
    assert rows[1]["guidance_pct"] == pytest.approx(0.1 - 0.09 / 16)
    samples = read_jsonl(out / "samples.jsonl")
    guided = [s for s in samples if s.get("guided")]
    assert guided and all(s["teacher"] == "checkedso\\boxed{5}" for s in guided)
    replies = [s for s in samples if s.get("kind") == "teacher_reply"]  # every reply is logged, passed or not
    assert len(replies) == 4 and all(r["passed"] and r["why"] == "" for r in replies)
    for s in guided:  # token by token, with p and the AAS weight at scoring time (1 exactly where A = 0)
        assert len(s["tokens"]) == len(s["weight"]) and "".join(s["tokens"][s["n_student"]:-1]) == s["teacher"]
        if s["adv"] == 0:
            assert s["p"] is None and set(s["weight"]) == {1.0}
        else:
            assert len(s["p"]) == len(s["tokens"]) and all(0 < p <= 1 for p in s["p"])
    # the report page, written at the end, draws the latest guided rollouts token by token with their weights
    spans = [a for a, _ in Page((out / "report.html").read_text()).find("span") if "data-tok" in a]
    latest = sorted(guided, key=lambda s: -s["step"])
    want = [(tok, w) for s in latest for tok, w in zip(s["tokens"], s["weight"])]
    assert [(a["data-tok"], None if a["data-w"] == "ppo" else float(a["data-w"])) for a in spans] == want
    assert all(s["reward"] == float(s["gold"] == "5") for s in guided)  # graded on the teacher's answer
    assert (out / "ckpt" / "model.safetensors").exists()
    moved = (weights(out / "ckpt") - weights(model_dirs["bigram"])).abs().max()
    assert moved > 0


def test_end_to_end_two_steps_without_teacher(model_dirs, train_file, tmp_path):
    out = tmp_path / "grpo"
    assert run(base_args(model_dirs["bigram"], train_file, out, "--no-teacher")) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["n_guided"] for r in rows] == [0, 0] and [r["aas_tokens"] for r in rows] == [0, 0]
    assert all(r["guidance_pct"] == 0 for r in rows)


def test_end_to_end_start_up_refuses_when_the_disk_cannot_hold_a_checkpoint(model_dirs, train_file, tmp_path, capsys,
                                                                         monkeypatch):
    assert run(base_args(model_dirs["random"], train_file, tmp_path / "a", "--no-teacher", "--steps", 1)) == 0
    assert "checkpoints: about" in capsys.readouterr().out
    # the tiny model's checkpoint holds 25,056 parameters x 12 bytes (fp32 weights + two AdamW moments)
    for free, refused in ((25_056 * 12, False), (25_056 * 12 - 1, True)):
        monkeypatch.setattr(tt.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free})())
        out = tmp_path / f"b{free}"
        assert run(base_args(model_dirs["random"], train_file, out, "--no-teacher", "--steps", 1)) == 2 * refused
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1] if err else ""  # after transformers' weight-loading bar
        assert (last.startswith("error:") and "a checkpoint needs" in last and "--ignore-disk" in last) == refused
        assert (out / "ckpt").exists() == (out / "metrics.jsonl").exists() == (not refused)
    assert run(base_args(model_dirs["random"], train_file, tmp_path / "c", "--no-teacher", "--steps", 1,
                         "--ignore-disk")) == 0  # the override starts anyway


def test_print_plan_memory_estimate_and_gpu_warning_by_hand(tok, tmp_path, monkeypatch, capsys):
    # tiny fp32 model: 25,056 parameters, h 32, I 64, 2 layers; K and V take 2 layers x 2 KV heads x 8 dims x 2 x
    # 4 bytes = 256 bytes per slot; a forward without gradient keeps 4 h + 3 I = 320 values (1,280 bytes) per token,
    # a checkpointed backward 2 x 32 + 12 h + 3 I = 640 values (2,560 bytes) per token.
    # Stays: 25,056 x 12 (weights + AdamW) = 300,672 trained, 25,056 x 4 = 100,224 frozen (the teacher).
    # Comes and goes (8 rollouts of 64 prompt + 20 new tokens; 4 mini-batches of 2 rows, so a micro-batch of at most
    # 2 rows although --micro-batch is 8; old log-probs score up to 4 x 8 rows at once; teacher: 2 rows of 3072 + 1024):
    student, teacher = make_model(tok), make_model(tok)
    args = tt.build_parser().parse_args(["--model", "m", "--prompts-per-step", "2", "--group-size", "4",
                                         "--max-new-tokens", "20", "--out", str(tmp_path)])
    args.device, args.dtype, args.grad_ckpt = "cuda", "float32", True  # as on a GPU, without one
    run_ = type("Run", (), {"args": args, "student": student, "teacher": teacher, "ref": None,
                            "optim": tt.MasterAdamW(student, 1e-6, 0.0), "problems": [{}] * 10,
                            "student_how": tt.Sampling([1], 1, 20, batch=8, prompt_len=64),
                            "teacher_how": tt.Sampling([1], 1, args.teacher_max_new_tokens, 0.0,
                                                       batch=tt.teacher_rows(args),
                                                       prompt_len=args.teacher_max_prompt_len)})()
    trained, frozen, phases = tt.memory_estimate(run_)
    assert (trained, frozen) == (300_672, 100_224)
    assert phases == {"student sampling": 256 * 8 * 84 + 1280 * 8 * 64,  # KV cache + prefill: 827,392
                      "old log-probs": 1280 * 8 * 84,  # 860,160
                      "update": 25_056 * 4 + 2560 * 2 * 84,  # gradients + activations: 530,304
                      "teacher sampling": 256 * 2 * 4096 + 1280 * 2 * 3072}  # 9,961,472
    # peak: 400,896 + 9,961,472 = 10,362,368 bytes; the warning starts above 95% of the GPU
    for total, warned in ((10_907_756, False), (10_907_755, True)):  # 10,362,368 / 0.95 = 10,907,755.8
        monkeypatch.setattr(tt.torch.cuda, "get_device_properties",
                            lambda device: type("Props", (), {"total_memory": total})())
        tt.print_plan(run_, 0)
        assert ("more than this GPU" in capsys.readouterr().out) == warned
    args.grad_ckpt = False  # every layer keeps its 12 h + 3 I = 576 values: 2 layers x 2,304 bytes per token
    assert tt.memory_estimate(run_)[2]["update"] == 25_056 * 4 + 2 * 2304 * 2 * 84


def test_end_to_end_kl_penalty_uses_the_frozen_initial_model(model_dirs, train_file, tmp_path):
    out = tmp_path / "kl"
    assert run(base_args(model_dirs["bigram"], train_file, out, "--kl-beta", 0.1, "--lr", 1e-3)) == 0
    kl = [r["kl"] for r in read_jsonl(out / "metrics.jsonl")]
    assert all(k >= 0 for k in kl) and kl[1] > 0  # the student has moved away from the reference by step 2


def test_end_to_end_teacher_is_freed_when_guidance_ends(model_dirs, train_file, tmp_path, capsys):
    out = tmp_path / "sched"
    assert run(base_args(model_dirs["bigram"], train_file, out, "--schedule-steps", 2)) == 0  # Q = 1: step 1 only
    assert "guidance is over after step 1" in capsys.readouterr().out
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[0]["n_guided"] == 2 and rows[1]["n_selected"] == 0 and rows[1]["guidance_pct"] == 0
    assert run(["--resume", out, "--steps", 3]) == 0  # past the guided steps: no teacher is loaded
    assert "ThinkTuning (guidance over)" in capsys.readouterr().out


def test_end_to_end_resume_reproduces_uninterrupted_run(model_dirs, train_file, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(base_args(model_dirs["bigram"], train_file, full)) == 0
    assert run(base_args(model_dirs["bigram"], train_file, part) + ["--steps", 1]) == 0
    assert [r["step"] for r in read_jsonl(part / "metrics.jsonl")] == [1]
    assert run(["--resume", part, "--steps", 2]) == 0
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2]
    for key in ("reward", "loss", "grad_norm", "n_guided", "response_len"):
        assert a[1][key] == b[1][key], key
    assert torch.equal(weights(full / "ckpt"), weights(part / "ckpt"))
    # a finished run asked for no more steps does nothing and keeps its files
    assert run(["--resume", part, "--steps", 2]) == 0
    assert len(read_jsonl(part / "metrics.jsonl")) == 2


def test_end_to_end_ctrl_c_finishes_the_step_and_saves(model_dirs, train_file, tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, tt.__file__] + [str(a) for a in base_args(model_dirs["random"], train_file, out,
                                                                   "--no-teacher", "--steps", 100000)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "checkpoint saved" in stdout
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    saved = torch.load(out / "ckpt" / "trainer_state.pt", weights_only=False)
    assert saved["step"] == steps[-1] == len(steps) and saved["cursor"] == 2 * len(steps)


def test_end_to_end_interrupted_save_keeps_previous_checkpoint(model_dirs, train_file, tmp_path, monkeypatch):
    out = tmp_path / "save"
    assert run(base_args(model_dirs["random"], train_file, out, "--no-teacher", "--steps", 1)) == 0
    before = weights(out / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(out / "ckpt")

    def broken_save(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(KeyboardInterrupt):
        tt.save_checkpoint(str(out), model, None, {})
    assert torch.equal(weights(out / "ckpt"), before)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra,needle", [
    (["--group-size", 1], "--group-size"),
    (["--minibatches", 3], "--minibatches 3 must divide the 8 rollouts"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "gpu"], "use auto, cpu, cuda or cuda:N"),
    (["--lr=-1e-6"], "--lr and --grad-clip must be > 0"),
    (["--eval-limit", 0, "--eval", "gsm8k"], "--eval-limit must be at least 1"),
    (["--eval-every", 1, "--eval-every-limit", 0], "--eval-every-limit must be at least 1"),
    (["--eval-every", -1], "--eval-every -1 must be >= 0 (0: off)"),
    (["--eval-limit", -5, "--eval", "gsm8k"], "--eval-limit must be at least 1"),
    (["--eval-max-new-tokens", 0], "--eval-max-new-tokens must be at least 1"),
    (["--eval", ","], "names no benchmark"),
    (["--no-teacher", "--teacher", "x"], "--no-teacher and --teacher contradict"),
    (["--clip-eps", -1], "--clip-eps must be in (0, 1) and --dual-clip > 1"),
    (["--dual-clip", 0.5], "--clip-eps must be in (0, 1) and --dual-clip > 1"),
    (["--kl-beta", -1], "--kl-beta -1.0 must be >= 0"),
    (["--schedule-steps", -5], "--schedule-steps must be at least 1"),
    (["--log-samples", -1], "--log-samples -1 must be >= 0"),
    (["--teacher-text-max", 0], "--teacher-text-max must be at least 1"),
    (["--eval", "gsm8k", "--eval-temperature", 0.7], "--eval-temperature applies to --eval-samples > 1"),
    (["--eval", "gsm8k", "--compare", "a,b"], "--eval evaluates and --compare only reads"),
    (["--report", "r"], "--report draws a page from a run folder; it ignores --device, --group-size"),
    (["--teacher-model", "m"], "--teacher-model names a server's model: it needs --teacher http"),
    (["--teacher", "http://127.0.0.1:9/v1", "--teacher-timeout", 0], "--teacher-timeout 0.0: use a number"),
])
def test_check_args_bad_settings_fail_in_one_line(model_dirs, train_file, tmp_path, capsys, extra, needle):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run(base_args(model_dirs["random"], train_file, tmp_path / "x") + extra) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_to_problems_bad_data_fails_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no question here"}) + "\n")
    # the model name does not exist: reaching it would fail differently, so the data error came first
    assert run(["--model", "no/such-model", "--train-data", bad, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'question' or 'problem'" in err and len(err.splitlines()) == 1
    assert run(["--model", "no/such-model", "--train-data", tmp_path / "missing.jsonl", "--device", "cpu"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_end_to_end_existing_run_is_never_overwritten(model_dirs, train_file, tmp_path, capsys):
    out = tmp_path / "keep"
    assert run(base_args(model_dirs["random"], train_file, out, "--no-teacher", "--steps", 1)) == 0
    before = (out / "metrics.jsonl").read_text()
    assert run(base_args(model_dirs["random"], train_file, out, "--no-teacher", "--steps", 1)) == 2
    assert "--resume" in capsys.readouterr().err and (out / "metrics.jsonl").read_text() == before


def test_load_tokenizer_unknown_model_fails_in_one_line(train_file, tmp_path, capsys):
    assert run(["--model", "no-such-org/no-such-model", "--train-data", train_file, "--device", "cpu",
                "--out", tmp_path / "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not load model 'no-such-org/no-such-model'" in err and len(err.splitlines()) == 1


def test_end_to_end_non_finite_loss_skips_the_update(model_dirs, train_file, tmp_path, monkeypatch):
    real = tt.policy_loss
    monkeypatch.setattr(tt, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    monkeypatch.setattr(tt, "moves_weights", lambda rollout, args: True)  # compute every row, also A = 0
    out = tmp_path / "nan"
    assert run(base_args(model_dirs["random"], train_file, out, "--no-teacher", "--steps", 1)) == 0
    row = read_jsonl(out / "metrics.jsonl")[0]
    assert row["skipped_updates"] == 2 and row["loss"] is None and row["grad_norm"] is None  # no step: no value
    assert torch.equal(weights(out / "ckpt"), weights(model_dirs["random"]))


@pytest.fixture(scope="module")
def trained(model_dirs, train_file, tmp_path_factory):
    """A run folder after one step of vanilla GRPO (copy it before changing it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert run(base_args(model_dirs["random"], train_file, out, "--no-teacher", "--steps", 1)) == 0
    return out


def copy_run(trained, tmp_path, name="run"):
    shutil.copytree(trained, tmp_path / name)
    return tmp_path / name


def one_line_error(capsys, needle):
    """The command's last stderr line is one error naming the problem (transformers' loading bars may precede)."""
    err = capsys.readouterr().err.strip().splitlines()
    return bool(err) and err[-1].startswith("error:") and needle in err[-1] and sum("error" in e for e in err) == 1


def test_to_problems_checks_every_row(tmp_path, capsys):
    rows = [{"question": "a", "answer": "so 4\n#### 4"}, {"question": "b", "answer": "a worked solution, no gold"},
            {"question": "c", "answer": None}, {"question": "", "answer": "#### 2"}, {"question": "e", "answer": "#### 7"}]
    probs = tt.to_problems(rows, "mixed")
    assert [p["gold"] for p in probs] == ["4", "7"] and "3 of 5 rows skipped" in capsys.readouterr().out
    with pytest.raises(tt.UserError, match="no row has a usable answer"):
        tt.to_problems(rows[1:4], "bad")
    assert [p["gold"] for p in tt.to_problems([{"problem": "p", "answer": "\\frac12"}], "math")] == ["\\frac12"]
    # AIME files hold both 'question' and 'problem', and plain answers: not GSM8K style, nothing skipped
    aime = [{"question": "q1", "problem": "q1", "answer": "204"}, {"question": "q2", "problem": "q2", "answer": 25}]
    assert [p["gold"] for p in tt.to_problems(aime, "aime")] == ["204", "25"]
    zero = [{"problem": "What is 3 - 3?", "answer": 0}, {"problem": "What is 3 - 1?", "answer": 2}]
    assert [p["gold"] for p in tt.to_problems(zero, "ints")] == ["0", "2"]  # an integer 0 is a gold answer


def test_eval_labels_line_up_with_the_paper_and_never_collide():
    assert tt.eval_labels(["math500"]) == {"math500": "math500"}
    assert tt.eval_labels(["data/gsm8k_test.jsonl", "x/mini.jsonl"]) == {"data/gsm8k_test.jsonl": "gsm8k",
                                                                         "x/mini.jsonl": "mini"}
    assert tt.eval_labels(["a/mini.jsonl", "b/mini.jsonl"]) == {"a/mini.jsonl": "mini", "b/mini.jsonl": "b/mini.jsonl"}
    # a file named after a benchmark evaluated beside it keeps its path, whatever the order (it used to take the
    # label, and the benchmark then replaced it: the file was never evaluated)
    labels = tt.eval_labels(["data/math500_sample.jsonl", "math500"])
    assert labels == {"data/math500_sample.jsonl": "data/math500_sample.jsonl", "math500": "math500"}
    assert list(labels) == ["data/math500_sample.jsonl", "math500"]  # rows in the order asked for
    assert tt.eval_labels(["gsm8k", "gsm8k"]) == {"gsm8k": "gsm8k"}


def test_end_to_end_resume_eval_evaluates_the_checkpoint(trained, model_dirs, train_file, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    assert run(["--resume", out, "--eval", train_file, "--eval-limit", 2, "--max-new-tokens", 8]) == 0
    ev = json.load(open(out / "eval.json"))
    assert ev["model"] == str(out / "ckpt") and ev["limit"] == 2 and ev["max_new_tokens"] == 8
    assert ev["samples"] == 1 and ev["temperature"] == 0.0 and ev["results"]["train"]["n"] == 2
    assert ev["results"]["train"]["model"] == str(out / "ckpt") and ev["results"]["train"]["limit"] == 2
    assert "error" not in capsys.readouterr().err


def test_end_to_end_resume_says_where_and_keeps_a_history(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    assert run(["--resume", out, "--steps", 2]) == 0
    assert f"resuming {out} from step 2 (checkpoint of step 1)" in capsys.readouterr().out
    assert [json.loads(line)["first_step"] for line in open(out / "args_history.jsonl")] == [1, 2]
    assert run(["--resume", out, "--steps", 3, "--out", tmp_path / "elsewhere"]) == 2
    assert one_line_error(capsys, "cannot move it")
    assert run(["--resume", out, "--step", 3]) == 2  # abbreviated flags are refused, not silently ignored
    assert one_line_error(capsys, "unrecognized arguments: --step 3")


def test_end_to_end_folder_without_a_checkpoint_can_be_reused(model_dirs, train_file, tmp_path, capsys):
    out = tmp_path / "crashed"  # a run killed before its first checkpoint left only its logs
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward": 0.0}\n')
    assert run(base_args(model_dirs["random"], train_file, out, "--no-teacher", "--steps", 1)) == 0
    assert (out / "metrics.jsonl.aborted").read_text() == '{"step": 1, "reward": 0.0}\n'
    assert "note: step 1: every rollout earned 0" in capsys.readouterr().out  # random weights: no signal, said once
    assert len(read_jsonl(out / "metrics.jsonl")) == 1 and (out / "ckpt").exists()
    second = tmp_path / "crashed twice"  # a second aborted run keeps the first one's logs
    second.mkdir()
    for text in ('{"step": 1, "reward": 0.1}\n', '{"step": 1, "reward": 0.2}\n'):
        (second / "metrics.jsonl").write_text(text)
        tt.check_out_folder(SimpleNamespace(out=str(second), resume=None), str(second / "ckpt"), False)
    assert (second / "metrics.jsonl.aborted").read_text() == '{"step": 1, "reward": 0.1}\n'
    assert (second / "metrics.jsonl.aborted.2").read_text() == '{"step": 1, "reward": 0.2}\n'
    tt.HELD.pop(os.path.realpath(second)).close()


# a full disk as the OS reports it, and as torch.save (and safetensors) report it: not an OSError
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_end_to_end_failed_save_keeps_the_previous_checkpoint(trained, tmp_path, capsys, monkeypatch, error):
    out = copy_run(trained, tmp_path)
    before = weights(out / "ckpt")
    real_save = tt.torch.save

    def full_disk(obj, path, *a, **k):
        if str(path).endswith("trainer_state.pt"):
            raise error
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(tt.torch, "save", full_disk)
    assert run(["--resume", out, "--steps", 2]) == 2
    assert one_line_error(capsys, "the previous checkpoint is intact")
    assert not (out / "ckpt.tmp").exists() and torch.equal(weights(out / "ckpt"), before)
    monkeypatch.setattr(tt.torch, "save", real_save)
    assert run(["--resume", out, "--steps", 2]) == 0  # the folder is resumable


def test_end_to_end_save_killed_between_renames_is_recovered(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    os.rename(out / "ckpt", out / "ckpt.old")  # the state after the first of the two renames
    assert run(["--resume", out, "--steps", 2]) == 0
    assert "previous checkpoint (ckpt.old) is back" in capsys.readouterr().out and (out / "ckpt").exists()


def test_end_to_end_resume_after_the_model_folder_moved(model_dirs, train_file, tmp_path, capsys):
    src = tmp_path / "models" / "m"
    shutil.copytree(model_dirs["bigram"], src)
    out = tmp_path / "run"
    assert run(base_args(str(src), train_file, out, "--steps", 1, "--schedule-steps", 30)) == 0
    os.rename(src, tmp_path / "models" / "moved")
    assert run(["--resume", out, "--steps", 2]) == 2
    assert one_line_error(capsys, "pass its new place with --model")
    assert run(["--resume", out, "--steps", 2, "--model", tmp_path / "models" / "moved"]) == 0


def test_end_to_end_damaged_files_fail_in_one_line(trained, train_file, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run(["--model", "x", "--train-data", empty, "--device", "cpu", "--out", tmp_path / "e"]) == 2
    assert one_line_error(capsys, "empty.jsonl")
    out = copy_run(trained, tmp_path, "state")
    (out / "ckpt" / "trainer_state.pt").write_bytes(b"PK\x03\x04 cut short")
    assert run(["--resume", out, "--steps", 2]) == 2 and one_line_error(capsys, "checkpoint is damaged")
    out = copy_run(trained, tmp_path, "weights")
    (out / "ckpt" / "model.safetensors").write_bytes(b"cut short")
    assert run(["--model", out / "ckpt", "--eval", train_file, "--out", tmp_path / "ev"]) == 2
    assert one_line_error(capsys, "could not load the model weights")
    out = copy_run(trained, tmp_path, "config")
    (out / "ckpt" / "config.json").write_text("{ not json")
    assert run(["--model", out / "ckpt", "--eval", train_file, "--out", tmp_path / "ev"]) == 2
    assert one_line_error(capsys, "complete model folder")
    assert run(["--model", trained, "--eval", train_file, "--out", tmp_path / "ev"]) == 2
    assert one_line_error(capsys, f"its model is {trained / 'ckpt'}")


def test_end_to_end_torn_metrics_line_is_dropped_on_resume(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "rew')  # a crash mid-write
    assert run(["--resume", out, "--steps", 2]) == 0
    assert "a line cut short" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_writable_folder_says_what_is_wrong(tmp_path, capsys, train_file, model_dirs):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert run(["--model", model_dirs["random"], "--eval", train_file, "--out", a_file, "--device", "cpu"]) == 2
    assert one_line_error(capsys, "is a file, not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("this user can write anywhere")
        assert run(["--model", model_dirs["random"], "--eval", train_file, "--out", locked / "x", "--device", "cpu"]) == 2
        assert one_line_error(capsys, "cannot write in --out")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("text", ['{"results": {"gsm8k": {"n": 3}}}', "[1, 2]", '{"results": {',
                                  '{"results": {"gsm8k": {"accuracy": "high"}}}'])
def test_compare_runs_malformed_eval_json(tmp_path, capsys, text):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "eval.json").write_text(text)
    assert run(["--compare", tmp_path / "r"]) == 2 and one_line_error(capsys, "not an eval.json written by --eval")


def test_main_argparse_errors_are_one_line(capsys):
    for argv in (["--lr", "abc"], ["--dtype", "fp16"], ["--model", "m", "--ste", 4]):
        assert run(argv) == 2 and one_line_error(capsys, "--help lists the flags")


def test_start_run_missing_model_folder_makes_no_run_folder(train_file, tmp_path, capsys):
    assert run(["--model", tmp_path / "no" / "such", "--train-data", train_file, "--device", "cpu",
                "--out", tmp_path / "run"]) == 2
    assert one_line_error(capsys, "no such folder") and not (tmp_path / "run").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert run(["--model", "m", "--train-data", empty, "--device", "cpu"]) == 2
    assert one_line_error(capsys, "the file is empty")


# --------------------------------------------------------------------------------------------- it learns
# --------------------------------------------------------------------------------------------- evidence that it learns
def learn_args(minibatches, micro_batch):
    return type("A", (), {"minibatches": minibatches, "temperature": 1.0, "clip_eps": 0.2, "dual_clip": 3.0,
                          "kl_beta": 0.0, "grad_clip": 1.0, "micro_batch": micro_batch,
                          "guide_teacher_tokens_only": False})()


def test_learns_plain_grpo_on_a_toy_task(tok):
    # The toy task: reward 1 when the 3 sampled tokens (T = 1) hold a digit. The random tiny model gives each of
    # the ~100 tokens about the same probability, so a digit comes first 1 time in 10 and a response earns a
    # reward about 1 time in 4: most groups of G = 8 have spread. What the test reads is exact and noise-free: the
    # probability that the first response token is a digit, averaged over prompts never trained on.
    digits = tok.convert_tokens_to_ids([str(d) for d in range(10)])
    chat = lambda q: tt.render_chat(tok, [{"role": "user", "content": q}])  # noqa: E731
    prompts = [chat(q) for q in ("w1 is 2 + 3", "w2 is 4", "w3 x w4", "so the answer")]
    held_out = [chat(q) for q in ("w5 is w6", "the answer is", "w7 + w8 =")]
    G, steps = 8, 8
    # the static-cache sampler: the same draws as generate_plain (tested above), several times cheaper on a CPU
    how = tt.Sampling([tok.eos_token_id], tok.pad_token_id, 3, 1.0, fast=True, batch=32, prompt_len=16)
    args = learn_args(minibatches=1, micro_batch=32)

    @torch.no_grad()
    def p_digit(model):
        return sum(model(input_ids=torch.tensor([p])).logits[0, -1].softmax(-1)[digits].sum().item()
                   for p in held_out) / len(held_out)

    def train(sign):
        model = make_model(tok, seed=1)
        optim, rng, rewards = tt.MasterAdamW(model, 2e-2, 0.01), random.Random(0), []
        torch.manual_seed(0)
        for _ in range(steps):
            items = [tt.Rollout("q", "", p) for p in prompts for _ in range(G)]
            responses, finished = tt.generate(model, [r.prompt for r in items], how)
            for r, ids, done in zip(items, responses, finished):
                r.response, r.finished, r.n_student = ids, done, len(ids)
                r.reward = float(any(t in digits for t in ids))
            for r, a in zip(items, tt.group_advantages(torch.tensor([r.reward for r in items]), G).tolist()):
                r.adv = sign * a  # sign -1: a test-only mutation, the advantage turned against the reward
            tt.score_old(model, None, items, args)
            tt.update(model, items, optim, args, rng)
            rewards.append(sum(r.reward for r in items) / len(items))
        tt._forget_decoders(model)
        return p_digit(model), sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3

    start = p_digit(make_model(tok, seed=1))
    end, first_reward, last_reward = train(+1)
    flipped, first_flipped, last_flipped = train(-1)
    assert 0.05 < start < 0.15  # about 10 digits out of ~100 tokens (seen: 0.097)
    assert end > start + 0.2 and end > 2.5 * start  # seen: 0.097 -> 0.65
    assert last_reward > first_reward + 0.2  # the sampled reward, first 3 steps -> last 3 (seen: 0.35 -> 0.69)
    assert flipped < start  # the flipped sign unlearns the digits (seen: 0.097 -> 0.003)
    assert last_flipped < first_flipped  # (seen: 0.29 -> 0.05)


def test_learns_from_the_teacher_with_aas(tok):
    # ThinkTuning's mechanism with a stand-in teacher that always writes the right continuation. In each of 8
    # groups of G = 4 finished student answers, the first is spliced with the teacher's reflection (reward 1, as a
    # correct teacher answer grades) and the other three are the student's own wrong ones (reward 0), so
    # A = [1.5, -0.5, -0.5, -0.5]. Read: the mean log-probability of the teacher-written tokens (and EOS) given
    # prompt + student prefix. The teacher text is the same in every group, so what one mini-batch learns raises
    # the ratio of the teacher tokens in the next ones.
    eos, G = tok.eos_token_id, 4
    words = lambda s: tok.convert_tokens_to_ids(s.split())  # noqa: E731
    prompts = [tt.render_chat(tok, [{"role": "user", "content": f"w{k} is {k} + 3"}]) for k in range(8)]

    def rollouts(variant, first_rewards=(1.0,) * 8):  # the reward of each group's first rollout
        out = []
        for k, prompt in enumerate(prompts[:len(first_rewards)]):
            own = [words(f"w{20 + 4 * k + j} w{59 - k}") + [eos] for j in range(G)]  # the student's G answers
            spliced, n_student = tt.splice(own[0], "wait , checked the answer", "so \\boxed{5}", tok, eos)
            response, is_guided, n = {"aas": (spliced, True, n_student),  # ThinkTuning: guided, AAS
                                      "ppo": (spliced, False, len(spliced)),  # same tokens as the student's own
                                      "dropped": (own[0], False, len(own[0]))}[variant]  # teacher's part left out
            out.append(tt.Rollout("q", "5", prompt, response, True, is_guided, n, reward=first_rewards[k]))
            out += [tt.Rollout("q", "5", prompt, own[j], True, False, len(own[j]), reward=1.0 - first_rewards[k])
                    for j in range(1, G)]
        for r, a in zip(out, tt.group_advantages(torch.tensor([r.reward for r in out]), G).tolist()):
            r.adv = a
        return out

    guided = [r for r in rollouts("aas") if r.guided]
    n_student = guided[0].n_student  # 2 student tokens, then 11 teacher tokens and EOS, in every group

    @torch.no_grad()
    def teacher_logp(model):
        lp = tt.response_logprobs(model, [r.prompt for r in guided], [r.response for r in guided], 1.0)
        return lp[:, n_student:].sum(1).mean().item()

    def train(variant, steps=3):
        model, args = make_model(tok, seed=2), learn_args(minibatches=4, micro_batch=8)  # the paper's 4
        optim, rng = tt.MasterAdamW(model, 1e-2, 0.01), random.Random(0)
        for _ in range(steps):
            items = rollouts(variant)
            tt.score_old(model, None, items, args)
            stats = tt.update(model, items, optim, args, rng)
            assert stats["aas_tokens"] == (8 * len(guided[0].response) if variant == "aas" else 0)
        return teacher_logp(model) - start

    start = teacher_logp(make_model(tok, seed=2))
    aas, ppo, dropped = train("aas"), train("ppo"), train("dropped")
    # Fair comparisons: the same groups, rewards and advantages throughout. "dropped" has the guided rollout
    # without the teacher's part: the rise then owes nothing to training on the teacher's tokens (seen: -1.0).
    # "ppo" trains the very same tokens as the student's own. At ratio 1 its gradient equals AAS's up to the weight
    # p / (p + gamma) <= 1, so the only thing that can put AAS ahead is the clip: PPO stops pushing a teacher token
    # once a mini-batch sees its ratio above 1 + eps, while AAS never clips it (README: "a policy-gradient loss
    # that does not clip the teacher's unlikely tokens away").
    assert start < -40  # 12 tokens at about 1/100 each (seen: -55.7)
    assert aas > 20  # seen: +33.6 nats after 3 steps
    assert aas > ppo + 5 and aas > 1.25 * ppo  # seen: +33.6 against +20.0 (model seeds 0-7: 30-35 against 17-23)
    assert abs(dropped) < 5 and ppo > 10  # seen: -1.0, +20.0

    # The AAS weight on the first update (one mini-batch, one micro-batch: ratio 1, the stats one mean over the
    # step's tokens), computed here from the old log-probs: p = exp(old_logp), gamma = clip(A / 4000, +-0.001),
    # weight p / (p + gamma) on guided tokens, except those with A < 0 and p < 0.01 (routed to PPO). Two groups
    # where the teacher's answer won (A = 1.5) and one where it lost (A = -0.5, another answer got the reward).
    for teacher_only in (False, True):
        items = rollouts("aas", first_rewards=(1.0, 1.0, 0.0))
        model, args = make_model(tok, seed=2), learn_args(minibatches=1, micro_batch=len(items))
        args.guide_teacher_tokens_only = teacher_only
        tt.score_old(model, None, items, args)
        weights_, routed, negative = [], 0, 0
        for r in (r for r in items if r.guided):
            gamma = min(max(r.adv / 4000, -1e-3), 1e-3)
            for t, p in enumerate(r.old_logp.exp().tolist()):
                if t < (r.n_student if teacher_only else 0):
                    continue  # a student token, outside AAS with --guide-teacher-tokens-only
                if r.adv < 0 and p < 0.01:
                    routed += 1
                    continue
                assert 0 < p + gamma <= 1
                weights_.append(p / (p + gamma))
                negative += r.adv < 0
        assert routed > 0 and negative > 0  # both branches of the routing are exercised (seen: 10 and 4)
        stats = tt.update(model, items, tt.MasterAdamW(model, 1e-2, 0.01), args, random.Random(0))
        assert stats["aas_tokens"] == len(weights_)
        assert stats["aas_weight"] == pytest.approx(sum(weights_) / len(weights_), rel=1e-5)
        assert 0.9 < stats["aas_weight"] < 1  # damped below 1: p is about 0.01, gamma 0.000375 (seen: 0.972)


# ------------------------------------------------------------------------------------- stronger versions of weak tests
@pytest.mark.parametrize("extra", [(), ("--no-teacher",)])
def test_end_to_end_kl_reference_is_the_initial_model(model_dirs, train_file, tmp_path, monkeypatch, extra):
    # A KL penalty toward the student itself would still log kl > 0 by step 2 (the student moves between its
    # mini-batches), so read the reference itself: after training it must still hold the initial weights, while
    # the student has moved. With the teacher, the reference is the frozen teacher; with --no-teacher, its own copy.
    runs, start_run = [], tt.start_run

    def capture(args):  # the Run that main trains, kept for inspection
        runs.append(start_run(args))
        return runs[-1]

    monkeypatch.setattr(tt, "start_run", capture)
    out = tmp_path / "kl"
    assert run(base_args(model_dirs["bigram"], train_file, out, "--kl-beta", 0.1, "--lr", 1e-3, *extra)) == 0
    (r,) = runs
    initial = weights(model_dirs["bigram"])
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert r.ref is not None and r.ref is not r.student
    assert torch.equal(flat(r.ref), initial)
    # trained: 2 x 2 AdamW steps at lr 1e-3 move it by 2e-3 (weight decay alone would move it by 4e-5)
    assert (flat(r.student) - initial).abs().max() > 1e-4
    assert torch.equal(flat(r.student), weights(out / "ckpt"))
    assert all(row["kl"] > 0 for row in read_jsonl(out / "metrics.jsonl")[1:])


def test_parse_teacher_rejects_reason_and_phrase_swapped():
    assert tt.parse_teacher("<opinion>correct</opinion><phrase>b</phrase><reason>a</reason>") is None
    assert tt.parse_teacher("<opinion>correct</opinion><reason>a</reason><phrase>b</phrase>") == ("correct", "a", "b")


def test_splice_separators_reach_the_tokenizer(tok):
    # the word-level tokenizer drops whitespace, so the ids alone cannot show the "\n\n" separators: record the
    # text the tokenizer is handed
    class Recording:
        def __init__(self):
            self.texts = []

        def __call__(self, text, **kwargs):
            self.texts.append(text)
            return tok(text, **kwargs)

    eos, rec = tok.eos_token_id, Recording()
    ids, n_student = tt.splice([5, 6, 7, eos], "wait , checked", "so 5", rec, eos)
    assert rec.texts == ["\n\n" + "wait , checked" + "\n\n" + "so 5"]
    assert ids == [5, 6, 7] + tok.convert_tokens_to_ids(["wait", ",", "checked", "so", "5"]) + [eos]
    assert n_student == 3


def test_generate_static_writes_pad_after_a_rows_stop_token(tok):
    # the bigram model writes CHAIN greedily: from "so" it reaches EOS after 7 tokens, from "assistant" after 15.
    # With max_new = 12 the first row stops at step 7 while the second never does, so the loop runs all 12
    # steps and the first row's last 5 slots must hold the pad id, not what the model would write after EOS.
    model = make_bigram_model(tok)
    eos = tok.eos_token_id
    long_ = tt.render_chat(tok, [{"role": "user", "content": "w1 is 2 + 3"}])  # ends with "assistant"
    short = long_[:-1] + tok.convert_tokens_to_ids(["so"])
    tail = tok.convert_tokens_to_ids(CHAIN[CHAIN.index("so") + 1:])  # \ boxed { 5 } </phrase> EOS
    for pad in (tok.unk_token_id, tok.pad_token_id):  # a pad id of its own, and the tokenizer's (== EOS)
        how = tt.Sampling([eos], pad, 12, 0.0, batch=3, prompt_len=16)
        rows = tt.generate_static(model, [short, long_], how)
        assert rows[0] == tail + [pad] * 5
        assert rows[1] == tok.convert_tokens_to_ids(CHAIN[1:13])  # no stop token within 12
        assert rows == tt.generate_plain(model, [short, long_], how)  # transformers pads finished rows the same way
    tt._forget_decoders(model)


# --------------------------------------------------------------------------------------------- evaluation
def test_pass_at_k_by_hand():
    assert tt.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert tt.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert tt.pass_at_k(4, 1, 4) == 1.0 and tt.pass_at_k(4, 0, 4) == 0.0
    assert tt.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5) = 21, C(10,5) = 252


def test_gpqa_item_shuffle_is_deterministic_and_letters_map():
    row = {"Question": "Which is a noble gas?", "Correct Answer": "Argon", "Incorrect Answer 1": "Sodium",
           "Incorrect Answer 2": "Chlorine", "Incorrect Answer 3": "Iron"}
    a, b = tt.gpqa_item(row), tt.gpqa_item(dict(row))
    assert a == b
    line = next(ln for ln in a["question"].splitlines() if ln.startswith(f"({a['gold']})"))
    assert line == f"({a['gold']}) Argon"
    golds = {tt.gpqa_item({**row, "Question": f"Question {i}?"})["gold"] for i in range(40)}
    assert golds == set("ABCD")  # the seed differs per question


def test_end_to_end_eval_counts_and_table(model_dirs, tmp_path, capsys):
    # the bigram model always answers \boxed{5}: items with gold 5 are right, the others wrong
    a = tmp_path / "mini_a.jsonl"
    a.write_text("".join(json.dumps({"question": f"w{i} is", "answer": f"#### {g}"}) + "\n"
                         for i, g in enumerate([5, 7, 5, 9, 5])))
    b = tmp_path / "mini_b.jsonl"
    b.write_text("".join(json.dumps({"problem": f"w{i}", "answer": g}) + "\n" for i, g in enumerate(["5", "6"])))
    out = tmp_path / "ev"
    assert run(["--model", model_dirs["bigram"], "--eval", f"{a},{b}", "--out", out, "--device", "cpu",
                "--max-new-tokens", 20, "--eval-batch-size", 2]) == 0
    table = capsys.readouterr().out
    (a0, a1), (b0, b1) = _wilson(3, 5), _wilson(1, 2)  # 3 of 5 and 1 of 2 right, with 95% Wilson intervals
    assert f"| mini_a | 5 | 1 | 60.00 [{a0:.1f}, {a1:.1f}] |" in table and f"| mini_b | 2 | 1 | 50.00 [{b0:.1f}, {b1:.1f}] |" in table
    res = json.load(open(out / "eval.json"))["results"]
    preds = read_jsonl(out / "eval_samples.jsonl")
    assert len(preds) == 7 and res["mini_a"]["truncated_pct"] == 0
    assert [p["extracted"] for p in preds] == ["5"] * 7
    assert [p["correct"] for p in preds if p["benchmark"] == "mini_a"] == [True, False, True, False, True]
    # limit and sampling: 3 items x 2 samples, pass@2 reported; mini_b's earlier results are kept
    assert run(["--model", model_dirs["bigram"], "--eval", str(a), "--out", out, "--device", "cpu",
                "--max-new-tokens", 20, "--eval-limit", 3, "--eval-samples", 2, "--eval-temperature", 1.0]) == 0
    both = json.load(open(out / "eval.json"))["results"]
    res = both["mini_a"]
    assert res["n"] == 3 and "pass@2" in res and both["mini_b"]["n"] == 2
    preds = [p for p in read_jsonl(out / "eval_samples.jsonl") if p["benchmark"] == "mini_a"]
    assert len(preds) == 6 and len(read_jsonl(out / "eval_samples.jsonl")) == 8
    per_q = [sum(p["correct"] for p in preds if p["index"] == i) for i in range(3)]
    assert res["accuracy"] == pytest.approx(100 * sum(c / 2 for c in per_q) / 3)
    assert res["pass@2"] == pytest.approx(100 * sum(c > 0 for c in per_q) / 3)


def test_end_to_end_eval_every_logs_accuracy(model_dirs, train_file, tmp_path):
    out = tmp_path / "ee"
    assert run(base_args(model_dirs["bigram"], train_file, out, "--no-teacher", "--steps", 1, "--eval-every", 1,
                         "--eval-data", train_file, "--eval-every-limit", 4)) == 0
    row = read_jsonl(out / "metrics.jsonl")[0]
    # the first 4 items have golds 5, 7, 5, 7 and the bigram model greedily answers \boxed{5}
    assert row["eval_accuracy"] == 50.0 and row["eval_truncated_pct"] == 0.0


def _wilson(k, n, z=1.96):  # written out here from the textbook formula, independent of the file's own
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


def test_resume_args_another_device_chooses_its_dtype_again(tmp_path):
    parser = tt.build_parser()
    saved = vars(parser.parse_args(["--model", "m"]))
    (tmp_path / "args.json").write_text(json.dumps({**saved, "device": "cuda", "dtype": "bfloat16", "lr": 3e-6}))
    args = tt.check_args(tt.resume_args(parser, ["--resume", str(tmp_path), "--device", "cpu"]))
    assert (args.device, args.dtype, args.lr) == ("cpu", "float32", 3e-6)  # not bf16 on the CPU; the rest kept
    args = tt.resume_args(parser, ["--resume", str(tmp_path), "--device", "cpu", "--dtype", "bfloat16"])
    assert args.dtype == "bfloat16"  # asked for
    assert tt.resume_args(parser, ["--resume", str(tmp_path)]).dtype == "bfloat16"  # same device: as saved


def test_read_runs_same_names_keep_one_column_each(tmp_path):
    a, b = tmp_path / "x" / "run", tmp_path / "run"
    for folder, acc in ((a, 30.0), (b, 70.0)):
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps({"results": {"gsm8k": {"accuracy": acc, "n": 10}}}))
    runs = tt.read_runs([str(a), str(b), str(b) + "/"])  # the same base name twice, and one folder repeated
    assert {name: res["gsm8k"]["accuracy"] for name, (res, _) in runs.items()} == {str(a): 30.0, str(b): 70.0}
    assert list(tt.read_runs([str(a), str(tmp_path)], strict=False)) == ["run", tmp_path.name]  # distinct: base names


def test_compare_runs_table(tmp_path, capsys):
    # two runs on the same 500 questions: 40% and 47.5%; their greedy answers disagree on 5 + 42 questions
    for name, acc, right in (("zero-shot", 40.0, set(range(200))), ("tt", 47.5, set(range(5, 242)))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"results": {
            "math500": {"accuracy": acc, "n": 500}, **({"gsm8k": {"accuracy": 70.25, "n": 400}} if name == "tt" else {})}}))
        (tmp_path / name / "eval_samples.jsonl").write_text("".join(
            json.dumps({"benchmark": "math500", "index": i, "sample": 0, "correct": i in right}) + "\n" for i in range(500)))
    assert run(["--compare", f"{tmp_path / 'zero-shot'},{tmp_path / 'tt'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| benchmark | run | n | accuracy % [95% CI] | paired n | right only in zero-shot | right only "
                        "in this run | McNemar p against zero-shot |")
    (a0, a1), (b0, b1) = _wilson(200, 500), _wilson(237.5, 500)
    # McNemar: b = 5 (right only in zero-shot), c = 42; p = 2 * sum_{i <= 5} C(47, i) / 2^47
    p = 2 * sum(math.comb(47, i) for i in range(6)) / 2 ** 47
    assert lines[2:] == [f"| math500 | zero-shot | 500 | 40.00 [{a0:.1f}, {a1:.1f}] | - | - | - | - |",
                         f"| math500 | tt | 500 | 47.50 [{b0:.1f}, {b1:.1f}] | 500 | 5 | 42 | {p:.3g} |",
                         "| math500 | paper GRPO | full | 45.46 | - | - | - | - |",
                         "| math500 | paper ThinkTuning | full | 47.54 | - | - | - | - |",
                         "| gsm8k | zero-shot | - | - | - | - | - | - |",
                         f"| gsm8k | tt | 400 | 70.25 [{_wilson(281, 400)[0]:.1f}, {_wilson(281, 400)[1]:.1f}] | - | - | - | - |",
                         tt.COMPARE_NOTE]
    assert run(["--compare", str(tmp_path / "missing")]) == 2


def test_next_questions_wraps_epochs_with_fresh_shuffles():
    problems = [{"question": str(i)} for i in range(5)]
    stream = [q["question"] for q in tt.next_questions(problems, 0, 0, 15)]
    epochs = [stream[0:5], stream[5:10], stream[10:15]]
    assert all(sorted(e) == list("01234") for e in epochs)  # every epoch is a permutation of the data
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    assert [q["question"] for q in tt.next_questions(problems, 0, 7, 4)] == stream[7:11]  # resumable by cursor


def test_gold_from_answer():
    assert tt.gold_from_answer("She pays 2 * 600 = 1,200 dollars.\n#### 1,200") == "1200"
    assert tt.gold_from_answer("\\frac{1}{2}") == "\\frac{1}{2}"


def test_main_out_of_memory_names_the_flags(monkeypatch, capsys, train_file):
    def oom(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(tt, "train", oom)
    assert run(["--model", "x", "--train-data", train_file, "--device", "cpu"]) == 3
    err = capsys.readouterr().err.strip()
    assert "--micro-batch" in err and "--prompts-per-step" in err and len(err.splitlines()) == 1


def test_load_benchmark_unknown_name_lists_the_names(capsys):
    assert run(["--model", "x", "--eval", "gsm8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown benchmark 'gsm8'" in err and "math500" in err and len(err.splitlines()) == 1


def test_load_benchmark_reads_a_hub_dataset_from_its_test_split(monkeypatch):
    import datasets
    row = lambda q: {"question": q, "answer": f"#### {len(q)}"}  # noqa: E731
    hub = {"org/two": {"train": [row("t")], "test": [row("held out")]}, "org/lone": {"train": [row("only")]},
           "org/odd": {"train": [row("t")], "validation": [row("v")]}}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: hub[name])
    assert [p["question"] for p in tt.load_problems("org/two")] == ["t"]  # training data: the train split
    assert [p["question"] for p in tt.load_benchmark("org/two")] == ["held out"]  # evaluation: never train
    assert [p["question"] for p in tt.load_benchmark("org/lone")] == ["only"]  # a lone split is the data
    with pytest.raises(tt.UserError, match="has no 'test' split \\(it has train, validation\\)"):
        tt.load_benchmark("org/odd")


def test_load_benchmark_gpqa_unreachable_says_how_to_get_it():
    with pytest.raises(tt.UserError, match="gated"):
        tt.load_benchmark("gpqa")


# --------------------------------------------------------------------------------------------- report page
VOID = {"meta", "br", "img", "hr", "input", "link"}
# every per-step curve the page draws from the fake metrics below (peak_mem_gb and kl are never logged)
METRICS = ["reward", "reward_guided", "reward_unguided", "eval_accuracy", "response_len", "finished_frac",
           "reflect_rate", "guidance_pct", "clip_frac", "dual_clip_frac", "aas_weight", "aas_weight_teacher", "grad_norm",
           "loss",
           "t_student", "t_teacher", "t_logprob", "t_update"]


class Page(HTMLParser):
    """Every element as (tag, attrs, text inside), and a check that each opened element is closed in order."""
    def __init__(self, text):
        super().__init__()
        self.elements, self.stack = [], []
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed: {self.stack}"

    def handle_starttag(self, tag, attrs):
        self.elements.append([tag, dict(attrs), ""])
        if tag not in VOID:
            self.stack.append(self.elements[-1])

    def handle_startendtag(self, tag, attrs):
        self.elements.append([tag, dict(attrs), ""])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        for el in self.stack:
            el[2] += data

    def find(self, tag, **attrs):
        return [(a, t) for g, a, t in self.elements if g == tag and all(a.get(k) == v for k, v in attrs.items())]


def metric_rows():
    """5 steps, the first two guided; eval at steps 3 and 5; one step without a grad norm."""
    rows = []
    for s in range(1, 6):
        g = s <= 2
        rows.append({"step": s, "reward": 0.1 * s, "reward_guided": 0.5 if g else None,
                     "reward_unguided": 0.05 * s, "zero_spread_groups": 1, "guidance_pct": 100 - 25 * s,
                     "n_selected": 2 if g else 0, "teacher_asked": 2 if g else 0, "n_guided": [2, 1, 0, 0, 0][s - 1],
                     "teacher_format_pass": 1.0 if g else None, "response_len": 100 + s, "finished_frac": 0.9,
                     "reflect_rate": 0.1 * s, "loss": -0.01 * s, "grad_norm": None if s == 4 else 0.5,
                     "skipped_updates": 0, "clip_frac": 0.01, "dual_clip_frac": 0.0,
                     "aas_weight": 0.97 if g else None, "aas_weight_teacher": 0.02 if g else None,
                     "aas_tokens": 30 if g else 0, "t_student": 3.0,
                     "t_teacher": 2.0 if g else 0.0, "t_logprob": 0.5, "t_update": 1.5, "extra_key": "x"})
        if s in (3, 5):
            rows[-1]["eval_accuracy"] = 20.0 + s
    return rows


GUIDED = [
    {"step": 1, "question": "What is 2+2?", "gold": "4", "reward": 1.0, "guided": True, "adv": 0.8,
     "student": "It is 5", "teacher": "Wait, 2+2=4.", "tokens": ["It", " is", " 5", "\n", "Wait", ",", " 2+2=4", "."],
     "n_student": 4, "p": [0.9, 0.8, 0.001, 0.7, 0.02, 0.5, 0.0004, 0.9],
     "weight": [None, None, None, None, 0.95, 0.998, 0.2857, 0.999]},
    {"step": 2, "question": "Is 3 < 5 & \"true\"? " + "x" * 400, "gold": "yes", "reward": 0.0, "guided": True,
     "adv": -1.25, "student": "No", "teacher": "<hmm> & yes", "tokens": ["No", "<hmm>", " &", " \"yes\""],
     "n_student": 1, "p": [0.6, 0.005, 0.3, 0.2], "weight": [1.0017, None, 1.0033, 1.005], "new_key": 1},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def eval_json(acc_math=40.0):
    return {"model": "m", "samples": 1, "temperature": 0.0, "max_new_tokens": 512, "limit": 10,
            "results": {"math500": {"n": 10, "samples": 1, "accuracy": acc_math, "mean_length": 300.0,
                                    "truncated_pct": 10.0},
                        "gsm8k": {"n": 10, "samples": 4, "accuracy": 80.0, "mean_length": 120.0,
                                  "truncated_pct": 0.0, "pass@4": 90.0}}}


def eval_preds(correct):
    return [{"benchmark": "math500", "index": i, "sample": 0, "question": "q", "gold": "1", "response": "r",
             "extracted": "1", "correct": c, "finished": True, "length": 10} for i, c in enumerate(correct)]


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run_a"
    out.mkdir()
    write_jsonl(out / "metrics.jsonl", metric_rows())
    unguided = {"step": 3, "question": "q3", "gold": "1", "reward": 0.0, "guided": False, "adv": -0.5,
                "student": "plain text", "teacher": None}
    reply = {"step": 1, "kind": "teacher_reply", "text": "Wait...", "passed": True, "why": "ok"}
    write_jsonl(out / "samples.jsonl", [GUIDED[0], reply, GUIDED[1], unguided])
    (out / "eval.json").write_text(json.dumps(eval_json()))
    write_jsonl(out / "eval_samples.jsonl", eval_preds([True] * 4 + [False] * 6))
    return out


def page_of(out, **kw):
    return Page(open(tt.write_report(str(out), **kw), encoding="utf-8").read())


def test_report_parses_with_title_and_no_script(run_dir):
    page = page_of(run_dir)
    assert "run_a" in page.find("h1")[0][1]
    assert not page.find("script") and page.find("style")


def test_report_one_curve_per_metric_with_as_many_points_as_steps(run_dir):
    page, rows = page_of(run_dir), metric_rows()
    for m in METRICS:
        lines = page.find("polyline", **{"data-metric": m})
        assert len(lines) == (2 if m == "grad_norm" else 1), m  # grad_norm has no value at step 4: a gap
        want = sum(r.get(m) is not None for r in rows)
        assert sum(len(a["points"].split()) for a, _ in lines) == want, m
    assert not page.find("polyline", **{"data-metric": "peak_mem_gb"})  # never logged: no chart
    assert {a["data-metric"] for a, _ in page.find("svg")} >= {"reward", "clip", "seconds", "eval_accuracy"}


def test_report_guided_steps_shaded_in_every_chart(run_dir):
    page = page_of(run_dir)
    svgs = [i for i, (g, a, _) in enumerate(page.elements) if g == "svg"]
    for start, end in zip(svgs, svgs[1:] + [len(page.elements)]):
        bands = [a for g, a, _ in page.elements[start:end] if g == "rect" and a.get("class") == "band"]
        frame = next(a for g, a, _ in page.elements[start:end] if g == "rect" and a.get("class") == "frame")
        (x1, w1), (x2, w2) = [(float(b["x"]), float(b["width"])) for b in bands]  # steps 1 and 2, of 1-5
        assert x1 == float(frame["x"]) and x2 == pytest.approx(x1 + w1, abs=0.11)  # one shaded stretch
        assert x2 + w2 == pytest.approx(x1 + float(frame["width"]) * 1.5 / 4, abs=0.2)  # to step 2.5 of 1-5


def test_report_token_spans_equal_sample_tokens_and_weights(run_dir):
    spans = [a for a, _ in page_of(run_dir).find("span") if "data-tok" in a]
    want = [(t, w) for s in (GUIDED[1], GUIDED[0]) for t, w in zip(s["tokens"], s["weight"])]  # latest first
    assert [a["data-tok"] for a in spans] == [t for t, _ in want]
    assert [None if a["data-w"] == "ppo" else float(a["data-w"]) for a in spans] == [w for _, w in want]


def test_report_ppo_tokens_marked_and_teacher_tokens_styled(run_dir):
    spans = [a for a, _ in page_of(run_dir).find("span") if "data-tok" in a]
    assert [("ppo" in a["class"].split()) for a in spans] == [a["data-w"] == "ppo" for a in spans]
    assert sum(a["data-w"] == "ppo" for a in spans) == 5
    teacher = [a["data-tok"] for a in spans if "tt" in a["class"].split()]
    assert teacher == GUIDED[1]["tokens"][1:] + GUIDED[0]["tokens"][4:]
    assert all("background" in a["style"] for a in spans if a["data-w"] != "ppo")


def test_report_rollout_header_and_escaping(run_dir):
    text = open(tt.write_report(str(run_dir)), encoding="utf-8").read()
    assert "advantage -1.250" in text and "advantage +0.800" in text
    assert "<hmm>" not in text and "&lt;hmm&gt;" in text
    assert "x" * 400 not in text  # question truncated
    assert "\u21b5" in text  # the newline token is visible
    assert "1 passed the format check" in text


def test_report_no_guided_samples(run_dir):
    write_jsonl(run_dir / "samples.jsonl", [{"step": 1, "question": "q", "gold": "1", "reward": 0.0,
                                         "guided": False, "adv": 0.0, "student": "just me", "teacher": None}])
    page = page_of(run_dir)
    assert not [a for a, _ in page.find("span") if "data-tok" in a]
    assert "No guided rollouts" in open(run_dir / "report.html").read() and "just me" in open(run_dir / "report.html").read()


def test_report_only_eval_json(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(eval_json()))
    page = page_of(tmp_path)
    assert not page.find("svg") and page.find("table")
    assert any("math500" in t for _, t in page.find("td"))


def test_report_empty_folder(tmp_path, capsys):
    assert page_of(tmp_path).find("h1")
    assert run(["--report", tmp_path]) == 0 and f"wrote {tmp_path / 'report.html'}" in capsys.readouterr().out
    assert run(["--report", tmp_path / "missing"]) == 2 and "no such run folder" in capsys.readouterr().err


def test_report_eval_table_interval_and_paper(run_dir):
    cells = [t for _, t in page_of(run_dir).find("td")]
    assert "40.00 [16.8, 68.7]" in cells  # 4 of 10 questions, Wilson 95%
    assert "80.00 [49.0, 94.3]" in cells  # 4 samples each, but the trials are the 10 questions: as 8 of 10
    assert "45.46" in cells and "47.54" in cells
    assert "pass@4 90.00" in cells


def test_report_compare_two_runs(run_dir, tmp_path):
    other = tmp_path / "run_b"
    other.mkdir()
    (other / "eval.json").write_text(json.dumps(eval_json(acc_math=90.0)))
    write_jsonl(other / "eval_samples.jsonl", eval_preds([True] * 9 + [False]))
    rows = [a for a in page_of(run_dir, others=[str(other)]).elements if a[0] == "tr"]
    row = [r[2] for r in rows if "run_b" in r[2] and "math500" in r[2]][0]
    assert "90.00" in row and "0.0625" in row  # b = 0, c = 5


def test_paired_test_counts():
    a = eval_preds([True, True, False, False, True])
    b = eval_preds([True, False, True, True, True])[:4] + [{"benchmark": "gsm8k", "index": 4, "correct": False}]
    assert tt.paired_test(a, b, "math500") == (4, 1, 2, 1.0)
    later = [{**r, "sample": 1, "correct": not r["correct"]} for r in b]  # non-greedy samples are not paired
    assert tt.paired_test(a, b + later, "math500") == (4, 1, 2, 1.0)


def test_wilson_interval_hand_worked():
    # p = .8, z^2 = 3.8416: centre = (.8 + .19208) / 1.38416 = .71674, half = 1.96 * sqrt(.016 + .009604) / 1.38416
    lo, hi = tt.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


def test_wilson_interval_edges():
    assert tt.wilson_interval(0, 10) == pytest.approx((0.0, 3.8416 / 13.8416), abs=1e-9)
    lo, hi = tt.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / 13.8416, abs=1e-9)
    assert tt.wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_hand_worked():
    assert tt.mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 128)
    assert tt.mcnemar_exact(6, 1) == tt.mcnemar_exact(1, 6)
    assert tt.mcnemar_exact(0, 5) == pytest.approx(0.0625)


def test_mcnemar_exact_no_discordant_or_balanced():
    assert tt.mcnemar_exact(0, 0) == 1.0
    assert tt.mcnemar_exact(5, 5) == 1.0


# --------------------------------------------------------------------------------------------- course kit
HANDOUT_CHECK = r"""
import json, os, shutil, sys
import pytest
here, root, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")


class Outcomes:  # a pytest plugin that records the outcome of every test's call
    def __init__(self):
        self.seen = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.seen[report.nodeid.split("::")[-1]] = report.outcome


def run(folder, selector):
    for name in ("thinktuning", "test_thinktuning"):
        sys.modules.pop(name, None)
    sys.path.insert(0, folder)
    rec = Outcomes()  # --rootdir: no folder above the file can match the -k selector
    # only outcomes are needed: no assertion rewriting and no end-of-session garbage collection (seconds per run)
    pytest.main(["-q", "--tb=no", "--assert=plain", "-p", "no:cacheprovider", "-p", "no:warnings", "-p",
                 "no:unraisableexception", "--rootdir", folder, "-k", selector, os.path.join(folder, "test_thinktuning.py")],
                plugins=[rec])
    sys.path.remove(folder)
    return rec.seen


os.environ["THINKTUNING_HANDOUT_CHECK"] = "1"  # the tests that run this script do not run it again
out = {"reference": run(here, " or ".join(names))}
for i, name in enumerate(names):
    folder = os.path.join(root, f"handout{i}")
    os.makedirs(folder)
    shutil.copy(os.path.join(here, "test_thinktuning.py"), folder)
    sys.modules.pop("thinktuning", None)
    sys.path.insert(0, here)
    import thinktuning
    sys.path.remove(here)
    with open(os.path.join(folder, "thinktuning.py"), "w") as f:
        f.write(thinktuning.handout([name]))
    out[name] = run(folder, name)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(os.environ.get("THINKTUNING_HANDOUT_CHECK") == "1", reason="inside a handout check")
def test_end_to_end_handouts_fail_exactly_their_exercises_tests(tmp_path):
    # every exercise: its handout imports, the tests `-k NAME` selects fail on it and pass on the reference
    here = os.path.dirname(os.path.abspath(tt.__file__))
    script = tmp_path / "check.py"
    script.write_text(HANDOUT_CHECK)
    proc = subprocess.run([sys.executable, str(script), here, str(tmp_path), ",".join(tt.EXERCISES)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    reference = result.pop("reference")
    assert reference and set(reference.values()) == {"passed"}, reference
    for name in tt.EXERCISES:
        selected = result[name]
        assert selected and all(t.startswith(f"test_{name}_") for t in selected), (name, selected)
        assert set(selected.values()) == {"failed"}, (name, selected)
        assert {t for t in reference if t.startswith(f"test_{name}_")} == set(selected), name


def test_end_to_end_handout_of_every_exercise_still_runs(tmp_path, capsys):
    assert run(["--exercise", ",".join(tt.EXERCISES)]) == 0
    text = capsys.readouterr().out
    (tmp_path / "thinktuning.py").write_text(text)
    assert all(f'    raise NotImplementedError("exercise: write {name} (README' in text for name in tt.EXERCISES)
    assert "return (adv / 4000).clamp" not in text and '"""gamma(A) = clip(A / 4000' in text  # docstrings stay
    proc = subprocess.run([sys.executable, str(tmp_path / "thinktuning.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--exercise" in proc.stdout
    assert run(["--exercise", "policy_loss,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown exercise nope" in err and "group_advantages" in err and len(err.splitlines()) == 1
    assert run(["--exercise", "list"]) == 0
    assert "policy_loss          pytest test_thinktuning.py -k policy_loss" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- teacher server
# A real OpenAI-compatible server on 127.0.0.1 (standard library http.server in a thread). Each test gives it a
# behaviour: a function of the request number (0, 1, ...) and the request's JSON body that returns what to send.
GOOD_REPLY = "<opinion>correct</opinion>\n<reason>wait checked</reason>\n<phrase>so \\boxed{5}</phrase>"


def _chat_reply(content, finish="stop"):
    return 200, json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                         "finish_reason": finish}]})


@pytest.fixture
def teacher_server():
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def send(self, status, text):
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            server.seen.append(("GET", self.path, dict(self.headers), None))
            if self.path == "/v1/models":
                self.send(200, json.dumps({"object": "list", "data": [{"id": "tiny-teacher", "object": "model"}]}))
            else:
                self.send(404, "{}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                n = len([s for s in server.seen if s[0] == "POST"])
                server.seen.append(("POST", self.path, dict(self.headers), body))
            status, text = server.behave(n, body)
            if status is None:  # never answer in time
                time.sleep(text)
                return
            self.send(status, text)

    lock = threading.Lock()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.seen, server.behave = [], lambda n, body: _chat_reply(GOOD_REPLY)
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()  # quick shutdown
    yield server
    server.shutdown()
    server.server_close()


def served_run(model_dirs, train_file, out, server, *extra):
    """One guided step of the bigram student with the teacher behind `server`; (exit status, metrics, replies)."""
    status = run(base_args(model_dirs["bigram"], train_file, out, "--steps", 1, "--teacher", server.url,
                           "--log-samples", 8, *extra))
    samples = read_jsonl(out / "samples.jsonl")
    return status, read_jsonl(out / "metrics.jsonl")[0], [s for s in samples if s.get("kind") == "teacher_reply"]


def test_teacher_server_replies_are_taken_up(model_dirs, train_file, tmp_path, teacher_server, monkeypatch):
    monkeypatch.setenv("TEACHER_API_KEY", "sk-secret-123")
    status, m, replies = served_run(model_dirs, train_file, tmp_path / "a", teacher_server)
    assert status == 0 and m["teacher_asked"] == 2 and m["n_guided"] == 2 and m["teacher_format_pass"] == 1.0
    assert all(r["passed"] and r["text"] == GOOD_REPLY for r in replies)
    posts = [s for s in teacher_server.seen if s[0] == "POST"]
    assert len(posts) == 2 and all(p[1] == "/v1/chat/completions" for p in posts)
    samples = read_jsonl(tmp_path / "a" / "samples.jsonl")
    guided = [s for s in samples if s.get("guided")]
    assert len(guided) == 2 and all(s["teacher"] == "waitcheckedso\\boxed{5}" for s in guided)
    for (_, _, headers, body), s in zip(posts, guided):  # the same messages as a local teacher gets, greedy
        assert body["model"] == "tiny-teacher" and body["temperature"] == 0 and body["max_tokens"] == 24
        assert headers["Authorization"] == "Bearer sk-secret-123"
        assert body["messages"][:-1] == tt.teacher_messages("q", "r")[:-1]  # system prompt and demonstrations
        assert body["messages"][-1]["content"].startswith("Problem:\nw")
    assert {b["messages"][-1]["content"] for *_, b in posts} == {
        tt.teacher_query(s["question"], s["student"]) for s in guided}
    assert all(s["reward"] == float(s["gold"] == "5") for s in guided)  # graded on the teacher's answer
    for path in (tmp_path / "a").rglob("*"):  # the key is never written anywhere
        assert not path.is_file() or b"sk-secret-123" not in path.read_bytes()


@pytest.mark.parametrize("behave, why", [
    (lambda n, body: _chat_reply("I think it is 5."), "not the three tags in order"),
    (lambda n, body: _chat_reply(GOOD_REPLY[:40], finish="length"), "not finished within --teacher-max-new-tokens"),
    (lambda n, body: (200, "<html>not json"), "JSONDecodeError"),
    (lambda n, body: (200, json.dumps({"choices": []})), "IndexError"),
])
def test_teacher_server_bad_replies_leave_the_rollout_unguided(model_dirs, train_file, tmp_path, teacher_server,
                                                               behave, why):
    teacher_server.behave = behave
    status, m, replies = served_run(model_dirs, train_file, tmp_path / "a", teacher_server)
    assert status == 0 and m["n_guided"] == 0 and m["teacher_asked"] == 2 and m["teacher_format_pass"] == 0
    assert len(replies) == 2 and all(not r["passed"] and why in r["why"] for r in replies)
    assert (tmp_path / "a" / "ckpt" / "model.safetensors").exists()  # training went on
    tries = 3 if "Error" in why else 1  # a reply that arrives is not asked for again; a failed request is
    assert len([s for s in teacher_server.seen if s[0] == "POST"]) == 2 * tries


def test_teacher_server_error_then_success_is_retried(model_dirs, train_file, tmp_path, teacher_server):
    teacher_server.behave = lambda n, body: (500, "{}") if n == 0 else _chat_reply(GOOD_REPLY)
    status, m, replies = served_run(model_dirs, train_file, tmp_path / "a", teacher_server)
    assert status == 0 and m["n_guided"] == 2 and all(r["passed"] for r in replies)
    assert len([s for s in teacher_server.seen if s[0] == "POST"]) == 3


def test_teacher_server_timeout_leaves_the_rollout_unguided(model_dirs, train_file, tmp_path, teacher_server):
    slow = []  # the first query asked never gets an answer in time, in any of its tries; the other does

    def behave(n, body):
        query = body["messages"][-1]["content"]
        slow.append(query) if not slow else None
        return (None, 2.0) if query == slow[0] else _chat_reply(GOOD_REPLY)
    teacher_server.behave = behave  # 0.5 s: room for the other reply on a busy machine, none for the slow one
    status, m, replies = served_run(model_dirs, train_file, tmp_path / "a", teacher_server, "--teacher-timeout", 0.5)
    failed = [r for r in replies if not r["passed"]]
    assert status == 0 and len(replies) == 2 and m["n_guided"] == 1 and len(failed) == 1
    assert all(r["why"].startswith("teacher server failed 3 times") and "timed out" in r["why"] for r in failed)


def test_teacher_server_down_at_start_is_one_line_before_any_model(model_dirs, train_file, tmp_path, capsys):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broken = tmp_path / "broken"  # a model folder whose weights cannot load: a load before the check would say so
    shutil.copytree(model_dirs["bigram"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    args = base_args(str(broken), train_file, tmp_path / "a", "--teacher", f"http://127.0.0.1:{port}/v1")
    assert run(args) == 2
    assert one_line_error(capsys, f"no OpenAI-compatible server answers at http://127.0.0.1:{port}/v1/models")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


@pytest.mark.parametrize("word, share", [("checked", 0.0), ("wait", 100.0)])
def test_evaluate_counts_reflective_answers(tok, word, share):
    # greedy, the bigram model writes CHAIN; with "wait" in place of "checked" every answer holds a reflection
    model = make_bigram_model(tok, chain=[word if t == "checked" else t for t in CHAIN])
    how = tt.Sampling([tok.eos_token_id], tok.pad_token_id, 20, batch=4)
    items = [{"question": f"w{i} is", "gold": "5"} for i in range(3)]
    summary, preds = tt.evaluate(model, tok, items, how)
    assert [word in p["response"] for p in preds] == [True] * 3 and summary["reflective_pct"] == share
    row = tt.eval_rows({"b": summary})[0]
    assert row[tt.EVAL_HEAD.split("|").index("reflective %")] == f"{share:.1f}"


def test_teacher_panel_per_step(model_dirs, train_file, tmp_path, teacher_server):
    # step 1: the first reply fails the format, the second passes; the page's teacher table says so per step
    teacher_server.behave = lambda n, body: _chat_reply("no tags" if n == 0 else GOOD_REPLY)
    status, m, replies = served_run(model_dirs, train_file, tmp_path / "a", teacher_server)
    assert status == 0 and m["teacher_why"] == {"not the three tags in order": 1} and m["n_guided"] == 1
    page = (tmp_path / "a" / "report.html").read_text()
    Page(page)  # well formed
    rows = [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", tr)] for tr in re.findall(r"<tr>(.*?)</tr>", page)]
    rows = [r for r in rows if r and r[0] == "1"]
    own = [s for s in read_jsonl(tmp_path / "a" / "samples.jsonl") if s.get("kind") != "teacher_reply"]
    assert rows == [["1", "2", "1", "1 x not the three tags in order", f"{m['reward_guided']:.3g}",
                     f"{m['reward_unguided']:.3g}", f"{m['reflect_rate']:.3g}"]]
    assert len(own) == 8 and m["reflect_rate"] == sum("wait" in s["student"] for s in own if not s["guided"]) / 7


@pytest.mark.parametrize("adv, expected", [(-1.0, 3.0), (1.0, -1.2)])
def test_policy_loss_huge_log_ratio_stays_finite(adv, expected):
    # a token routed to PPO whose old log-prob is -120 and new one -20: rho = e^100 overflows float32 without the
    # clamp, and the backward pass turns the whole batch's gradient into NaN. Both branches are clipped here:
    # A < 0 -> the dual clip's constant -A c = 3, A > 0 -> -A (1 + eps) = -1.2; the gradient is 0.
    logp = torch.tensor([[-20.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-120.0, -1.0]])
    mask, guided = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)
    loss, _ = tt.policy_loss(logp, old, torch.tensor([adv]), mask, guided)
    loss.backward()
    assert loss.item() == pytest.approx(expected) and torch.isfinite(logp.grad).all() and logp.grad.abs().max() == 0



# --------------------------------------------------------------------------------------------- results you can trust
def test_run_folder_is_held_by_one_process(model_dirs, train_file, tmp_path, capsys):
    out, data = tmp_path / "a", tmp_path / "mini.jsonl"
    data.write_text(json.dumps({"question": "w1 is", "answer": "#### 5"}) + "\n")
    here = os.path.dirname(os.path.abspath(tt.__file__))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, thinktuning as tt; tt.writable_folder(sys.argv[1]);"
                               " print('held', flush=True); time.sleep(120)", str(out)], cwd=here, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"  # another process runs in OUT
        for argv in (base_args(model_dirs["random"], train_file, out, "--no-teacher", "--steps", 1),
                     ["--model", model_dirs["bigram"], "--eval", data, "--out", out, "--device", "cpu"],
                     ["--report", out]):
            assert run(argv) == 2 and one_line_error(capsys, "is in use by another thinktuning.py process")
        assert not (out / "metrics.jsonl").exists() and not (out / "eval.json").exists()
    finally:
        holder.kill()  # killed as a crash would: the lock goes with the process
        holder.wait()
    assert run(base_args(model_dirs["random"], train_file, out, "--no-teacher", "--steps", 1)) == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]


def test_eval_keeps_models_and_data_apart(model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "gsm8k_a.jsonl", tmp_path / "gsm8k_b.jsonl"  # both are labelled gsm8k
    a.write_text("".join(json.dumps({"question": f"w{i} is", "answer": f"#### {g}"}) + "\n" for i, g in enumerate([5, 7])))
    b.write_text("".join(json.dumps({"question": f"w{i} is", "answer": f"#### {g}"}) + "\n" for i, g in enumerate([7, 5])))
    ev = ["--eval", a, "--device", "cpu", "--max-new-tokens", 20]
    assert run(["--model", model_dirs["bigram"], *ev]) == 0  # without --out: a folder named after the model
    first = json.load(open(tmp_path / "runs" / "eval-bigram" / "eval.json"))["results"]["gsm8k"]
    content = json.dumps([["w0 is", "5"], ["w1 is", "7"]]).encode()  # what was evaluated: questions and golds
    assert first["data"] == str(a) and first["data_sha256"] == hashlib.sha256(content).hexdigest()[:16]
    assert not os.path.exists(tmp_path / "runs" / "thinktuning")
    # another model into the same folder is refused before it is loaded; the first model's results stay
    assert run(["--model", model_dirs["random"], *ev, "--out", "runs/eval-bigram"]) == 2
    assert one_line_error(capsys, f"holds results of {model_dirs['bigram']}: evaluate {model_dirs['random']} into")
    assert json.load(open(tmp_path / "runs" / "eval-bigram" / "eval.json"))["results"]["gsm8k"] == first
    # the same label on other data is not paired with McNemar; the same data is
    for name, path in (("same", a), ("other", b)):
        assert run(["--model", model_dirs["bigram"], "--eval", path, "--device", "cpu", "--max-new-tokens", 20,
                    "--out", name]) == 0
    capsys.readouterr()
    assert run(["--compare", "runs/eval-bigram,same,other"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[1]: line.split(" | ")[4:] for line in out.splitlines() if line.startswith("| gsm8k")}
    assert rows["same"][0] == "2" and rows["other"] == ["other data", "-", "-", "- |"]  # paired n, b, c, p


def test_resume_refuses_another_initial_model(trained, model_dirs, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    for extra in ([], ["--eval", "gsm8k"]):
        assert run(["--resume", out, "--model", model_dirs["bigram"], "--steps", 2, *extra]) == 2
        assert one_line_error(capsys, f"was trained from {model_dirs['random']}, which is its teacher and KL reference")
    assert len(read_jsonl(out / "metrics.jsonl")) == 1


def test_resume_refuses_a_trainer_state_of_another_shape(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    path = out / "ckpt" / "trainer_state.pt"
    state = torch.load(path, weights_only=False)
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3, 3)  # as if the state came from a model of another size
    torch.save(state, path)
    assert run(["--resume", out, "--steps", 2]) == 2
    assert one_line_error(capsys, "trainer_state.pt belongs to a model of another shape")
    assert len(read_jsonl(out / "metrics.jsonl")) == 1  # refused at start, before any sampling


def test_first_save_failing_does_not_suggest_resume(model_dirs, train_file, tmp_path, capsys, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tt.torch, "save", full_disk)
    assert run(base_args(model_dirs["random"], train_file, tmp_path / "a", "--no-teacher", "--steps", 1)) == 2
    assert one_line_error(capsys, "no checkpoint was written yet: free some space and start again")


def test_misspelled_eval_file_is_no_such_file(model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a file name without a folder, as typed
    assert run(["--model", model_dirs["bigram"], "--eval", "heldot.jsonl", "--device", "cpu", "--out", "e"]) == 2
    assert one_line_error(capsys, "heldot.jsonl: no such file")


def test_compare_without_folders_is_one_line(capsys):
    assert run(["--compare", ","]) == 2 and one_line_error(capsys, "names no run folder")


def test_print_plan_sizes_and_cpu_memory_warning(tok, tmp_path, monkeypatch, capsys):
    student = make_model(tok)  # 25,056 fp32 parameters: weights + AdamW moments = 300,672 bytes
    args = tt.build_parser().parse_args(["--model", "m", "--prompts-per-step", "2", "--group-size", "4",
                                         "--max-new-tokens", "20", "--out", str(tmp_path), "--no-teacher"])
    args.device, args.dtype, args.grad_ckpt = "cpu", "float32", False
    run_ = SimpleNamespace(args=args, student=student, teacher=None, ref=None, optim=tt.MasterAdamW(student, 1e-6, 0.0),
                           problems=[{}] * 10, student_how=tt.Sampling([1], 1, 20, batch=8, prompt_len=64),
                           teacher_how=None)
    trained, frozen, phases = tt.memory_estimate(run_)
    peak = trained + frozen + max(phases.values())
    page = os.sysconf("SC_PAGE_SIZE")
    for pages, warned in ((int(peak / 0.95 / page) + 1, False), (int(peak / 0.95 / page) - 1, True)):
        monkeypatch.setattr(tt.os, "sysconf", lambda name, pages=pages: page if name == "SC_PAGE_SIZE" else pages)
        tt.print_plan(run_, 0)
        out = capsys.readouterr().out
        assert ("more than this machine's" in out) == warned and "checkpoints: about 301 kB each" in out



# --------------------------------------------------------------------------------------------- mutants the suite missed
def test_extract_answer_takes_the_last_answer_block():
    assert tt.extract_answer("<answer>3</answer> No, I was wrong. <answer>5</answer>") == "5"
    assert tt.grade("<answer>3</answer> No, I was wrong. <answer>5</answer>", "5")


def test_answers_match_unordered_lists_use_each_element_once():
    assert tt.answers_match("3, 2", "2, 3") and tt.answers_match("2, 3, 2", "2, 2, 3")
    assert not tt.answers_match("2, 2", "2, 3") and not tt.grade("\\boxed{2, 2}", "2, 3")
    assert not tt.answers_match("3, 3, 2", "2, 2, 3")


def test_guide_ends_with_the_rollouts_own_stop_token(tok, teacher_server):
    # two stop ids, as Llama 3's <|eot_id|> and <|end_of_text|>: the rollout ended with the one that is not the
    # tokenizer's EOS, and the spliced text ends with that same token
    dot, w1 = tok.convert_tokens_to_ids(["." , "w1"])
    r = rollout([w1, dot])
    server = tt.TeacherServer(teacher_server.url + "/chat/completions", "m", 24, 5.0)
    records = tt.guide([r], [0], SimpleNamespace(tok=tok, args=SimpleNamespace(teacher_text_max=512), teacher=server))
    assert records[0]["passed"] and r.guided and r.n_student == 1
    assert r.response[0] == w1 and r.response[-1] == dot and tok.eos_token_id not in r.response


def _recorded_update(tok, rollouts, monkeypatch, micro_batch=8):
    """update() on a fresh tiny model; returns the model and the rollouts each micro-batch loss saw."""
    model, seen = make_model(tok, seed=3), []
    args = SimpleNamespace(minibatches=2, temperature=1.0, clip_eps=0.2, dual_clip=3.0, kl_beta=0.0, grad_clip=1.0,
                           micro_batch=micro_batch, guide_teacher_tokens_only=False)
    real = tt.micro_batch_loss
    monkeypatch.setattr(tt, "micro_batch_loss", lambda m, rows, a: seen.append(list(rows)) or real(m, rows, a))
    tt.score_old(model, None, rollouts, args)
    optim = tt.MasterAdamW(model, 1e-3, 0.0)
    return model, optim, tt.update(model, rollouts, optim, args, random.Random(7)), seen


def test_update_shuffles_rollouts_across_mini_batches(tok, monkeypatch):
    rollouts = [rollout([20 + i, 1], adv=1.0 if i % 2 else -1.0) for i in range(8)]
    _, _, _, seen = _recorded_update(tok, rollouts, monkeypatch)
    order = list(range(8))
    random.Random(7).shuffle(order)  # the same draw the update makes with its rng
    want = [{rollouts[i].response[0] for i in order[:4]}, {rollouts[i].response[0] for i in order[4:]}]
    assert [{r.response[0] for r in rows} for rows in seen] == want and want[0] != {20, 21, 22, 23}


def test_update_skipped_for_a_non_finite_loss_keeps_no_gradient(tok, monkeypatch):
    # one mini-batch of 4 rows in micro-batches of 2: the first is finite and back-propagated, the second (the
    # longer rows: micro-batches go by length) is not, so the update is skipped and no gradient may remain
    rollouts = [rollout([20, 1], adv=1.0), rollout([21, 1], adv=-1.0), rollout([22, 23, 24, 1], adv=1.0),
                rollout([25, 26, 27, 1], adv=-1.0)]
    before = [p.detach().clone() for p in make_model(tok, seed=3).parameters()]
    monkeypatch.setattr(tt, "score_old", lambda *a: None)
    for r in rollouts:
        r.old_logp = torch.full((len(r.response),), float("nan") if len(r.response) == 4 else -3.0)
    args = SimpleNamespace(minibatches=1, temperature=1.0, clip_eps=0.2, dual_clip=3.0, kl_beta=0.0, grad_clip=1.0,
                           micro_batch=2, guide_teacher_tokens_only=False)
    model = make_model(tok, seed=3)
    optim = tt.MasterAdamW(model, 1e-3, 0.0)
    stats = tt.update(model, rollouts, optim, args, random.Random(0))
    assert stats["skipped_updates"] == 1 and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_evaluate_never_counts_a_truncated_answer(tok):
    # the bigram model writes CHAIN; cut after "}" (13 tokens) its text holds \boxed{5} but no stop token
    model = make_bigram_model(tok)
    summary, preds = tt.evaluate(model, tok, [{"question": "w1 is", "gold": "5"}], tt.Sampling([tok.eos_token_id],
                                 tok.pad_token_id, 13, batch=1))
    assert preds[0]["response"].endswith("\\boxed{5}") and not preds[0]["finished"] and preds[0]["extracted"] == "5"
    assert not preds[0]["correct"] and summary["accuracy"] == 0 and summary["truncated_pct"] == 100



def grade_class(files):
    """One row per submission: tests passed / selected per exercise, and the exercises fully passed."""
    import tempfile
    import xml.etree.ElementTree as ET
    print("submission | " + " | ".join(tt.EXERCISES) + " | exercises passed")
    for path in files:
        xml = os.path.join(tempfile.mkdtemp(), "junit.xml")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                        "-k", " or ".join(tt.EXERCISES), f"--junitxml={xml}"], capture_output=True,
                       env={**os.environ, "THINKTUNING_FILE": os.path.abspath(path), "HF_HUB_OFFLINE": "1"})
        score = {e: [0, 0] for e in tt.EXERCISES}  # passed, selected
        for case in ET.parse(xml).getroot().iter("testcase") if os.path.exists(xml) else ():
            ex = next((e for e in tt.EXERCISES if case.get("name").startswith(f"test_{e}_")), None)
            if ex:  # a failure, an error or a skip is no point
                score[ex][0] += not any(c.tag in ("failure", "error", "skipped") for c in case)
                score[ex][1] += 1
        cells = [f"{p}/{n}" if n else "no tests ran" for p, n in score.values()]
        full = sum(p == n > 0 for p, n in score.values())
        print(f"{path} | " + " | ".join(cells) + f" | {full}/{len(tt.EXERCISES)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--grade"] or not sys.argv[2:]:
        sys.exit("usage: python test_thinktuning.py --grade SUBMISSION/thinktuning.py [...]")
    grade_class(sys.argv[2:])



# --------------------------------------------------------------------------------------------- an instructor's trial
def test_select_for_guidance_k_counts_finished_rollouts_and_floors():
    # 10 rollouts, 7 finished, pct 0.25: k = max(1, floor(7 x 0.25 = 1.75)) = 1. From G: floor(2.5) = 2;
    # ceil or round of 1.75: 2
    finished = [True] * 7 + [False] * 3
    for seed in range(20):
        chosen = tt.select_for_guidance(finished, 10, 0.25, random.Random(seed))
        assert len(chosen) == 1 and chosen[0] < 7


def test_select_for_guidance_draws_without_replacement_from_its_rng():
    # k = floor(10 x 0.5) = 5 distinct rollouts, drawn by the rng passed in (the global random plays no part)
    for seed in range(30):
        random.seed(seed)
        chosen = tt.select_for_guidance([True] * 10, 10, 0.5, random.Random(seed))
        random.seed(seed + 1000)
        again = tt.select_for_guidance([True] * 10, 10, 0.5, random.Random(seed))
        assert chosen == again == sorted(random.Random(seed).sample(range(10), 5)) and len(set(chosen)) == 5


def make_bos_tokenizer():
    """The test tokenizer, but one that puts BOS before any text it encodes (as Llama's does)."""
    from tokenizers import processors
    tk = make_tokenizer()
    bos = tk.convert_tokens_to_ids("<|im_start|>")
    tk._tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                 special_tokens=[("<|im_start|>", bos)])
    return tk, bos


def test_splice_never_adds_bos_and_ends_with_the_given_stop_token():
    tk, bos = make_bos_tokenizer()
    assert tk("checked")["input_ids"][0] == bos  # this tokenizer adds BOS by default
    dot = tk.convert_tokens_to_ids(".")  # a second stop id, not the tokenizer's EOS
    ids, n_student = tt.splice([5, 6, dot], "checked", "so 5", tk, dot)
    assert ids == [5, 6] + tk.convert_tokens_to_ids(["checked", "so", "5"]) + [dot] and n_student == 2
    assert bos not in ids


def test_policy_loss_routes_on_the_current_p_and_counts_dual_clips_among_ppo_tokens():
    # A = -1, guided: p = 0.05 now (>= 0.01: AAS, l = -A p / (p + gamma) = 0.05 / 0.04975), although its old p was
    # 0.005 (< 0.01: a rule on the old p would send it to PPO, l = min(max(10, 1.2), 3) = 3). The unguided
    # token has rho = 10: the dual clip holds it (l = 3); it is the only PPO token, so dual_clip_frac = 1.
    logp = torch.log(torch.tensor([[0.05, 0.5]]))
    old = torch.log(torch.tensor([[0.005, 0.05]]))
    loss, st = tt.policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx((0.05 / (0.05 - 0.00025) + 3.0) / 2, rel=1e-5)
    assert st["aas_tokens"] == 1 and st["dual_clip_frac"] == 1.0 and st["clip_frac"] == 0.0  # the dual clip, not eps


def test_report_of_a_grpo_run_names_it_and_shows_its_settings(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    page = open(tt.write_report(str(out))).read()
    Page(page)  # well formed
    settings = json.load(open(out / "args.json"))
    assert "<h1>GRPO run (--no-teacher): run</h1>" in page and "ThinkTuning run" not in page
    assert '<svg data-metric="reward"' in page and '<svg data-metric="guidance_pct"' not in page  # never guided
    assert f"<td>lr</td><td>{settings['lr']}</td>" in page and f"<td>no_teacher</td><td>True</td>" in page
    logged = [s for s in read_jsonl(out / "samples.jsonl") if "student" in s]
    assert logged and all(isinstance(s["finished"], bool) for s in logged)
    shown = page.count("(no policy gradient)")  # random weights: every reward 0, every advantage 0
    assert all(s["adv"] == 0 for s in logged) and shown == min(2, len(logged))
    assert page.count("not finished") == sum(not s["finished"] for s in logged[-2:])


def test_ctrl_c_early_is_one_line_without_traceback(model_dirs, tmp_path):
    # Ctrl-C while torch is still being imported, or (on a fast machine) while the model loads or evaluates:
    # either way exit status 130 and no traceback
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"question": f"w{i % 50} is", "answer": "#### 5"}) + "\n" for i in range(5000)))
    here = os.path.dirname(os.path.abspath(tt.__file__))
    for delay in (0.0, 1.5):  # after torch's library is mapped: inside `import torch`, or (1.5 s on) later
        proc = subprocess.Popen([sys.executable, os.path.join(here, "thinktuning.py"), "--model", model_dirs["random"],
                                 "--eval", data, "--device", "cpu", "--out", tmp_path / f"e{delay}"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.time() + 60  # on a busy machine the interpreter itself can take a while to start
        while "libtorch" not in open(f"/proc/{proc.pid}/maps").read() and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and b"Traceback" not in err, err.decode()[-500:]
        assert b"second Ctrl-C" not in err  # there was only one



def test_unwritable_run_folder_is_one_line_for_report_and_resume(trained, tmp_path, capsys):
    # a folder this process cannot write in (here its lock file cannot be opened: a folder holds its name, which
    # works as root too, where permissions would not stop a write)
    out = copy_run(trained, tmp_path)
    (out / ".lock").unlink(missing_ok=True)
    (out / ".lock").mkdir()
    assert run(["--report", out]) == 2 and one_line_error(capsys, f"cannot write in {out}")
    assert run(["--resume", out, "--steps", 2]) == 2
    assert one_line_error(capsys, "to resume or report a read-only run, copy its folder somewhere writable first")


def test_report_colour_scale_spans_the_weights_that_occur():
    # orange: t = log10(1 / w) / 3, full at 0.001; blue: t = ln(w) / ln(1.1), full at 1.1 (p/d < ~1.11 for A < 0);
    # g = 255 - 110 t, b = 255 - 230 t below 1; r = 255 - 170 t, g = 255 - 110 t above
    assert tt.weight_style(0.01) == "background:rgb(255,182,102)"  # t = 2/3
    assert tt.weight_style(1.05) == "background:rgb(168,199,255)"  # t = 0.512
    assert tt.weight_style(0.001) == tt.weight_style(0.0001) == "background:rgb(255,145,25)"
    assert tt.weight_style(1.1) == tt.weight_style(1.5) == "background:rgb(85,145,255)"
    assert tt.weight_style(0.0013) != tt.weight_style(0.5)  # the typical teacher token no longer looks like 0.5
    swatches = re.findall(r'class="sw" style="[^"]*">([^<]*)<', tt.rollouts_section(
        [{"step": 1, "guided": True, "student": "a", "tokens": ["a"], "weight": [0.5], "p": [0.5], "n_student": 1}]))
    assert swatches == ["0.001", "0.01", "0.1", "0.5", "1", "1.05", "1.1"]


def test_report_shows_a_wrong_and_a_right_answer_per_benchmark(model_dirs, tmp_path):
    data = tmp_path / "mini.jsonl"  # the bigram model answers \boxed{5}: w0 (gold 7) wrong, w1 (gold 5) right
    data.write_text("".join(json.dumps({"question": f"w{i} is", "answer": f"#### {g}"}) + "\n" for i, g in enumerate([7, 5, 9])))
    out = tmp_path / "ev"
    assert run(["--model", model_dirs["bigram"], "--eval", data, "--out", out, "--device", "cpu", "--max-new-tokens", 20]) == 0
    page = (out / "report.html").read_text()
    Page(page)
    heads = re.findall(r'<div class="hdr">(.*?)</div>', page)
    assert heads == ["<b>mini</b> &middot; gold 7 &middot; extracted 5: <b>wrong</b><br>Q: w0 is",
                     "<b>mini</b> &middot; gold 5 &middot; extracted 5: <b>right</b><br>Q: w1 is"]


def test_readme_scripted_teacher_guides_a_step(model_dirs, tmp_path):
    # the README's make_problems.py and teacher_server.py, as printed there, run a guided step: every reply passes
    # the format check and boxes the right answer of its problem, worked out from the question alone
    readme = open(os.path.join(os.path.dirname(os.path.abspath(tt.__file__)), "README.md")).read()
    for name in ("make_problems.py", "teacher_server.py"):
        block = readme.split(f"<summary><code>{name}</code>", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
        (tmp_path / name).write_text(block)
    subprocess.run([sys.executable, "make_problems.py"], cwd=tmp_path, check=True)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "teacher_server.py", str(port)], cwd=tmp_path)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                tt.http_json(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        out = tmp_path / "run"
        argv = base_args(model_dirs["bigram"], tmp_path / "train.jsonl", out, "--steps", 1, "--teacher",
                         f"http://127.0.0.1:{port}/v1", "--log-samples", 8)
        assert run(argv) == 0
    finally:
        server.kill()
        server.wait()
    gold = {json.loads(l)["question"]: json.loads(l)["answer"].split("#### ")[1] for l in open(tmp_path / "train.jsonl")}
    samples = read_jsonl(out / "samples.jsonl")
    replies = [s for s in samples if s.get("kind") == "teacher_reply"]
    assert replies and all(r["passed"] and r["text"].startswith("<opinion>") for r in replies)
    guided = [s for s in samples if s.get("guided")]  # one per group: its question's gold is what the reply boxes
    boxed = sorted(re.findall(r"\\boxed\{(\d+)\}", r["text"])[-1] for r in replies)
    assert len(guided) == len(replies) and boxed == sorted(gold[s["question"]] for s in guided)


# --------------------------------------------------------------------------------------------- several GPUs (torchrun)
# Real processes: torchrun with gloo on the CPU, two ranks.
def torchrun(n, *argv, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *map(str, argv)]
    path = os.pathsep.join(dict.fromkeys(os.path.dirname(os.path.abspath(f)) for f in (tt.__file__, __file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def dp_rollouts(tok):
    """4 groups of 4 rollouts of different lengths: rewards 0/1 (some groups all equal: A = 0), guided ones too."""
    rnd, out = random.Random(7), []
    for g in range(4):
        rewards = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1], [0, 1, 0, 0]][g]
        for j, rew in enumerate(rewards):
            ids = [rnd.randrange(2, len(tok)) for _ in range(rnd.randrange(2, 12))] + [tok.eos_token_id]
            r = tt.Rollout("q", "5", [0, 4 + g, 5], ids, finished=True, reward=float(rew))
            if j == 0 and g != 1:
                r.guided, r.n_student = True, len(ids) // 2
            out.append(r)
    for r, a in zip(out, tt.group_advantages(torch.tensor([r.reward for r in out]), 4).tolist()):
        r.adv = a
    return out


def dp_update(tok, rollouts):
    """One update of a fresh tiny model, old log-probs scored on the whole step; this rank's share is trained."""
    model, args = make_model(tok), learn_args(minibatches=2, micro_batch=3)
    tt.score_old(model, None, rollouts, args)
    tt.update(model, tt.share(rollouts), tt.MasterAdamW(model, 1e-2, 0.01), args, random.Random(3))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


DP_WORKER = """
import sys, torch, thinktuning as tt, test_thinktuning as T
tt.start_ranks(T.SimpleNamespace(eval=None, report=None, compare=None, prompts_per_step=4, device="cpu"))
torch.save(T.dp_update(T.make_tokenizer(), T.dp_rollouts(T.make_tokenizer())), f"{sys.argv[1]}/rank{tt.RANK}.pt")
"""


def test_two_ranks_take_the_one_process_step(tok, tmp_path):
    # The exactness test: the same 16 rollouts, on one process and split over two (8 each, whole groups). Each
    # mini-batch's token mean must count both ranks' tokens, and the ranks' gradients must be summed before the
    # clip and AdamW; a per-rank mean, a per-rank gradient or a per-rank mini-batch order moves the weights elsewhere.
    (tmp_path / "worker.py").write_text(DP_WORKER)
    proc = torchrun(2, tmp_path / "worker.py", tmp_path)
    one = dp_update(tok, dp_rollouts(tok))  # this process: WORLD = 1
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0, rank1)  # the ranks never drift apart
    assert torch.allclose(rank0, one, rtol=0, atol=1e-5)  # float32 sums in another order, through AdamW
    start = torch.cat([p.detach().flatten() for p in make_model(tok).parameters()])
    assert (one - start).abs().max() > 1e-3  # the update moved the weights well beyond the tolerance


def test_two_ranks_train_stop_on_ctrl_c_save_and_resume_on_one(model_dirs, train_file, tmp_path):
    out = tmp_path / "dp"
    proc = torchrun(2, tt.__file__, *base_args(model_dirs["bigram"], train_file, out, "--steps", 100000,
                                               "--log-samples", 8))
    deadline = time.time() + 120
    while len(read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C: the ranks run in sessions of their own, so only the
    # launcher gets it, and it passes it on to both ranks
    stdout, stderr = proc.communicate(timeout=120)
    assert "2 processes, 4 rollouts each" in stdout  # the plan: each rank's share
    assert "checkpoint saved; continue with: torchrun [its options] thinktuning.py --resume" in stdout
    assert 'thinktuning.py", line' not in stderr  # torchrun prints a traceback of its own, the ranks none
    rows = read_jsonl(out / "metrics.jsonl")
    k = len(rows)
    saved = torch.load(out / "ckpt" / "trainer_state.pt", weights_only=False)
    assert saved["step"] == rows[-1]["step"] == k and saved["cursor"] == 2 * k  # one question per rank per step
    replies = [s for s in read_jsonl(out / "samples.jsonl") if s.get("kind") == "teacher_reply" and s["step"] == 1]
    # one rollout per group goes to the teacher: group 1 on rank 0 (rows 0-3), group 2 on rank 1 (rows 4-7)
    assert sorted(r["rollout"] // 4 for r in replies) == [0, 1] and rows[0]["teacher_asked"] == 2
    assert rows[0]["n_guided"] == 2 and (out / "report.html").exists()
    assert run(["--resume", out, "--steps", k + 1]) == 0  # one process continues the two-process run
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, k + 2)) and rows[-1]["teacher_asked"] == 2
    assert torch.load(out / "ckpt" / "trainer_state.pt", weights_only=False)["cursor"] == 2 * (k + 1)


def test_two_ranks_errors_are_one_line_each_and_end_in_seconds(model_dirs, train_file, tmp_path, trained):
    start = time.time()  # both at once: each launch mostly waits for its ranks to import torch
    bad = torchrun(2, tt.__file__, *base_args(model_dirs["random"], train_file, tmp_path / "a", "--prompts-per-step", 3))
    held = torchrun(2, tt.__file__, *base_args(model_dirs["random"], train_file, trained))
    (_, err), (_, err_held) = bad.communicate(timeout=120), held.communicate(timeout=120)
    # a bad number of processes: every rank says so
    assert bad.returncode != 0 and err.count("error: --prompts-per-step 3 is not a multiple of the 2 processes") == 2
    # an error on rank 0 alone (its folder holds a run): the other rank is stopped, not left waiting at the barrier
    assert held.returncode != 0 and err_held.count("already holds a training run") == 2  # on both ranks
    assert 'thinktuning.py", line' not in err + err_held  # torchrun prints a traceback of its own, the ranks none
    assert time.time() - start < 100  # torchrun stops the waiting rank at once (the group's timeout is an hour)



# --------------------------------------------------------------------------------------------- report page, for a researcher
def chart(page_text, cid):
    """The elements of one chart (svg data-metric=cid) of a page."""
    svg = page_text.split(f'<svg data-metric="{cid}"', 1)[1].split("</svg>", 1)[0]
    return Page(f'<svg data-metric="{cid}"{svg}</svg>')


def test_report_axes_ticks_units_and_zero_line(tmp_path):
    rows = [{"step": s, "loss": [0.02, -0.01, 0.005, -0.03][s - 1], "t_student": [1.74e-05, 0.01, 0.05, 0.03][s - 1],
             "response_len": 100 + 10 * s} for s in range(1, 5)]
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    text = open(tt.write_report(str(tmp_path)), encoding="utf-8").read()
    loss, secs, length = chart(text, "loss"), chart(text, "seconds"), chart(text, "response_len")
    assert len(loss.find("line", **{"class": "zero"})) == 1 and not length.find("line", **{"class": "zero"})
    # the zero line sits between the y positions of the largest and smallest loss
    ys = [float(p.split(",")[1]) for p in loss.find("polyline")[0][0]["points"].split()]
    assert min(ys) < float(loss.find("line", **{"class": "zero"})[0][0]["y1"]) < max(ys)
    for page, unit in ((loss, "token mean"), (secs, "s"), (length, "tokens")):
        labels = [t for a, t in page.find("text") if "class" not in a]
        assert [t for a, t in page.find("text", **{"class": "ax"})] == [unit, "step"]
        assert labels[-3:] == ["1", "2", "4"]  # x: first, middle (round(2.5) = 2), last step
    y_secs = [t for a, t in secs.find("text") if a.get("text-anchor") == "end" and "class" not in a][:3]
    assert y_secs == ["0", "0.025", "0.05"] and not re.search(r">[-\d.]+e-\d+<", text)  # 1.74e-05 reads 0
    assert [t for a, t in length.find("text") if a.get("text-anchor") == "end"][:3] == ["110", "125", "140"]
    assert [t for a, t in loss.find("text") if a.get("text-anchor") == "end"][:3] == ["-0.03", "-0.005", "0.02"]


def test_report_gap_where_a_dense_series_has_no_value(run_dir):
    text = open(tt.write_report(str(run_dir)), encoding="utf-8").read()
    lines = chart(text, "grad_norm").find("polyline")  # steps 1-3, then 5: nothing drawn across step 4
    xs = [[float(p.split(",")[0]) for p in a["points"].split()] for a, _ in lines]
    assert [len(x) for x in xs] == [3, 1] and xs[1][0] - xs[0][-1] == pytest.approx(2 * (xs[0][1] - xs[0][0]))
    assert len(chart(text, "eval_accuracy").find("polyline")) == 1  # a sparse series (evaluations) joins its points


def test_report_compare_overlays_curves_of_the_other_run(run_dir, tmp_path):
    other = tmp_path / "run_b"
    other.mkdir()
    write_jsonl(other / "metrics.jsonl", [{**r, "reward_unguided": 0.9, "reflect_rate": 0.5} for r in metric_rows()])
    text = open(tt.write_report(str(run_dir), others=[str(other)]), encoding="utf-8").read()
    for cid, m in (("reward", "reward_unguided"), ("reflect_rate", "reflect_rate"), ("response_len", "response_len")):
        ours, theirs = (chart(text, cid).find("polyline", **{"data-metric": name}) for name in (m, f"run_b: {m}"))
        assert len(ours) == len(theirs) == 1
        assert ours[0][0]["points"] != theirs[0][0]["points"] or m == "response_len"  # run_b kept A's lengths
        assert len(theirs[0][0]["points"].split()) == 5 and f"run_b: {m}" in chart(text, cid).find("text")[1][1]
    assert not chart(text, "loss").find("polyline", **{"data-metric": "run_b: loss"})  # only the compared curves


def test_step_metrics_teacher_tokens_aas_weight_on_its_own():
    # one guided rollout (A > 0): 2 student tokens, 2 teacher tokens and the stop token; default AAS covers all 5
    p = [0.9, 0.8, 0.0002, 0.001, 0.5]
    r = tt.Rollout("q", "5", [0], [7, 8, 9, 10, 1], finished=True, guided=True, n_student=2, reward=1.0, adv=0.7,
                   old_logp=torch.tensor(p).log())
    plain = tt.Rollout("q", "5", [0], [7, 1], finished=True, reward=0.0, adv=-0.7)
    args = SimpleNamespace(group_size=2, eval_every=0, device="cpu", guide_teacher_tokens_only=False)
    record = {"replies": [], "texts": ["a", "b"], "pct": 0.1, "chosen": [0], "update": {}, "seconds": []}
    row = tt.step_metrics(SimpleNamespace(args=args), 1, [r, plain], record)
    g = 0.7 / 4000
    want = sum(x / (x + g) for x in p[2:]) / 3  # the teacher's tokens and the stop token, not the student's two
    assert row["aas_weight_teacher"] == pytest.approx(want, rel=1e-5)
    assert want < sum(x / (x + g) for x in p) / 5 - 0.05  # the student's tokens (~1) would dilute it


def test_sample_record_never_ends_inside_a_character():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    btok = PreTrainedTokenizerFast(tokenizer_object=tk)
    ids = btok("ab\u00e9", add_special_tokens=False)["input_ids"]  # "é" is two bytes: two tokens
    assert len(ids) == 4 and btok.decode(ids[:3]).endswith("\ufffd")
    r = tt.Rollout("q", "5", [0], ids[:3], finished=False, n_student=3)  # cut at the length limit, mid-character
    rec = tt.sample_record(SimpleNamespace(tok=btok, args=None), 1, r)
    assert rec["student"] == "ab" and rec["finished"] is False
