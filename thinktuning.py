"""ThinkTuning in one file: teacher-guided GRPO that teaches a language model to reflect on its reasoning.

Paper: "ThinkTuning: Instilling Cognitive Reflections without Distillation", Aswin RRV et al., EMNLP 2025,
https://arxiv.org/abs/2508.07616. The README writes out every equation beside the function that implements it.

    python thinktuning.py --model HuggingFaceTB/SmolLM2-135M-Instruct --out runs/tt      # ThinkTuning
    python thinktuning.py --model ... --no-teacher --out runs/grpo                        # vanilla GRPO baseline
    python thinktuning.py --model runs/tt/ckpt --eval gsm8k,math500,aime24 --out runs/tt  # benchmarks

Part I is the method, in the order of one training step. Part II is machinery that a first reading may skip.

Where this file departs from the paper or the authors' code (README, "Departures", says why for each).
What changes the learning signal:
- gamma(A) = clip(A / 4000, -0.001, 0.001); the authors' clamp had its bounds swapped (gamma = -0.001 always).
- "finished" is read from the sampled ids, any stop id of the generation config counting as EOS; the authors read
  EOS from decoded text (reward always 0).
- the teacher's reply must be exactly the three tags, in order, non-empty, ended by EOS (authors: a check whose
  unescaped pattern let malformed replies through); a reply over --teacher-text-max tokens (not truncated) or a
  query over --teacher-max-prompt-len (authors: left-truncated) leaves the rollout unguided.
- a guided rollout is graded on the teacher's text alone (authors: the whole spliced sequence).
- the token mean runs over the whole mini-batch (authors' verl: per micro-batch); dual clip (c = 3) after guidance too.
- the teacher's system prompt and demonstrations are this file's own wording; 32 prompts per step, not 128.
- not a departure: AAS shapes the student's own prefix of a guided rollout too, as the authors' code does
  (--guide-teacher-tokens-only shapes the teacher's tokens alone).
Engineering, the same signal up to rounding: rows whose advantage is 0 are neither scored nor back-propagated when
--kl-beta is 0 (loss and gradient exactly 0; their tokens still count in the token mean); gradients add up in the
model's dtype and AdamW updates fp32 master weights; no dropout; the checkpoint's sampling defaults (top_k,
min_p...) are ignored; the AAS denominator is floored at 1e-30, the PPO log-ratio clamped to [-20, 20] (as verl).
The teacher can also be any OpenAI-compatible server (--teacher URL), and torchrun runs it on several GPUs (each
rank samples whole groups; the update is the one-process method). Left out on purpose, and why: README.
"""
import argparse
import cmath
import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import html
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import urllib.request
import zlib
from dataclasses import dataclass, field, replace
from fractions import Fraction
from types import SimpleNamespace

try:
    import fcntl  # one process per run folder (POSIX; Windows runs without the lock)
except ImportError:
    fcntl = None
try:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
except KeyboardInterrupt:  # Ctrl-C while torch loads: no traceback
    sys.exit(130)

# ################################################################################################################
# PART I. THE METHOD, in the order of one training step
# ################################################################################################################
# Part II names used here: render_chat = the chat template with the assistant header, nothing added; stops = the
# tokenizer's EOS and every eos id of the generation config; RANK, WORLD, share, mine, everyone: torchrun (or no-op).

# ------------------------------------------------------------------------------------------------ settings
# The method's hyperparameters; each help says the paper's value. Machinery flags: Part II.


def build_parser():
    p = Parser(description="ThinkTuning (teacher-guided GRPO) or vanilla GRPO.", allow_abbrev=False)

    def a(*flags, **kw):  # add_argument, with the default shown where there is one
        if kw.get("default") is not None and "action" not in kw:
            kw["help"] += " [%(default)s]"
        p.add_argument(*flags, **kw)

    a("--model", help="student: a Hub name or a local folder (required unless --resume)")
    a("--teacher", help="teacher: a model, or an OpenAI-compatible server's http(s)://.../v1 URL; default: a frozen "
      "copy of --model's initial weights (the paper's choice)")
    a("--no-teacher", action="store_true", help="vanilla GRPO: the paper's baseline, everything else equal")
    a("--train-data", default="openai/gsm8k", help="Hub dataset (GSM8K main train) or a local .jsonl/.json/.parquet")
    # Paper: 58 steps of 128 prompts x 5, one epoch of GSM8K; here 58 x 32 questions, a quarter epoch (234 steps make
    # one; the schedule counts steps, so steps 1-8 are guided either way). With G = 5, k = 1 rollout per group.
    a("--steps", type=int, default=58, help="total training steps (counted from the start, also on --resume)")
    a("--prompts-per-step", type=int, default=32, help="B: questions per step (paper: 128; lowered for one GPU)")
    a("--group-size", type=int, default=5, help="G: rollouts per question (paper: 5)")
    a("--max-prompt-len", type=int, default=512, help="student prompt tokens; longer questions are skipped")
    a("--max-new-tokens", type=int, default=1024, help="student response tokens (paper: 1024)")
    a("--temperature", type=float, default=1.0, help="student sampling temperature (paper: 1.0)")
    a("--teacher-max-prompt-len", type=int, default=3072, help="teacher prompt tokens; longer queries stay unguided")
    a("--teacher-max-new-tokens", type=int, default=1024, help="teacher response tokens, greedy (paper: 1024)")
    a("--teacher-text-max", type=int, default=512,
      help="spliced teacher tokens at most; a longer reply leaves the rollout unguided (paper: 512)")
    a("--schedule-steps", type=int, default=50, help="total_steps of the guidance schedule (authors: 50 -> steps 1-8)")
    a("--guide-teacher-tokens-only", action="store_true",
      help="AAS on the teacher's tokens and final stop token only (default: the whole guided response, as the authors)")
    a("--minibatches", type=int, default=4, help="optimizer steps per training step (paper: 4)")
    a("--lr", type=float, default=1e-6, help="AdamW learning rate, constant (paper: 1e-6)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay (paper: 0.01)")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clip (paper: 1.0)")
    a("--clip-eps", type=float, default=0.2, help="PPO ratio clip epsilon (paper: 0.2)")
    a("--dual-clip", type=float, default=3.0, help="dual-clip constant c for negative advantages (paper: 3)")
    a("--kl-beta", type=float, default=0.0, help="k3 KL penalty to the initial model (paper: 0, off)")
    a("--seed", type=int, default=0, help="seed for data order, rollout selection and sampling")
    machinery_flags(a)  # Part II: device, checkpoints, evaluation, reports, exercises
    return p


# ------------------------------------------------------------------------------------------------ prompts
# The student sees only the question and one instruction, rendered with its own chat template (no system
# message, no think tags). The teacher is the same kind of model, made a teacher only by this prompt.

STUDENT_INSTRUCTION = ("{question}\n\nWork through the problem step by step, then write your final answer "
                       "inside \\boxed{{}}.")

TEACHER_SYSTEM = """You coach students in mathematics by speaking as the student's own inner voice.
You will see a problem and a student's written solution. Reply in exactly three tagged parts and nothing else:
<opinion>correct</opinion> or <opinion>incorrect</opinion>: your judgement of the student's final answer.
<reason>...</reason>: in the first person ("I", "my"), as if the student were thinking aloud, look back over the reasoning: say which steps hold and, if something is wrong, exactly where and why.
<phrase>...</phrase>: in the first person, carry the thought on to the right solution and finish with the final answer in \\boxed{}.
Choose the kind of reflection that fits: agreeing after re-checking, noticing a conflict with the problem, recalling a mentor's question, or critically verifying an unchecked answer."""

# Four demonstrations, one per cognitive behaviour (self-agreement, self-conflict, self-consultation,
# self-critique). Problems and wording are our own.
TEACHER_DEMOS = [
    ("A baker fills 7 trays with 12 rolls each and sells 50 rolls. How many rolls are left?",
     "Each tray has 12 rolls, so 7 trays hold 7 x 12 = 84 rolls. After selling 50, 84 - 50 = 34 remain.\n\n"
     "\\boxed{34}",
     "correct",
     "Let me look at this once more before I commit. Seven trays of twelve is 84, since 7 x 10 = 70 and "
     "7 x 2 = 14. Taking away the 50 that were sold leaves 34. Every step agrees with the problem.",
     "I'm confident the reasoning holds, so the number of rolls left is \\boxed{34}."),
    ("A train ticket costs $18 for an adult and half as much for a child. A family buys 2 adult and 3 child "
     "tickets. How much do they pay?",
     "There are 2 + 3 = 5 tickets at $18 each, so the family pays 5 x 18 = $90.\n\n\\boxed{90}",
     "incorrect",
     "Wait, that doesn't match what the problem says. I charged every ticket at $18, but a child's ticket "
     "costs half of that, so only the two adult tickets are $18 each.",
     "A child ticket is 18 / 2 = $9. The adults pay 2 x 18 = $36 and the children 3 x 9 = $27, so together "
     "the family pays 36 + 27 = $63. The answer is \\boxed{63}."),
    ("A rectangle has a perimeter of 30 cm and a length of 9 cm. What is its area in square centimetres?",
     "The width is 30 - 9 = 21 cm, so the area is 9 x 21 = 189.\n\n\\boxed{189}",
     "incorrect",
     "I can almost hear my old maths teacher asking: \"Are you sure the width is 30 minus 9?\" The perimeter "
     "goes all the way round, so it counts the length twice and the width twice. Subtracting the length once "
     "cannot give the width.",
     "Half of the perimeter, 30 / 2 = 15 cm, is one length plus one width, so the width is 15 - 9 = 6 cm. "
     "The area is 9 x 6 = 54 square centimetres: \\boxed{54}."),
    ("Lena saves $4 in the first week and each week she saves $3 more than the week before. How much has she "
     "saved after 4 weeks?",
     "4, 7, 10, 13. Total 34.\n\n\\boxed{34}",
     "correct",
     "I wrote that down quickly without checking any of it, so let me go through it properly. Week 1 is $4, "
     "week 2 is 4 + 3 = $7, week 3 is 7 + 3 = $10 and week 4 is 10 + 3 = $13. Adding them: 4 + 7 = 11, "
     "11 + 10 = 21, 21 + 13 = 34. As a second check, the average week is (4 + 13) / 2 = 8.5 and "
     "4 x 8.5 = 34.",
     "Both ways give the same total, so after 4 weeks Lena has saved \\boxed{34} dollars."),
]


def teacher_query(question, response):
    return f"Problem:\n{question}\n\nStudent's solution:\n{response}"


def teacher_messages(question, response):
    msgs = [{"role": "system", "content": TEACHER_SYSTEM}]
    for q, r, op, reason, phrase in TEACHER_DEMOS:
        reply = f"<opinion>{op}</opinion>\n<reason>{reason}</reason>\n<phrase>{phrase}</phrase>"
        msgs += [{"role": "user", "content": teacher_query(q, r)}, {"role": "assistant", "content": reply}]
    return msgs + [{"role": "user", "content": teacher_query(question, response)}]


def student_prompt(tok, question):
    return render_chat(tok, [{"role": "user", "content": STUDENT_INSTRUCTION.format(question=question)}])


# ------------------------------------------------------------------------------------------------ rollouts
@dataclass
class Rollout:
    """One sampled answer, from sampling to the loss. Token ids stay as sampled: never decoded and re-encoded."""
    question: str
    gold: str
    prompt: list  # prompt token ids, in the student's chat template
    response: list = None  # response token ids; a finished one ends with its stop token (kept in the loss)
    finished: bool = False  # a stop token was sampled (decided from ids, never from text)
    guided: bool = False  # the teacher's text was spliced on (step 5)
    n_student: int = None  # response[:n_student] was written by the student (all of it when unguided)
    teacher_text: str = None
    reward: float = 0.0  # step 6
    adv: float = 0.0  # step 7: A_i, shared by every token of the response
    old_logp: torch.Tensor = None  # step 8: [T] log-probs before the update
    ref_logp: torch.Tensor = None  # [T] under the initial model, with --kl-beta only


@dataclass
class Sampling:
    """How a model samples: its stop ids and pad id, the length limit and the draw (temperature 0: greedy).
    `fast` picks the compiled static-cache sampler of Part II, whose cache has `batch` rows of `prompt_len`
    + `max_new` slots (fixed shapes: compiled once)."""
    stops: list
    pad_id: int
    max_new: int
    temperature: float = 1.0
    fast: bool = False
    batch: int = None
    prompt_len: int = None


def generate(model, prompts, how, desc="sample"):
    """Step 2: responses (cut after their stop token) and finished flags for a batch of prompt id lists.
    Both samplers draw the same tokens for the same seed; the fast one is Part II's `generate_static`."""
    rows = (generate_static if how.fast else generate_plain)(model, prompts, how, desc)
    cut = [cut_at_stop(r, set(how.stops)) for r in rows]
    return [c[0] for c in cut], [c[1] for c in cut]


@torch.no_grad()
def generate_plain(model, prompts, how, desc="sample"):
    """The readable sampler: transformers' generate with its dynamic KV cache. The checkpoint's own
    generation_config is set aside while it runs: its top_k, min_p or repetition penalty would make the rollouts
    come from another distribution than the policy whose log-probs the loss uses."""
    from transformers import GenerationConfig
    ids, mask = left_pad(prompts, how.pad_id, model.device)
    sample = how.temperature > 0
    options = {"temperature": how.temperature, "top_p": 1.0, "top_k": 0} if sample else {}  # the full distribution
    config = GenerationConfig(max_new_tokens=how.max_new, do_sample=sample, eos_token_id=how.stops,
                              pad_token_id=how.pad_id, use_cache=True, **options)
    saved, model.generation_config = model.generation_config, GenerationConfig()
    bar = tqdm(total=how.max_new, desc=desc, leave=False)
    progress = SimpleNamespace(put=lambda ids: bar.update(ids.dim() == 1), end=bar.close)  # [B] per new token
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=progress)
    finally:
        model.generation_config = saved
        bar.close()
    return out[:, ids.shape[1]:].tolist()


def cut_at_stop(row, stops):
    """The response up to and including its first stop token; finished = a stop token was sampled."""
    for t, token in enumerate(row):
        if token in stops:
            return row[:t + 1], True
    return row, False


# ------------------------------------------------------------------------------------------------ teacher
def guidance_pct(step, total_steps):
    """Schedule: pct decays linearly from 0.1 toward 0.01 over Q = max(1, total_steps // 3) steps (step is
    1-based), and the teacher is off for good from the first step whose pct <= 0.06 (pct never rises, so this
    step's value says it). With the authors' total_steps = 50: Q = 16, steps 1-8 are guided."""
    q = max(1, total_steps // 3)
    m = min(step - 1, q)  # steps of decay so far
    return 0.0 if 9 * m >= 4 * q else 0.1 - 0.09 * m / q  # pct <= 0.06, decided in integers (no rounding)


def select_for_guidance(finished, group_size, pct, rng):
    """Step 3: per group, k = max(1, floor(|E| * pct)) rollouts drawn uniformly from the finished ones E.
    Correctness plays no part: the teacher may confirm a right answer as well as correct a wrong one.
    Example: G = 5, pct = 0.1, finished = [1,0,1,1,0, 0,0,0,0,0] -> one of [0, 2, 3]; group 2 has none."""
    if pct <= 0:
        return []
    chosen = []
    for g in range(0, len(finished), group_size):
        done = [i for i in range(g, g + group_size) if finished[i]]
        if done:
            chosen += sorted(rng.sample(done, max(1, math.floor(len(done) * pct))))
    return chosen


def parse_teacher(text):
    """Step 4: (opinion, reason, phrase) when the reply is exactly the three tagged parts in this order, each
    non-empty, with nothing around them; else None. Plain string search: no regex to backtrack on."""
    parts, rest = [], text.strip()
    for tag in ("opinion", "reason", "phrase"):
        open_, close = f"<{tag}>", f"</{tag}>"
        if not rest.startswith(open_) or close not in rest:
            return None
        body, rest = rest[len(open_):].split(close, 1)
        if not body.strip() or "<" + tag in body:
            return None
        parts.append(body.strip())
        rest = rest.lstrip()
    if rest or parts[0].lower() not in ("correct", "incorrect"):
        return None
    return parts[0].lower(), parts[1], parts[2]


def splice(response, reason, phrase, tok, stop_id):
    """Step 5: the student's response without its stop token, then the teacher's reflection and continuation as
    if the student had thought them, then that same stop token (stop_id). The opinion is dropped. Returns (ids,
    student tokens kept). Example: [s1, s2, EOS] with reason "Wait, 2 + 2 is 4." -> [s1, s2] +
    ids("\\n\\nWait, 2 + 2 is 4.\\n\\n" + phrase) + [EOS], 2."""
    kept = response[:-1]  # the response is finished, so its last token is the stop token
    teacher_ids = tok("\n\n" + reason + "\n\n" + phrase, add_special_tokens=False)["input_ids"]
    return kept + teacher_ids + [stop_id], len(kept)


def guided_mask(rollout, teacher_tokens_only=False):
    """g: [T] 1 on the tokens trained with AAS: the whole guided response (the authors' choice) or, with
    --guide-teacher-tokens-only, the teacher-written tokens and the final EOS."""
    g = torch.zeros(len(rollout.response))
    if rollout.guided:
        g[rollout.n_student if teacher_tokens_only else 0:] = 1
    return g


def ask_teacher(run, conversations):
    """Step 4's writing: one greedy reply per conversation, as (text, finished, why not asked), from a local model
    (by default the frozen initial student) or, with --teacher URL, a server (ask_server; finished: "stop")."""
    if isinstance(run.teacher, TeacherServer):
        return ask_server(run.teacher, conversations)
    prompts = [render_chat(run.teacher_tok, m) for m in conversations]
    fits = [j for j, ids in enumerate(prompts) if len(ids) <= run.args.teacher_max_prompt_len]
    out = [("", False, "teacher prompt longer than --teacher-max-prompt-len")] * len(prompts)
    if fits:
        replies, finished = generate(run.teacher, [prompts[j] for j in fits], run.teacher_how, desc="teacher")
        for j, reply, done in zip(fits, replies, finished):
            out[j] = (run.teacher_tok.decode(reply, skip_special_tokens=True), done, "")
    return out


def guide(rollouts, chosen, run):
    """Steps 4-5 on the chosen rollouts: the teacher reads each one (never the gold answer) and writes greedily;
    a reply that parses is spliced on. Returns one record per chosen rollout (reply text, passed, why not).
    Example: chosen = [3]; the teacher replies "<opinion>incorrect</opinion><reason>Wait, ...</reason><phrase>...
    \\boxed{7}</phrase>" and EOS -> rollouts[3] becomes its student ids + "\\n\\nWait, ...\\n\\n... \\boxed{7}" + its
    stop token, guided; a reply cut at --teacher-max-new-tokens leaves rollouts[3] as it was (why: not finished)."""
    tok, args = run.tok, run.args
    conversations = [teacher_messages(rollouts[i].question, tok.decode(rollouts[i].response, skip_special_tokens=True))
                     for i in chosen]
    records = []
    for i, (reply_text, done, why) in zip(chosen, ask_teacher(run, conversations)):
        r = rollouts[i]
        parsed = parse_teacher(reply_text) if done else None
        if parsed:
            ids, n_student = splice(r.response, parsed[1], parsed[2], tok, r.response[-1])  # its own stop token
        if why:
            pass  # never asked, or the server failed: the rollout stays as the student wrote it
        elif not done:
            why = "not finished within --teacher-max-new-tokens"
        elif parsed is None:
            why = "not the three tags in order"
        elif len(ids) - n_student - 1 > args.teacher_text_max:  # the teacher's tokens, not the stop token
            why = "longer than --teacher-text-max"
        else:
            r.response, r.guided, r.n_student = ids, True, n_student
            r.teacher_text = tok.decode(ids[n_student:], skip_special_tokens=True)
        records.append({"kind": "teacher_reply", "rollout": i, "text": reply_text, "passed": not why, "why": why})
    return records


# ------------------------------------------------------------------------------------------------ reward
def reward(response_text, finished, gold):
    """Step 6: r = 1 when the response ended with EOS (decided from token ids) and its final answer equals the
    gold one, else 0. A guided response is passed in as the teacher's text: it is graded on the teacher's answer."""
    return float(finished and grade(response_text, gold))


def grade(response, gold):
    """True when the response commits to a final answer equal to `gold`: the last non-empty \\boxed{} (else an
    <answer> block, an "answer is" phrase, the final sentence), compared by value (1/2 = 0.5, sets in any order)."""
    answer = extract_answer(response)
    return answer is not None and len(answer) <= MAX_ANSWER_CHARS and answers_match(answer, gold)


# ------------------------------------------------------------------------------------------------ advantages
def group_advantages(rewards, group_size):
    """Step 7: A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-6) within each group of G contiguous rollouts, std with
    Bessel's correction. rewards: [N] -> [N]. Example, G = 4: [1, 0, 0, 0] -> [1.5, -0.5, -0.5, -0.5] (std 0.5);
    a group whose rewards are all equal gets A = 0 everywhere and teaches nothing."""
    r = rewards.view(-1, group_size)  # [B, G]
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).flatten()  # [N]


# ------------------------------------------------------------------------------------------------ log-probs
def response_logprobs(model, prompts, responses, temperature, chunk=1024):
    """log pi(y_t | x, y_<t) at `temperature` for every response token: [n, T], 0 past each response.
    The LM head runs only on response positions, in chunks recomputed in the backward pass, so the [n, L, V]
    float32 logits never exist at once."""
    ids = right_pad([p + r for p, r in zip(prompts, responses)], model.device)  # [n, L]
    # No attention mask: the padding sits after every real token, where causal attention already keeps it out
    # (so the pad id does not matter). With a mask, transformers would copy K and V to every query head.
    hidden = model.base_model(input_ids=ids).last_hidden_state  # [n, L, H]
    plen = torch.tensor([len(p) for p in prompts], device=model.device)  # [n]
    rlen = torch.tensor([len(r) for r in responses], device=model.device)  # [n]
    t = torch.arange(int(rlen.max()), device=model.device)  # [T]
    mask = t[None] < rlen[:, None]  # [n, T] from lengths, never from comparing ids with a pad id
    src = (plen[:, None] + t[None] - 1).clamp(max=ids.shape[1] - 2)  # [n, T] position whose output predicts y_t
    rows = torch.arange(len(prompts), device=model.device)[:, None]
    h, target = hidden[rows, src][mask], ids[rows, src + 1][mask]  # [m, H], [m]
    parts = []
    for i in range(0, len(target), chunk):
        inputs = (model, h[i:i + chunk], target[i:i + chunk], temperature)
        parts.append(torch.utils.checkpoint.checkpoint(token_logp, *inputs, use_reentrant=False)
                     if torch.is_grad_enabled() else token_logp(*inputs))
    out = torch.zeros(mask.shape, device=model.device)  # [n, T]
    out[mask] = torch.cat(parts)
    return out


def token_logp(model, h, target, temperature):
    """[m] log-softmax of the LM head's logits at `target`, from hidden states h: [m, H]."""
    cfg = model.config
    logits = model.get_output_embeddings()(h).float() * (getattr(cfg, "logit_scale", None) or 1.0)  # [m, V]
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma-2 caps its logits
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    return logits.gather(-1, target[:, None]).squeeze(-1) - logits.logsumexp(-1)  # [m]


# ------------------------------------------------------------------------------------------------ loss
def aas_gamma(adv):
    """gamma(A) = clip(A / 4000, -0.001, 0.001); with 0/1 rewards and G = 5, |A| <= 4 / sqrt(5) ~ 1.79, so the clip
    never binds. (The authors passed the clamp bounds in the wrong order, which made gamma = -0.001 for every
    token; we follow the evident intent, this linear formula.)"""
    return (adv / 4000).clamp(-1e-3, 1e-3)


def aas_d(p_sg, A):
    """d = sg(p) + gamma(A), kept positive and near (0, 1]: d < 0 -> sg(p) / 1.0001, d > 1 -> sg(p) / 0.9999.
    [n, T] -> [n, T]. (d < 0 needs A < 0 and p < 0.001: routing sends such tokens to PPO, so that branch is only
    ever computed, never used.)"""
    d = p_sg + aas_gamma(A)
    d = torch.where(d < 0, p_sg / 1.0001, torch.where(d > 1, p_sg / 0.9999, d))
    # A teacher-written token can have p below float32's range (log p < -103): then p = 0 and d = 0. The floor
    # changes no value that is used (where AAS applies, d >= 0.009 if A < 0, d >= gamma(A) > 1e-30 if A > 0, and
    # the loss is 0 if A = 0) and keeps 0/0 out of the gradient.
    return d.clamp(min=1e-30)


def policy_loss(logp, old_logp, adv, mask, guided, clip_eps=0.2, dual_clip=3.0):
    """Token-mean ThinkTuning loss and its statistics. With rho = exp(logp - old_logp) and A the row's advantage:
    PPO tokens: l = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), and at most -A c when A < 0 (the dual clip).
    AAS tokens (guided ones, except A < 0 with sg(p) < 0.01: those go to PPO): l = -A p / d with p = exp(logp) and
    d = sg(p) + gamma(A) (aas_d): no ratio, no clip. The loss is sum(mask l) / sum(mask) over every row.
    logp, old_logp: [n, T] log-probs of the response tokens (logp with gradient); adv: [n];
    mask: [n, T] 1 on response tokens (EOS included); guided: [n, T] g, 1 on tokens trained with AAS.
    Statistics: clip_frac and dual_clip_frac (shares of PPO tokens, NaN without any), aas_tokens, aas_scored (the
    AAS tokens of rows with A != 0) and aas_weight (their mean p / d)."""
    mask, guided = mask.bool(), guided.bool()
    A = adv[:, None].expand_as(logp)  # [n, T] advantage broadcast to every token
    # [n, T] rho; the log-ratio is clamped to [-20, 20] (as verl): exp(88) is inf in float32 and its backward NaN.
    # Beyond e^20 every PPO branch is clipped anyway; below e^-20 the loss moves by less than |A| * 2e-9.
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    # unguided tokens: PPO with dual clip
    l_clip = torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip_eps, 1 + clip_eps))  # [n, T]
    l_ppo = torch.where(A < 0, torch.minimum(l_clip, -A * dual_clip), l_clip)  # [n, T]
    # guided tokens: Advantage-Aware Shaping, l = -A p / d with d = sg(p) + gamma(A) (no ratio, no clip)
    p = logp.exp()  # [n, T] with gradient
    p_sg = p.detach()  # [n, T]
    d = aas_d(p_sg, A)  # [n, T]
    l_aas = -A * p / d  # [n, T]; gradient -A * p/d * grad log p, unclipped
    # routing: a guided token with A < 0 and sg(p) < 0.01 falls back to PPO
    use_aas = guided & ~((A < 0) & (p_sg < 0.01))  # [n, T] M
    l = torch.where(use_aas, l_aas, l_ppo)  # [n, T]
    loss = torch.where(mask, l, 0.0).sum() / mask.sum().clamp(min=1)  # scalar: token mean, no KL, no entropy
    with torch.no_grad():
        ppo_tok, aas_tok = mask & ~use_aas, mask & use_aas  # [n, T]
        scored = aas_tok & (A != 0)  # [n, T] AAS tokens that push (with A = 0, p / d is 1 and moves nothing)
        n_ppo, nan = ppo_tok.sum().item(), float("nan")
        clipped = -A * ratio.clamp(1 - clip_eps, 1 + clip_eps) > -A * ratio  # [n, T] the clip takes effect
        dual = (A < 0) & (l_clip > -A * dual_clip) & ppo_tok  # [n, T] the dual clip takes effect
        stats = {"clip_frac": (clipped & ppo_tok).sum().item() / n_ppo if n_ppo else nan,
                 "dual_clip_frac": dual.sum().item() / n_ppo if n_ppo else nan,
                 "aas_tokens": aas_tok.sum().item(), "aas_scored": scored.sum().item(),
                 "aas_weight": (p_sg / d)[scored].mean().item() if scored.any() else nan}
    return loss, stats


def kl_k3(logp, ref_logp):
    """k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1. [n, T] -> [n, T]"""
    delta = ref_logp - logp
    return delta.exp() - delta - 1


# ------------------------------------------------------------------------------------------------ the update
def moves_weights(rollout, args):
    """Whether a rollout can change the weights: with A = 0 and no KL term its loss and gradient are exactly 0,
    so it needs neither old log-probs nor a forward/backward (its tokens still count in the token mean)."""
    return rollout.adv != 0 or args.kl_beta > 0


@torch.no_grad()
def score_old(model, ref, rollouts, args):
    """Step 8: old log-probs. The current student scores every final sequence (spliced ones too) that can move
    the weights once, before any update, at the sampling temperature; the KL reference (--kl-beta) too."""
    todo, rows = by_length([r for r in rollouts if moves_weights(r, args)]), 4 * args.micro_batch  # no grad: 4x rows
    for k in range(0, len(todo), rows):
        sub = todo[k:k + rows]
        P, R = [r.prompt for r in sub], [r.response for r in sub]
        old = response_logprobs(model, P, R, args.temperature)  # [n, T]
        ref_lp = response_logprobs(ref, P, R, args.temperature).to(old.device) if ref is not None else None
        for j, r in enumerate(sub):
            r.old_logp = old[j, :len(r.response)]
            r.ref_logp = ref_lp[j, :len(r.response)] if ref_lp is not None else None


def micro_batch_loss(model, rows, args):
    """The loss (with the KL term when --kl-beta > 0), its statistics and its token count for a few rollouts."""
    logp = response_logprobs(model, [r.prompt for r in rows], [r.response for r in rows], args.temperature)
    T, dev = logp.shape[1], logp.device  # logp: [n, T]
    old = pad_rows([r.old_logp for r in rows], T)  # [n, T]
    mask = pad_rows([torch.ones(len(r.response), device=dev) for r in rows], T)  # [n, T]
    guided = pad_rows([guided_mask(r, args.guide_teacher_tokens_only).to(dev) for r in rows], T)  # [n, T]
    adv = torch.tensor([r.adv for r in rows], device=dev)  # [n]
    loss, stats = policy_loss(logp, old, adv, mask, guided, args.clip_eps, args.dual_clip)
    if args.kl_beta > 0:
        kl = (kl_k3(logp, pad_rows([r.ref_logp for r in rows], T)) * mask).sum() / mask.sum()  # token mean
        loss, stats["kl"] = loss + args.kl_beta * kl, kl.item()
    return loss, stats, mask.sum().item()


def token_share(micro_tokens, minibatch_tokens):
    """The factor that makes micro-batch token means add up to the mini-batch's: sum(m l) / sum(m) over the
    micro-batch, times its share of the mini-batch's tokens, summed over micro-batches, is sum(m l) / sum(m)
    over the mini-batch."""
    return micro_tokens / minibatch_tokens


def update(model, rollouts, optim, args, rng):
    """Step 9: one pass over the step's rollouts in --minibatches AdamW steps; each mini-batch's loss is one
    token mean over all of its rollouts, accumulated over micro-batches of --micro-batch rows (8; memory only)."""
    order = list(range(len(rollouts) * WORLD))  # the step's rows; several GPUs: mine() picks this rank's
    rng.shuffle(order)
    size = len(order) // args.minibatches
    stats, norms, losses, skipped, aas_idle = [], [], [], 0, 0
    model.train()  # for gradient checkpointing; dropout is off (load_model)
    for mb in tqdm(range(args.minibatches), desc="update", leave=False):
        rows = [rollouts[i] for i in mine(order[mb * size:(mb + 1) * size], len(rollouts))]
        n_tokens = sum(everyone([sum(len(r.response) for r in rows)]))  # every row, also those with A = 0
        busy, loss_sum, finite = by_length([r for r in rows if moves_weights(r, args)]), 0.0, True
        aas_idle += sum(int(guided_mask(r, args.guide_teacher_tokens_only).sum())  # A = 0: all AAS
                        for r in rows if not moves_weights(r, args))
        for k in range(0, len(busy), args.micro_batch):
            loss, st, n = micro_batch_loss(model, busy[k:k + args.micro_batch], args)
            finite = bool(torch.isfinite(loss))
            if not finite:
                break
            share = token_share(n, n_tokens)
            (loss * share).backward()
            stats.append(st)
            loss_sum += loss.item() * share
        # Every micro-batch finite (on every rank): step, also when no row could move the weights (weight decay
        # applies). optim.step sums the ranks' gradients (several GPUs), clips their norm, skips a non-finite one
        # and returns (norm, stepped). Else skip this update, keep training.
        norm, ok = optim.step(args.grad_clip) if all(everyone([finite])) else (optim.zero_grad(), False)
        skipped += not ok
        if ok:  # loss and gradient norm describe the mini-batches that stepped
            norms.append(norm)
            losses.append(sum(everyone([loss_sum])))
    model.eval()
    stats, aas_idle = everyone(stats), sum(everyone([aas_idle]))  # several GPUs: statistics of the whole step
    mean = lambda key: nanmean([s[key] for s in stats if key in s])  # noqa: E731
    scored = sum(s["aas_scored"] for s in stats)  # the AAS weight is a mean over tokens, not over micro-batches
    return {"loss": nanmean(losses), "grad_norm": nanmean(norms), "skipped_updates": skipped,
            "clip_frac": mean("clip_frac"), "dual_clip_frac": mean("dual_clip_frac"),
            "aas_weight": sum(s["aas_weight"] * s["aas_scored"] for s in stats if s["aas_scored"]) / scored
            if scored else float("nan"), "aas_tokens": aas_idle + sum(s["aas_tokens"] for s in stats),
            **({"kl": mean("kl")} if args.kl_beta > 0 else {})}


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """Everything a training step needs, made once by start_run (Part II)."""
    args: argparse.Namespace
    tok: object  # the student's tokenizer
    student: torch.nn.Module
    teacher: torch.nn.Module  # None when no step ahead is guided
    teacher_tok: object
    ref: torch.nn.Module  # the KL reference (the frozen initial model), --kl-beta only
    optim: "MasterAdamW"
    problems: list  # {'question', 'gold', 'prompt'}
    student_how: Sampling
    teacher_how: Sampling
    rng: random.Random  # rollout selection and mini-batch order
    state: dict  # step, cursor (position in the data stream), py_rng: what a resume restores
    eval_items: list = None  # held-out problems for --eval-every
    said: set = field(default_factory=set)  # notes already printed once


# ------------------------------------------------------------------------------------------------ one step
def train_step(run, step):
    """One step of ThinkTuning, numbered as the README's step table. Returns the rollouts and the step's record
    of what happened (guidance, teacher replies, update statistics, seconds per phase)."""
    args, tok = run.args, run.tok
    t = [sync(args.device)]  # timestamps of the phases
    # 1. B questions, G rollouts each (groups of G contiguous rollouts); several GPUs: this rank's share of them
    batch = share(next_questions(run.problems, args.seed, run.state["cursor"], args.prompts_per_step))
    run.state["cursor"] += args.prompts_per_step
    rollouts = [Rollout(q["question"], q["gold"], q["prompt"]) for q in batch for _ in range(args.group_size)]
    # 2. the student samples every rollout in one batched call
    responses, finished = generate(run.student, [r.prompt for r in rollouts], run.student_how, desc="student")
    for r, ids, done in zip(rollouts, responses, finished):
        r.response, r.finished, r.n_student = ids, done, len(ids)
    t.append(sync(args.device))
    # 3. while the schedule says so, k finished rollouts per group go to the teacher; 4-5. it writes, we splice
    pct = guidance_pct(step, args.schedule_steps) if run.teacher is not None else 0.0
    finished = everyone([r.finished for r in rollouts])  # several GPUs: every rank draws from the whole step
    chosen = mine(select_for_guidance(finished, args.group_size, pct, run.rng), len(rollouts))
    replies = guide(rollouts, chosen, run) if chosen else []
    t.append(sync(args.device))
    # 6. rewards: a guided rollout is graded on the teacher's answer
    texts = [tok.decode(r.response, skip_special_tokens=True) for r in rollouts]
    for r, text in zip(rollouts, texts):
        r.reward = reward(r.teacher_text if r.guided else text, r.finished, r.gold)
    # 7. group advantages, over guided and unguided rollouts together
    rewards = torch.tensor([r.reward for r in rollouts])  # [N]
    for r, a in zip(rollouts, group_advantages(rewards, args.group_size).tolist()):
        r.adv = a
    # 8. old log-probs, before any update
    score_old(run.student, run.ref, rollouts, args)
    t.append(sync(args.device))
    # 9. the update: --minibatches AdamW steps
    upd = update(run.student, rollouts, run.optim, args, run.rng)
    t.append(sync(args.device))
    return rollouts, {"pct": pct, "chosen": chosen, "replies": replies, "texts": texts, "update": upd,
                      "seconds": [b - a for a, b in zip(t, t[1:])]}


# ------------------------------------------------------------------------------------------------ the loop
def train(args):
    """Set up (Part II: data, models, optimizer, resume, the start-up plan), then one step after another.
    Returns False when stopped by Ctrl-C (after saving)."""
    run = start_run(args)
    if run is None:  # nothing left to do
        return True
    with ctrl_c_saves() as stop_requested:  # a list, non-empty once Ctrl-C was pressed
        bar = tqdm(range(run.state["step"] + 1, args.steps + 1), desc="train", initial=run.state["step"],
                   total=args.steps)
        for step in bar:
            rollouts, record = train_step(run, step)
            run.state["step"], run.state["py_rng"] = step, run.rng.getstate()
            row = log_step(run, step, rollouts, record)  # metrics.jsonl, samples.jsonl
            bar.set_postfix(reward=f"{row['reward']:.3f}", guided=row["n_guided"], loss=f"{row['loss']:.4f}")
            if run.teacher is not None and guidance_pct(step + 1, args.schedule_steps) == 0:
                release_teacher(run, step)  # plain GRPO from here on: the teacher's weights and cache are freed
            stop = any(everyone([bool(stop_requested)]))  # several GPUs: every rank stops after the same step
            if RANK == 0 and (step % args.save_every == 0 or step == args.steps or stop):  # rank 0 writes files
                save_checkpoint(args.out, run.student, run.tok, trainer_state(run))
            if stop:
                print(f"stopped after step {step}, checkpoint saved; continue with: "
                      f"{'python' if WORLD == 1 else 'torchrun [its options]'} thinktuning.py --resume {args.out}")
                break
    if RANK == 0:
        print(f"wrote {write_report(args.out)}")
    return not stop


# ################################################################################################################
# PART II. MACHINERY: safe to skip on a first reading
# ################################################################################################################

# ------------------------------------------------------------------------------------------------ flags and checks
def machinery_flags(a):
    """The flags that change how the method runs, not what it computes."""
    a("--out", help="run folder: metrics, samples, checkpoints, evaluation [runs/thinktuning; --eval: runs/eval-MODEL]")
    a("--resume", metavar="OUT", help="continue the run saved in OUT (its settings; flags given here override)")
    a("--micro-batch", type=int, default=8, help="rows per forward/backward (memory only; lower it if memory runs out)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: bfloat16 on GPU, float32 on CPU")
    a("--no-fast", action="store_true", help="on GPU, sample with plain model.generate instead of the compiled sampler")
    a("--no-grad-ckpt", action="store_true", help="turn off gradient checkpointing (on by default on GPU)")
    a("--save-every", type=int, default=20, help="checkpoint every N steps (and always at the end)")
    a("--ignore-disk", action="store_true", help="start even when the free disk cannot hold one more checkpoint")
    a("--log-samples", type=int, default=4, help="full rollouts per step written to samples.jsonl")
    a("--teacher-model", help="with --teacher URL: the request's model field [the server's first listed model]")
    a("--teacher-timeout", type=float, default=600.0, help="with --teacher URL: seconds per request (3 tries)")
    a("--eval", help="evaluate only: comma-separated gsm8k,math500,aime24,aime25,gpqa or local files")
    a("--eval-limit", type=int, help="first N items of each benchmark")
    a("--eval-samples", type=int, default=1, help="samples per question (1 = greedy pass@1, the paper's protocol)")
    a("--eval-temperature", type=float, default=0.0, help="sampling temperature when --eval-samples > 1")
    a("--eval-max-new-tokens", type=int, help="response tokens in evaluation (default: --max-new-tokens)")
    a("--eval-batch-size", type=int, default=64, help="questions per generate call in evaluation")
    a("--compare", help="print one table from the eval.json of comma-separated run folders, paper numbers beside")
    a("--report", metavar="OUT", help="write OUT/report.html: curves, evaluation, guided rollouts (with --compare: "
      "against those runs too)")
    a("--eval-every", type=int, default=0, help="during training, evaluate every N steps on --eval-data (0: never)")
    a("--eval-data", default="gsm8k", help="held-out set for --eval-every")
    a("--eval-every-limit", type=int, default=200, help="items of --eval-data used by --eval-every")
    a("--exercise", metavar="NAME[,NAME]", help="print this file with those functions left to write ('list')")


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other bad input, instead of the usage block
        raise UserError(f"{message} (python thinktuning.py --help lists the flags)")


def first_line(e):
    """The first line of an exception's message (its type when the message is empty), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def check_args(args):
    """Catch bad settings before anything is loaded."""
    if args.model is None and args.resume is None and not args.compare and not args.report:
        raise UserError("--model is required (a Hub name or a local folder)")
    if args.no_teacher and args.teacher:
        raise UserError("--no-teacher and --teacher contradict each other: drop one")
    if args.teacher_model and not is_url(args.teacher):
        raise UserError("--teacher-model names a server's model: it needs --teacher http(s)://...")
    if args.teacher_timeout <= 0:
        raise UserError(f"--teacher-timeout {args.teacher_timeout}: use a number of seconds > 0")
    if args.group_size < 2:
        raise UserError(f"--group-size {args.group_size}: GRPO needs at least 2 rollouts per question")
    n = args.prompts_per_step * args.group_size
    if args.minibatches < 1 or n % args.minibatches:
        raise UserError(f"--minibatches {args.minibatches} must divide the {n} rollouts per step "
                        f"(--prompts-per-step x --group-size)")
    for name in ("steps", "prompts_per_step", "max_new_tokens", "teacher_max_new_tokens", "micro_batch",
                 "eval_samples", "eval_batch_size", "save_every", "eval_limit", "eval_max_new_tokens",
                 "eval_every_limit", "schedule_steps", "max_prompt_len", "teacher_max_prompt_len", "teacher_text_max"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("eval_every", "log_samples", "kl_beta", "eval_temperature"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0 (0: off)")
    if not 0 < args.clip_eps < 1 or args.dual_clip <= 1:
        raise UserError("--clip-eps must be in (0, 1) and --dual-clip > 1 (the paper: 0.2 and 3; at c <= 1 the dual "
                        "clip stops every gradient of a negative advantage)")
    if args.lr <= 0 or args.weight_decay < 0 or args.grad_clip <= 0:
        raise UserError("--lr and --grad-clip must be > 0 and --weight-decay >= 0")
    if args.eval is not None and not [n for n in args.eval.split(",") if n.strip()]:
        raise UserError(f"--eval {args.eval!r} names no benchmark: use {', '.join(BENCHMARKS)} or local files")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise UserError(f"--device {args.device}: use auto, cpu, cuda or cuda:N")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0")
    if args.eval_samples > 1 and args.eval_temperature <= 0:
        raise UserError("--eval-samples > 1 needs --eval-temperature > 0 (greedy samples would all be equal)")
    if args.eval_temperature > 0 and args.eval_samples == 1:
        raise UserError("--eval-temperature applies to --eval-samples > 1 (one sample is greedy): add --eval-samples")
    if args.out is None:  # evaluation gets a folder of its own, named after the model
        name = os.path.basename(os.path.normpath(args.model or "model")) or "model"
        args.out = f"runs/eval-{name}" if args.eval and not args.resume else "runs/thinktuning"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this machine has no CUDA GPU visible to torch; use --device cpu")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.fast = args.device.startswith("cuda") and not args.no_fast  # the compiled sampler pays off on GPUs only
    args.grad_ckpt = args.device.startswith("cuda") and not args.no_grad_ckpt  # measured: it pays (README, speed)
    return args


# ------------------------------------------------------------------------------------------------ grader internals
# grade (Part I) asks two questions: which final answer does the response commit to (extract_answer), and does
# it equal the gold one (answers_match)? Standard library only. It decides every reward, and an RL policy will
# find its weak spots, so when unsure it says "wrong".

MAX_ANSWER_CHARS = 400  # a longer "final answer" is not an answer
_BOX = re.compile(r"\\(?:boxed|fbox|framebox)(?: {1,2}(?=\{)|[ \t]+([^\s$]+))?")  # "\boxed {5}", bare "\boxed 5"
_TEMPLATE = re.compile(r"<\|[a-z_]{1,30}\|>")  # <|im_end|>, <|eot_id|>: whatever follows is not the response


def _box_before(text, end):
    """(start, stop, content) of the last \\boxed / \\fbox that starts before `end`, braces counted; content None when
    truncated. Empty boxes are skipped: "put your answer in \\boxed{}" restates the instruction, it is no answer."""
    for _ in range(20):
        start = max(text.rfind(word, 0, end) for word in ("\\boxed", "\\fbox", "\\framebox"))
        if start < 0:
            return None
        m = _BOX.match(text, start)
        i = m.end()
        if m[1] or not text.startswith("{", i):
            return start, i, m[1]  # a bare box, or (content None) a box word with no box
        depth, j = 0, i
        for j in range(i, min(len(text), i + 4 * MAX_ANSWER_CHARS)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                break
        if depth:
            return start, len(text), None  # never closed: truncated inside the box
        if text[i + 1:j].strip():
            return start, j + 1, text[i + 1:j]
        end = start
    return None


# Phrases that commit to a final answer; the sentence after the last one is the answer.
_ANSWER_PHRASE = re.compile(r"(?:final answer|the answer|correct answer|correct option|correct choice|answer)"
                            r"[ \t*]*(?:is|:|=)[ \t*:]*|####[ \t]*|(?:\.\.\.[ \t]*no,?|\bactually,?[ \t]+it'?s)[ \t]+"
                            r"(?=\$?-?\d|(?-i:[A-J])\b)", re.IGNORECASE)  # a correction: "15... no, 12"
# Taking an answer back means saying that *it* is wrong ("Option A is wrong" explains, it does not retract).
_RETRACTION = re.compile(r"\b(?:(?:that|this|it|my answer|our answer|the answer|my result)(?:'s| is| was) "
                         r"(?:wrong|incorrect|not right|not correct)|made (?:a|an) (?:mistake|error)|my mistake|"
                         r"miscalculated|scratch that|on second thought|wait, no|no, wait|start over|"
                         r"or (?:maybe|perhaps|possibly)|(?<=[.!?] )or \$?-?\d)\b", re.IGNORECASE)  # hedges too
_NUMBER = re.compile(r"(?:(?<![A-Za-z\d.,])(?:-\$?)?(?:\d{1,3}(?:,\d{3})+(?!\d)(?!,\d)|\d+)(?:\.\d+)?(?:/\d+)?"
                     r"|(?<![A-Za-z\d])-?\.\d+)(?: ?(?:\\?%|thousand|million|billion|dozen|hundred)(?![a-z]))?")
_HEDGE = re.compile(r"\d(?:\s*[)}$])?\s*(?:or|and/or)\s+\$?\\?\(?-?\d", re.IGNORECASE)  # one \s* run per digit
# A final sentence that stops on one of these was cut off mid-thought (a truncated output).
_UNFINISHED = re.compile(r"(?:[=+\-*/×÷,:(]|\b(?:and|or|of|is|are|by|the|to|a|an|with|which|then|so|gives|"
                         r"equals))\s*$", re.IGNORECASE)
_RELATION = re.compile(r"[<>≤≥≠]|!=|\\(?:[lg]eq?|neq?|lt|gt)(?![a-z])")  # a relation is not a value
_LABEL = re.compile(r"[(|]?[a-z][\w{}(),|:]*")  # a name, no operators: x, f(x), (p,q), |ab|, v_1:v_2
# A final sentence that negates, bounds, supposes or asks commits to nothing ("It is not 8.", "Does 14 work?").
_NONCOMMITTAL = re.compile(_RELATION.pattern + r"|\?|\b(?:not|never|cannot|can't|isn't|whether|suppose|assume|let's|"
                           r"let us|at (?:least|most)|(?:more|less|fewer) than|up to|between|(?:is|are) given|recall|"
                           r"we know)\b|\bfrom \$?\d|\d ?[-–] ?\d+(?:\.\d+)? ?[a-z%]", re.IGNORECASE)  # "10-15 min"
_EXPONENT = re.compile(r"[\^_](?:\{[^{}]*\}|-?\d+)")  # x^{-2}, 10^3, a_1: not answers
# Words that change a number's value, so "5 dozen" is never 5 (a count noun such as "5 apples" is 5).
_SCALE = re.compile(r"(?:hundred|thousand|million|billion|trillion|dozen|score|gross|half|halve|third|quarter|\w*th|"
                    r"time|squared|cubed|factorial|root|sqrt|raised|over|plus|minus|than|divided|power|pair|couple)s?")
# A clause after the answer explains it: "20 cookies, which is 4 more than 16", "20 (since 12 + 8 = 20)".
_CLAUSE = re.compile(r",\s*(?:which|so|since|because|as|not)\b|\s(?:since|because)\b|\s\((?![^)]*\bor\b)",
                     re.IGNORECASE)
# An answer phrase that only comments ("The answer is correct.") is not where the answer is.
_SETUP = re.compile(r"\b(?:find|get|compute|calculate|determine|work out)\s+$", re.IGNORECASE)  # "to find the answer:"
_COMMENT = re.compile(r"[ \t*:]*(?:correct|right|verified|confirmed)[ \t*]*[.!]?[ \t]*(?:\n|\Z)", re.IGNORECASE)


def _sentence_after(text, i):
    """The text from i to the end of its sentence: a newline, or a '.'/'!'/'?' followed by a space or the end."""
    i = re.compile(r"\s*(?:[-*] )?").match(text, i).end()  # "The answer is:\n\n18", "- 18": a bullet, not a minus
    for opening, closing in (("$$", "$$"), ("\\[", "\\]")):  # "The answer is:\n$$\n\\frac{1}{2}\n$$": the block
        if text.startswith(opening, i):
            j = text.find(closing, i + 2, i + 2 + MAX_ANSWER_CHARS)
            return (text[i + 2:j], j + 2) if j > 0 else ("", i)
    j, end = i, min(len(text), i + MAX_ANSWER_CHARS)
    while j < end and text[j] != "\n":
        if text[j] in ".!?" and (j + 1 == len(text) or text[j + 1].isspace()) and text[j - 1] != "\\":  # not \\!
            break
        j += 1
    return text[i:j], j


def _taken_back(text, i, answer):
    """Whether what follows position i takes `answer` back: an explicit "that's wrong", a hedge, or a later answer
    phrase with another value. Re-checking is not retracting: "Let me recalculate: 8 * 3 = 24. Yes." keeps it."""
    if _RETRACTION.search(text, i, i + 300):
        return True
    later = _phrase_answer(text[i:])  # a later "the answer is 26" (but "our answer is correct" is a comment)
    return (later is not None and all(_values(v) for v in _split_top(normalize_answer(later).strip("()[]")))
            and not answers_match(later, answer))


def _boxed_answer(text, box):
    """The content of the last box; two different boxes in its sentence are a list, or a hedge if joined by 'or'."""
    start, stop, content = box
    if content is None:
        return None  # truncated inside the box
    if re.search(r"\b(?:draft|rejected|discarded)\b", text[max(0, start - 40):start], re.IGNORECASE):
        return _phrase_answer(text)  # "(my rejected draft was \boxed{15})": the stated answer, if any
    parts = [content]  # the boxes of one sentence: "\boxed{-2} and \boxed{3}" is a list, with "or" a hedge
    for _ in range(9):
        prev = _box_before(text, start)
        between = text[prev[1]:start] if prev else ""
        if not (prev and prev[2] and len(between) < 60 and not re.search(r"[.!?]\s|\n", between)):
            break
        new = not any(answers_match(prev[2], part) for part in parts)
        if new and re.search(r"\bor\b", between):
            return None
        parts, start = [prev[2]] * new + parts, prev[0]
    content = ", ".join(parts)
    if _taken_back(text, stop, content):  # only a later answer phrase can replace it
        return _phrase_answer(text[stop:])
    return content


def _last_phrase(text):
    """The last "final answer is" / "Answer:" / "####" in (the last 20 kB of) the text that is not a mere comment
    ("The answer is correct.") nor a step's goal ("Step 1: find the answer: ..."), or None."""
    last = None
    for m in _ANSWER_PHRASE.finditer(text, max(0, len(text) - 20_000)):
        goal = _SETUP.search(text, max(0, m.start() - 24), m.start())  # a step's goal, not its result
        if not goal and (last is None or not _COMMENT.match(text, m.end())):  # a comment after an answer: skipped
            last = m
    return last


def _phrase_answer(text, phrase=None):
    """The sentence after the last answer phrase, unless hedged or taken back; of a statement such as "The smallest
    $k$ is 12" the part after "is", and of "18 eggs" the number (a count noun: no unit, single letter or scale)."""
    phrase = phrase or _last_phrase(text)
    if phrase is None:
        return None
    answer, stop = _sentence_after(text, phrase.end())
    answer = answer.strip().strip("*").strip().rstrip(",")
    if not answer or _HEDGE.search(answer) or _RETRACTION.search(answer):
        return None
    clause = _CLAUSE.search(answer)  # the answer is what comes before the explanation
    answer = answer[:clause.start()].strip() if clause and re.search(r"\d", answer[:clause.start()]) else answer
    parts = re.split(r"\s(?:is|are|was|equals)\s", answer)
    answer = _count_noun_dropped(parts[-1].strip() if len(parts) == 2 else answer)
    return None if _taken_back(text, stop, answer) else answer


def _count_noun_dropped(answer):
    """"18 eggs", "8 birds on the tree" -> the number: a count noun (3 letters or more) does not change its value.
    A scale or joining word does, so "5 dozen", "7 hundred", "2 and three", "4 m" stay as they are."""
    plain = re.sub(r"\\?\$", "", _UNWRAP.sub(r" \1", answer)).strip()  # "$7\text{ birds}$" -> "7  birds"
    noun = re.fullmatch(r"(.*=\s*)?(-?\d[\d,.]*)\s+([A-Za-z][A-Za-z ]*)", plain)  # also "3 + 5 = 8 birds"
    words = noun.group(3).lower().split() if noun else []
    if words and len(words[0]) > 2 and not any(_SCALE.fullmatch(w) or w in ("and", "or", "but") for w in words):
        return (noun.group(1) or "") + noun.group(2)
    return answer


def _final_sentence_answer(text):
    """A lone letter on the last line, or the one answer of the final sentence: its last math block or last number
    (with a scale word or percent sign), never a number inside LaTeX. A last number from anywhere would reward
    truncated outputs that stop while restating the question or an intermediate result."""
    tail = re.sub(r"\\\[[^\]]*\]|\$\$[^$]*\$\$", lambda m: m[0].replace("\n", " "), text[-2000:])  # displays: one line
    last = re.sub(r"\\[\[\]()]|\$\$", "$", tail).strip().split("\n")[-1]  # the last line; math is $..$
    letter = re.fullmatch(r"[*$\s]*\(?([A-J])\)?[*.$\s]*", last) or re.search(  # "(B)", "**C**", "$D$", "A"
        r"\b(?:choose|select|pick)\s(?:option\s)?\(?([A-J])\)?\W*$|(?<![\w(])\(?([A-J])\)? is the correct", last)
    if letter:
        return letter.group(1) or letter.group(2)
    final = re.split(r"(?<=[.!?])\s+(?=\S)|(?<=\$)\s+(?=[A-Z])", last.replace("**", "").strip())[-1]
    if _HEDGE.search(final) or _UNFINISHED.search(final.rstrip("$ ")) or final.count("{") != final.count("}"):
        return None
    clause = re.search(r",\s*(?:which|since|because)\b", final)  # "15 stickers, which is 3 more than Tom"
    final = final[:clause.start()] if clause and re.search(r"\d", final[:clause.start()]) else final
    blocks = list(re.finditer(r"\$([^$]*)\$", final))
    rest = final[blocks[-1].end():] if blocks else final
    numbers = _NUMBER.findall(_EXPONENT.sub(" ", rest))
    listed = len(numbers) > 3 and all(re.fullmatch(r"[\d,.]+", w) for w in rest.split()[-4:])
    if _NONCOMMITTAL.search(re.sub(r"\$[^$]*\$", " ", final)) or listed:
        return None  # a bound, a range, a restated given; a bare list of numbers ("1 2 3 ... 5000")
    if blocks and not numbers:
        return blocks[-1][1]  # an unboxed math expression is one answer: $\frac{10}{9}$ is never 9
    if re.search(r"\\[a-zA-Z]|\{", rest):  # LaTeX outside $..$: the whole sentence if it holds math only, else none
        return rest.strip() if re.fullmatch(r"[^a-zA-Z]*\d[^a-zA-Z]*", re.sub(r"\\[a-zA-Z]+", "", rest)) else None
    return numbers[-1] if numbers else None


def extract_answer(text):
    """The response's final answer as a string, or None when it commits to none (or hedges, or retracts).
    Order: the last \\boxed{}, else the last <answer></answer>, else an answer phrase, else the final sentence."""
    marker = _TEMPLATE.search(text)
    if marker and text[:marker.start()].strip():  # the model ran on past its end-of-turn marker
        text = text[:marker.start()]
    text = re.sub(r"I hope it is correct\.?$", "", text.rstrip())  # a closing formula, not the final sentence
    box = _box_before(text, len(text))
    if box is not None:
        return _boxed_answer(text, box)
    a = text.rfind("<answer>")
    b = text.find("</answer>", a) if a >= 0 else -1
    if 0 <= a < b and b - a < MAX_ANSWER_CHARS:
        content = text[a + 8:b].strip()
        return content if content and not _taken_back(text, b, content) else None
    phrase = _last_phrase(text)  # found once: _phrase_answer reads the sentence after it
    return _phrase_answer(text, phrase) if phrase else _final_sentence_answer(text)


_UNWRAP = re.compile(r"\\(?:text|textbf|textit|textnormal|mathbf|mathrm|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_DROP = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\$", "$", "\\(", "\\)",
         "\\[", "\\]", "^\\circ", "^{\\circ}", "\\circ", "°", "€", "£", "¥", "**", "`")
_UNICODE = str.maketrans({"×": "\\times ", "÷": "\\div ", "·": "\\cdot ", "√": "\\sqrt", "∞": "\\infty ", "π": "\\pi ",
                          "−": "-", "½": "\\frac{1}{2}", "⅓": "\\frac{1}{3}", "⅔": "\\frac{2}{3}", "¼": "\\frac{1}{4}",
                          "¾": "\\frac{3}{4}"})
_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
# Words that make the value ("5 thousand" is 5000, "3 dozen" 36); "5 hundred" stays text, as decided before.
_SCALES = {"thousand": "\\times10^{3}", "million": "\\times10^{6}", "billion": "\\times10^{9}", "dozen": "\\times12"}
_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()  # "The answer is five."
_RELATIONS = re.compile(r"\\(?:leq?|geq?|neq?|lt|gt)(?![a-z])|[<>!]=")  # one spelling each: ≤ ≥ ≠ < >
# Known units and currencies only: never a single letter (7y, 3i, 4m), never a scale word (5 dozen).
_UNIT = (r"(?:(?:centi|milli|kilo)?(?:met(?:er|re)|gram|lit(?:er|re))|inch|foot|feet|yard|mile|pound|ounce|ton|"
         r"gallon|quart|pint|cup|dollar|cent|euro|pence|yen|degree|radian|hour|minute|second|day|week|month|year|"
         r"unit|point|percent|cm|mm|km|kg|mg|ml|lb|oz|ft|yd|mph|hr|min|sec)(?:e?s)?")
_UNIT_TAIL = re.compile(r"(?<=[\d}])\s*(?:(?:square|cubic|sq)\.?\s*)?" + _UNIT + r"(?:\s*(?:per|/)\s*" + _UNIT
                        + r")?(?:\^\{?[23]\}?)?\.?$", re.IGNORECASE)


def normalize_answer(s):
    """A canonical string for an answer: LaTeX noise, units, currency and thousands separators removed."""
    s = str(s).strip()
    for _ in range(3):  # \text{\textbf{x}}: unwrap nested wrappers
        s = _UNWRAP.sub(r"\1", s)
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # "\ " is a space, but "\\ " is a matrix row break
    s = re.sub(r"(?<=\d),\\!\s*(?=\d{3}(?!\d))", ",", s)  # "11,\! 111": a thousands separator
    s = re.sub(r"(?<=\d)\{,\}(?=\d{3}(?!\d))", "", s)  # "1{,}234" is 1234 ...
    s = re.sub(r"(?<=\d)\{,\}(?=\d)", ".", s).replace("{,}", ",")  # ... but "3{,}4" is a decimal comma, 3.4
    for token in _DROP:
        s = s.replace(token, "")
    s = re.sub(r"\\[dtc](frac|binom)", r"\\\1", s.translate(_UNICODE))  # \cfrac, \dbinom; ½, x², 2√2, 3×4
    s = re.sub("[⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+", lambda m: "^{" + m[0].translate(_SUPERSCRIPT) + "}", s)  # 10⁴, x²
    s = re.sub(r"\\?%(?=.)", "", re.sub(r"\s*(?:\\?%|\bpercent(?:age)?|\bpct)\.?$", "%", s.strip()))  # one %, last
    s = _RELATIONS.sub(lambda m: {"<=": "≤", ">=": "≥", "!=": "≠", "\\lt": "<", "\\gt": ">"}.get(m[0])
                       or "≤≥≠"["lgn".index(m[0][1])], s)  # \le, \leq and <= are one relation
    s = _UNIT_TAIL.sub("", s.strip().rstrip(".").strip()).strip()  # "5 cm^2" -> "5"; "north", "5x" stay
    s = re.sub(r"(?<=\d)\s*(thousand|million|billion|dozen)s?$", lambda m: _SCALES[m[1].lower()], s)
    s = str(_WORDS.index(s.lower())) if s.lower() in _WORDS else s
    s = re.sub(r",{2,}", ",", re.sub(r"\s*(?:\\q?quad|;|\band\b|\bor\b)\s*", ",", s))  # "-2 or 3", "(1;2)": lists
    s = re.sub(r"^(-?\d+)\s+(\d+)/(\d+)$", r"\1\\frac{\2}{\3}", s)  # mixed number "1 4/5"
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # one grouping, no spaces: never "2, 345" or a tuple
        s = s.replace(",", "")
    if not re.fullmatch(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?", s):  # "1 000" is one number, "12 34" two
        s = re.sub(r"(?<!_)\b(\d+)\s+(?=\d)", r"\1,", s)  # (a subscript is no number: \log_2 8)
    s = re.sub(r"\s+", "", s)
    if re.match(r"[a-zA-Z]=", s) and not re.search(r"[a-zA-Z=]", re.sub(r"\\[a-z]+", "", s[2:])):
        s = s[2:]  # "x=5", "x=\sqrt{2}"; but "y=2x+3" stays an equation
    s = re.sub(r"^[a-zA-Z]\\(?:in|approx)|(?<=.)\\approx.*", "", s)  # x\in[1,2], x\approx5; 1/3\approx0.33 is 1/3
    s = re.sub(r"^\\?\{([^{}]*?)\\?\}$", r"\1", s)  # a set \{1,2,3\} is an unordered list
    s = re.sub(r"^(-?\d+\.\d+)e([-+]?\d+)$", r"\1\\times10^{\2}", s, flags=re.IGNORECASE)  # 1.5e3 (not 1e3)
    s = s.replace("\\pm", "+") + "," + s.replace("\\pm", "-") if s.count("\\pm") == 1 and "," not in s else s
    s = re.sub(r"\\log_(\w)", r"\\log_{\1}", s)  # \log_2 8 is log base 2 of 8; other subscripts are bases:
    s = re.sub(r"(?<!\\log)_\{(\w+)\}", r"_\1", s)  # 31_{6} is 31_6 (and never 31)
    s = re.sub(r"\\frac(\d)(?=[\d{])", r"\\frac{\1}", s)  # \frac12, \frac1{2}: a digit numerator ...
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # ... and a digit denominator: \frac{1}2
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)  # \sqrt2
    return s.lower()


# Values without a CAS: a small recursive-descent evaluator; exact Fractions while the answer stays rational.
_TOKEN = re.compile(r"\d+\\frac\{\d+\}\{\d+\}|\d*\.\d*\\overline\{\d+\}|"  # one number: 2\frac{1}{3}, 0.1\overline{6}
                    r"\\(?:frac|binom|sqrt|pi|cdot|times|div|sinh|cosh|tanh|sin|cos|tan|sec|csc|cot|log|ln|exp)|"
                    r"\d+\.?\d*|\.\d+|[a-z]|[-+*/^(){}\[\]!|_]")
_FUNCS = {"\\sin": cmath.sin, "\\cos": cmath.cos, "\\tan": cmath.tan, "\\sinh": cmath.sinh, "\\cosh": cmath.cosh,
          "\\tanh": cmath.tanh, "\\ln": cmath.log, "\\log": cmath.log10, "\\sec": lambda z: 1 / cmath.cos(z),
          "\\exp": cmath.exp, "\\csc": lambda z: 1 / cmath.sin(z), "\\cot": lambda z: 1 / cmath.tan(z)}
_CONSTANTS = {"e": cmath.e, "i": 1j, "\\pi": cmath.pi}


class _Evaluation:
    """The value of a normalised answer's tokens at `point` (variable -> Fraction), by recursive descent: a Fraction
    while every step is rational, else a complex number (pi, e, i, irrational roots, functions). ValueError on
    anything it does not know."""

    def __init__(self, toks, point):
        self.toks, self.at, self.point, self.depth = toks + [""], 0, {**_CONSTANTS, **point}, 0
        self.value = self.expr()
        if self.at != len(toks):
            raise ValueError("trailing tokens")

    def take(self, expected=None):
        tok = self.toks[self.at]
        if not tok or expected not in (None, tok):
            raise ValueError(tok)
        self.at += 1
        return tok

    def factor_next(self):  # a factor follows with no operator: 3\sqrt5, 2x, 3(m+2)
        tok = self.toks[self.at]
        return tok[:1].isalnum() or tok[:1] == "." or tok in ("(", "{", "\\frac", "\\sqrt", "\\pi") or tok in _FUNCS

    def expr(self, level=1):  # every recursion passes here, so this bounds the depth
        self.depth += 1
        if self.depth > 120:  # some 30 nested brackets: adversarial, not an answer
            raise ValueError("too deep")
        value = self.operators(level)
        self.depth -= 1
        return value

    def operators(self, level):  # level 1: + -; 2: * / and implicit products; 3: signs; 4: powers (right-associative)
        if level == 3 and self.toks[self.at] in ("-", "+"):
            return -self.expr(3) if self.take() == "-" else self.expr(3)
        value = self.atom() if level == 4 else self.expr(level + 1)
        while True:
            tok = self.toks[self.at]
            if level == 1 and tok in ("+", "-"):
                value = value + self.expr(2) if self.take() == "+" else value - self.expr(2)
            elif level == 2 and tok in ("*", "\\cdot", "\\times", "/", "\\div"):
                self.take()
                right = self.expr(3)
                if tok in ("/", "\\div") and self.factor_next():  # "1/2x": 1/(2x) or x/2? ambiguous, refuse
                    raise ValueError("1/2x")
                value = value / right if tok in ("/", "\\div") else value * right
            elif level == 2 and self.factor_next():
                value = value * self.expr(4)
            elif level == 4 and tok == "^":
                self.take()
                return self.power(value, self.expr(3))
            elif level == 4 and tok == "!":  # 5!
                self.take()
                value = Fraction(math.factorial(_integer(value)))
            else:
                return value

    def atom(self):
        tok = self.take()
        if tok in ("(", "{", "|"):
            value = self.expr()
            self.take({"(": ")", "{": "}"}.get(tok, "|"))
            return abs(value) if tok == "|" else value
        if tok[0].isdigit() or tok[0] == ".":
            if "\\frac" in tok:  # 2\frac{1}{3} is the mixed number 7/3
                whole, num, den = map(int, re.findall(r"\d+", tok))
                return whole + Fraction(num, den)
            if "\\overline" in tok:  # 0.1\overline{6} = (16 - 1) / 90
                whole, fix, rep = re.fullmatch(r"(\d*)\.(\d*)\\overline\{(\d+)\}", tok).groups()
                return Fraction(int(whole + fix + rep) - int(whole + fix or 0), (10 ** len(rep) - 1) * 10 ** len(fix))
            return Fraction(tok)
        if tok in self.point:  # a variable or a constant
            return self.point[tok]
        if tok == "\\frac":
            return self.atom() / self.atom()
        if tok == "\\binom":
            n, k = _integer(self.atom()), _integer(self.atom())
            return Fraction(math.comb(n, k))
        if tok == "\\sqrt":  # \sqrt{x}, \sqrt[3]{x}
            index = Fraction(2)
            if self.toks[self.at] == "[" and self.take():
                index = self.expr()
                self.take("]")
            return self.power(self.atom(), 1 / index)
        if tok not in _FUNCS:
            raise ValueError(tok)
        base = cmath.log10(self.atom()) if tok == "\\log" and self.toks[self.at] == "_" and self.take() else 1
        exponent = self.expr(3) if self.toks[self.at] == "^" and self.take() else 1  # \log_2 8, \sin^2 x, not \sin^{-1}
        if exponent.real < 1:
            raise ValueError("inverse function")
        if self.toks[self.at] in ("(", "{"):
            return self.power(_FUNCS[tok](self.atom()) / base, exponent)
        arg = self.expr(4)
        while self.toks[self.at] not in _FUNCS and self.factor_next():  # \sin 2x is sin(2x)
            arg = arg * self.expr(4)
        return self.power(_FUNCS[tok](arg) / base, exponent)

    def power(self, base, exponent):
        if abs(exponent) > 4096:
            raise ValueError("huge power")
        if isinstance(base, Fraction) and isinstance(exponent, Fraction):
            if exponent.denominator == 2 and base >= 0:  # \sqrt{9/4} stays exact
                root = Fraction(math.isqrt(base.numerator), math.isqrt(base.denominator))
                base, exponent = (root, exponent * 2) if root * root == base else (base, exponent)
            if exponent.denominator == 1:
                if abs(exponent) * max(base.numerator.bit_length(), base.denominator.bit_length()) > 65536:
                    raise ValueError("huge power")
                return base ** int(exponent)
        return complex(base) ** complex(exponent)


def _integer(value):  # n! and binomials of small non-negative integers only
    if not isinstance(value, Fraction) or value.denominator != 1 or not 0 <= value <= 1000:
        raise ValueError("not a small integer")
    return int(value)


@functools.lru_cache(maxsize=4096)
def _values(s):
    """(variables, values at seeded random points, the same points for the same variables) of a normalised answer,
    or None when it is text or not an expression this grader reads."""
    words = re.sub(r"\\[a-z]+", " ", s)  # words ("north"; "no" vs "on") are text, not products of variables
    if len(s) > MAX_ANSWER_CHARS or re.search(r"[a-z]{3}", words) or re.fullmatch(r"[a-z]{2,}", s):
        return None
    toks = _TOKEN.findall(s)
    if "".join(toks) != s:
        return None
    names = sorted({t for t in toks if t.isalpha() and t not in _CONSTANTS})
    rnd = random.Random(2024)
    points = [{v: Fraction(rnd.choice((-1, 1)) * rnd.randint(11, 97), rnd.randint(3, 13))
               for v in names + ["\\pi", "e"]} for _ in range(4 if names else 1)]  # both signs: \sqrt{x^2} is |x|
    try:  # pi and e also as unknowns: an exact check that \pi + 10^{-15} is not \pi, where floats cannot tell
        return (names, [_Evaluation(toks, {v: point[v] for v in names}).value for point in points],
                [_Evaluation(toks, point).value for point in points])
    except (ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):  # refused, or no value
        return None


def to_number(s):
    """Exact value of a normalised numeric answer (integer, decimal, a/b, \\frac{a}{b}, mixed 1\\frac{4}{5},
    1.5\\times10^{3}, 2^{10}, 0.\\overline{3}) or None (also for anything irrational, such as \\sqrt{2})."""
    values = _values(s)
    return values[1][0] if values and not values[0] and isinstance(values[1][0], Fraction) else None


def _matrix(s):
    """Rows of cells of a matrix or vector in any bracket environment (pmatrix, bmatrix, array...), or None."""
    m = re.fullmatch(r"[(\[]?\\begin\{([a-z]*matrix|array)\}(?:\{[a-z|]*\})?(.*)\\end\{\1\}[)\]]?", s)
    return [row.split("&") for row in m[2].split("\\\\") if row] if m else None


def _split_top(s):
    """Split on commas outside brackets and braces."""
    parts, depth = [""], 0
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append("")
        else:
            parts[-1] += ch
    return parts


def _strip_parens(s):
    """"(5)" -> "5"; but a tuple "(1,2)" and a product "(x+1)(x-1)" keep theirs."""
    depth = 0
    for ch in s[:-1]:
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return s
    return s[1:-1] if s[-1:] == ")" and len(_split_top(s[1:-1])) == 1 else s


def _atom_equal(a, b):
    """Equal as values: the same string, or both read as expressions in the same variables and equal at the same
    points: exactly when all values are rational (also with pi and e as unknowns), else as complex numbers within
    1e-13 relative."""
    if a == b:
        return True
    if a.endswith("%") or b.endswith("%"):  # a percent is its number, never a fraction: 25% is 25, not 0.25, and
        x, y = to_number(a.rstrip("%")), to_number(b.rstrip("%"))  # against a bare gold only a whole one (not 0.25)
        return x is not None and x == y and (b.endswith("%") or x.denominator == 1)
    va, vb = _values(a), _values(b)
    if va is None or vb is None or va[0] != vb[0]:
        return False
    if all(isinstance(v, Fraction) for v in va[1] + vb[1]):
        return va[1] == vb[1]  # plain numbers compare exactly: 1/2^98 is not 1/2^99
    if "." in a + b or (all(isinstance(v, Fraction) for v in va[2] + vb[2]) and va[2] != vb[2]):
        return False  # a decimal literal never equals an irrational: 3.14159265 is not \pi; nor \pi + 10^{-15}
    try:
        return all(cmath.isfinite(x) and cmath.isfinite(y) and abs(x - y) <= 1e-13 * max(abs(x), abs(y)) + 1e-15
                   for x, y in zip(va[1], vb[1]))
    except OverflowError:  # a huge rational against an irrational
        return False


def _interval(s):
    """An inequality in one name as the interval it describes: "-2≤x<7" -> "[-2,7)", "3≥x" -> "(-\\infty,3]"."""
    parts = re.split("([<>≤≥])", s)
    if set(parts[1::2]) <= {">", "≥"}:  # read right to left
        parts = [{">": "<", "≥": "≤"}.get(t, t) for t in reversed(parts)]
    if len(parts) == 3:
        parts = ["-\\infty", "<"] + parts if _LABEL.fullmatch(parts[0]) else parts + ["<", "\\infty"]
    if len(parts) != 5 or not set(parts[1::2]) <= {"<", "≤"} or not _LABEL.fullmatch(parts[2]):
        return s
    return "([("[parts[1] == "≤"] + parts[0] + "," + parts[4] + ")]"[parts[3] == "≤"]


def _equal(p, g):
    """One normalised answer element against the gold one: values, equations, matrices, intervals, tuples."""
    if not (p and g) or _atom_equal(p, g):
        return bool(p and g)
    if ("=" in p) != ("=" in g):  # "x=3+4=7" is its last member, unless "5x-7y+4=0"; a gold "(p,q)=(3,2)" its value
        return (not (p.endswith("=0") and re.search("[a-z]", p)) and _equal(p.rsplit("=", 1)[1], g) if "=" in p
                else bool(_LABEL.fullmatch(g.split("=")[0])) and _equal(p, g.rsplit("=", 1)[1]))
    if "=" in p:  # two equations: the same name and value, or the same equation up to a constant factor
        (lp, rp), (lg, rg) = p.split("=", 1), g.split("=", 1)
        if lp == lg and _LABEL.fullmatch(lp):  # "z = 3 + 3 = 6": the value of z is the last member
            return _equal(p.rsplit("=", 1)[1], g.rsplit("=", 1)[1])
        ratio = _values(f"({lp}-({rp}))/({lg}-({rg}))")  # constant and not 0 at points in the variables
        return bool(ratio and ratio[0] and ratio[1][0]) and all(abs(r / ratio[1][0] - 1) < 1e-12 for r in ratio[1])
    pm, gm = _matrix(p), _matrix(g)
    if pm or gm:  # matrices and vectors in any bracket environment: element by element, same shape
        return (bool(pm and gm) and [len(r) for r in pm] == [len(r) for r in gm]
                and all(_atom_equal(x, y) for pr, gr in zip(pm, gm) for x, y in zip(pr, gr)))
    p, g = _interval(p), _interval(g)
    if p[0] in "([{" and p[-1] in ")]}" and g[0] in "([{" and g[-1] in ")]}":  # tuples, intervals: same brackets
        ps, gs = _split_top(p[1:-1]), _split_top(g[1:-1])
        return ((p[0], p[-1]) == (g[0], g[-1]) and len(ps) > 1 and len(ps) == len(gs)
                and all(_equal(a, b) for a, b in zip(ps, gs)))
    return False


def answers_match(pred, gold):
    """Compare two answers after normalisation: strings, exact rationals, expressions, tuples/intervals,
    matrices, unordered lists, letters."""
    g = normalize_answer(_count_noun_dropped(gold))
    if re.fullmatch(r"[a-j]", g):  # a letter standing alone at the start: (B), [B], B), B., **B**, $C$, option C
        p = normalize_answer(pred)
        m = re.match(r"(?:option|choice)?(?:\(([a-j])\)|\[([a-j])\]|([a-j])(?:[.:)]|$))", p)
        return bool(m) and g in m.groups() and not re.search(r"[(\[][a-j][)\]]|(?<![a-z])[a-j][.:)\]]|^[a-j]$",
                                                              p[m.end():])  # a second label: a list of options
    p = _strip_parens(normalize_answer(_count_noun_dropped(pred)))
    ps, gs = _split_top(p), _split_top(_strip_parens(g))
    if len(ps) != len(gs):
        return False
    rest = list(gs)  # unordered lists, "2, 3" vs "3, 2": multisets
    for a in ps:
        hit = next((k for k, b in enumerate(rest) if _equal(a, b)), None)
        if hit is None:
            return False
        rest.pop(hit)
    return True


# ------------------------------------------------------------------------------------------------ data
HUB_CONFIGS = {"openai/gsm8k": "main"}  # training sets on the Hub with several configs
GPQA_INSTRUCTION = "\n\nAnswer with the letter of the correct option, A, B, C or D, as your final answer."


def gold_from_answer(answer):
    """GSM8K gold: the text after '####', thousands separators removed; other sets: the answer as given."""
    answer = str(answer)
    if "####" in answer:
        return answer.split("####")[-1].strip().replace(",", "")
    return answer.strip()


def _read_table(spec, split, config=None):
    """Rows of a local .jsonl/.json/.parquet file or a Hub dataset, as a list of dicts."""
    import datasets  # imported here: `--help` and the tests of the maths stay fast
    datasets.disable_progress_bars()
    if os.path.exists(spec):
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(os.path.splitext(spec)[1])
        if kind is None:
            raise UserError(f"{spec}: expected a .jsonl, .json or .parquet file")
        if os.path.isfile(spec) and not open(spec, "rb").read(4096).strip():
            raise UserError(f"{spec}: the file is empty (no rows)")
        try:
            return list(datasets.load_dataset(kind, data_files=spec, split="train"))
        except Exception as e:
            raise UserError(f"{spec}: could not be read as {kind} ({type(e).__name__}: {first_line(e)})")
    if spec.endswith((".jsonl", ".json", ".parquet")) or spec.startswith((".", "/")):
        raise UserError(f"{spec}: no such file")
    try:
        splits = datasets.load_dataset(spec, config)
    except Exception as e:
        raise UserError(f"could not load the Hub dataset {spec!r} ({first_line(e)}); check the name and your "
                        f"network, or pass a local .jsonl file")
    if split not in splits and len(splits) != 1:
        raise UserError(f"the Hub dataset {spec!r} has no {split!r} split (it has {', '.join(splits)})")
    return list(splits[split] if split in splits else next(iter(splits.values())))  # a lone split is the data


def gpqa_item(row):
    """A GPQA row as a lettered question. The four options are shuffled with a seed fixed per question (the
    same order on every run and machine); the gold is the letter of the correct one."""
    options = [row["Correct Answer"]] + [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)]
    order = list(range(4))
    random.Random(zlib.crc32(row["Question"].encode())).shuffle(order)
    text = row["Question"].strip() + "\n\n" + "\n".join(
        f"({'ABCD'[j]}) {str(options[o]).strip()}" for j, o in enumerate(order))
    return {"question": text + GPQA_INSTRUCTION, "gold": "ABCD"[order.index(0)]}


def to_problems(rows, name):
    """[{'question', 'gold'}] from GSM8K-style (question + '#### N'), MATH-style (problem + answer) or GPQA rows."""
    if not rows:
        raise UserError(f"{name}: no rows")
    keys = set(rows[0])
    if {"Question", "Correct Answer"} <= keys:
        return [gpqa_item(r) for r in rows]
    qkey = next((k for k in ("question", "problem") if k in keys), None)
    if qkey is None or "answer" not in keys:
        raise UserError(f"{name}: rows need 'question' or 'problem' plus 'answer' fields (or GPQA's 'Question', "
                        f"'Correct Answer', 'Incorrect Answer 1-3'); found {sorted(keys)}")
    # every row: a question, and a gold answer that can match: in a GSM8K-style file (worked solutions ending in
    # '#### N') the part after '####', elsewhere a short final answer
    text = lambda v: "" if v is None else str(v).strip()  # noqa: E731 (an integer answer 0 is "0", not missing)
    gsm8k = any("####" in text(r.get("answer")) for r in rows)
    ok = [r for r in rows if text(r.get(qkey)) and text(r.get("answer"))
          and ("####" in text(r["answer"]) if gsm8k else len(text(r["answer"])) <= MAX_ANSWER_CHARS)]
    if not ok:
        raise UserError(f"{name}: no row has a usable answer (GSM8K style: a solution ending in '#### N'; "
                        f"otherwise the final answer itself)")
    if len(ok) < len(rows):
        print(f"note: {name}: {len(rows) - len(ok)} of {len(rows)} rows skipped (no question, or no usable answer"
              f"{': GSM8K-style answers end in #### N' if gsm8k else ''})")
    return [{"question": r[qkey], "gold": gold_from_answer(r["answer"])} for r in ok]


def load_problems(spec, split="train"):
    """Problems from a local file or a Hub dataset (GSM8K main train by default)."""
    return to_problems(_read_table(spec, split, HUB_CONFIGS.get(spec)), spec)


def next_questions(problems, seed, cursor, k):
    """The k problems after position `cursor` in the endless stream that every epoch shuffles afresh (seeded, so
    `cursor` alone says where training is)."""
    n, orders = len(problems), {}
    for e in range(cursor // n, (cursor + k - 1) // n + 1):
        orders[e] = list(range(n))
        random.Random(seed * 100_003 + e).shuffle(orders[e])
    return [problems[orders[(cursor + j) // n][(cursor + j) % n]] for j in range(k)]


# ------------------------------------------------------------------------------------------------ models and tokenizers
def render_chat(tok, messages):
    """Token ids of `messages` in the model's own chat template, ready for the assistant to answer."""
    if getattr(tok, "chat_template", None) is None:  # base model: plain text turns, after the BOS its
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
        bos = tok("")["input_ids"][:1]  # tokenizer puts before any text (Llama, Gemma; none for Qwen, GPT-2)
        return (bos if bos == [tok.bos_token_id] else []) + tok(text, add_special_tokens=False)["input_ids"]
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates without a system role (e.g. Gemma): fold it into the first user turn
        if messages[0]["role"] != "system":
            raise
        first = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        text = tok.apply_chat_template([first] + messages[2:], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]  # the template already holds BOS where needed


def load_tokenizer(name):
    from transformers import AutoTokenizer
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "ckpt", "config.json")):
        raise UserError(f"{name} is a run folder: its model is {os.path.join(name, 'ckpt')} (or use --resume {name})")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        if os.path.isdir(name):
            raise UserError(f"could not load a tokenizer from the folder {name} ({first_line(e)}): is it a complete "
                            f"model folder (config.json, tokenizer files)?")
        raise UserError(f"could not load model {name!r}: not a local model folder and not reachable on the Hub "
                        f"({first_line(e)}); check the name, the path or your network")
    if tok.eos_token_id is None:
        raise UserError(f"{name}: the tokenizer has no EOS token, so finished responses cannot be recognised")
    if getattr(tok, "chat_template", None) is None:
        print(f"note: {name} has no chat template; prompts are plain 'User: ... Assistant:' turns")
    return tok


def load_model(name, args, trainable):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, args.dtype)).to(args.device)
    except Exception as e:  # missing or cut-short weights, a config the model class rejects...
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        raise UserError(f"could not load the model weights from {name} ({first_line(e)}); check that the folder "
                        f"holds the whole model (config.json and *.safetensors), or pass another --model")
    if not trainable:
        return model.eval().requires_grad_(False)
    # No dropout: the update runs in train mode (for gradient checkpointing), and the ratio p / p_old must be
    # 1 (up to numerics) before the first optimizer step. The saved config keeps its dropout values.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forwards; the samplers ask for a cache explicitly
    return model


def make_sampling(tok, model, max_new, temperature, fast, batch=None, prompt_len=None):
    """How `model` samples (Part I's Sampling). Stops, the ids that end a turn: the tokenizer's EOS plus any the
    model's generation config adds; pad id: the tokenizer's, or EOS where it has none (masks never compare with it)."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = sorted({tok.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])} - {None})
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Sampling(stops, pad_id, max_new, temperature, fast, batch, prompt_len)


# ------------------------------------------------------------------------------------------------ the teacher server
# --teacher http(s)://...: any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, Ollama, LM Studio)
# writes the replies, so no teacher weights sit on the student's device. Standard library only.
@dataclass(frozen=True)
class TeacherServer:
    url: str  # .../chat/completions
    model: str  # the request's model field
    max_tokens: int
    timeout: float  # seconds per request
    key: str = field(default=None, repr=False)  # from $TEACHER_API_KEY; never logged or saved


def is_url(name):
    return bool(name) and name.startswith(("http://", "https://"))


def http_json(url, body=None, key=None, timeout=10.0):
    """GET (body None) or POST JSON to url; the parsed JSON reply."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as reply:
        return json.loads(reply.read())


def connect_teacher(args):
    """The server of --teacher URL, checked before any model is loaded; its first listed model by default."""
    base = args.teacher.rstrip("/").removesuffix("/chat/completions")
    key = os.environ.get("TEACHER_API_KEY")
    try:
        models = http_json(base + "/models", key=key, timeout=min(30.0, args.teacher_timeout))
        listed = [m["id"] for m in models["data"]]
    except Exception as e:
        raise UserError(f"--teacher {args.teacher}: no OpenAI-compatible server answers at {base}/models "
                        f"({first_line(e)}); start it, or check the URL (it ends in /v1) and $TEACHER_API_KEY")
    if not (args.teacher_model or listed):
        raise UserError(f"--teacher {args.teacher} lists no model: name one with --teacher-model")
    return TeacherServer(base + "/chat/completions", args.teacher_model or listed[0], args.teacher_max_new_tokens,
                         args.teacher_timeout, key)


def ask_server(server, conversations, tries=3):
    """Every conversation at once (the server batches them), greedy. A request that fails or times out is tried
    again (after 1 s, 2 s); after `tries` failures its rollout stays unguided and the reason is recorded."""
    def one(messages):
        body = {"model": server.model, "messages": messages, "temperature": 0, "max_tokens": server.max_tokens}
        for attempt in range(tries):
            time.sleep(attempt)
            try:
                choice = http_json(server.url, body, server.key, server.timeout)["choices"][0]
                return str(choice["message"]["content"] or ""), choice.get("finish_reason") == "stop", ""
            except Exception as e:  # refused, HTTP error, timeout, a reply that is not the expected JSON
                error = f"{type(e).__name__}: {first_line(e)}"
        return "", False, f"teacher server failed {tries} times ({error})"
    with concurrent.futures.ThreadPoolExecutor(max(1, min(64, len(conversations)))) as pool:
        return list(tqdm(pool.map(one, conversations), total=len(conversations), desc="teacher", leave=False))


# ------------------------------------------------------------------------------------------------ the fast sampler
# A preallocated static KV cache per (model, shape) and a compiled one-token decode step replayed as a CUDA
# graph. Shapes are fixed per role (batch and cache length come from the flags and the data), so each role
# compiles once per run. Rows that finish keep decoding (it costs nothing: decode is bound by reading the
# weights) and the loop stops once every row has finished, checked every 16 steps to avoid syncs. On the GPU
# the cache's memory is handed back after every call, so that the update can use it: the next call allocates
# it again and the CUDA graph is re-recorded if its address moved (no recompilation).
_STATIC = {}


def left_pad(seqs, pad_id, device, width=None):
    """[B, P] ids and mask, prompts aligned to the right so that generation continues every row at column P."""
    width = max(width or 0, max(len(s) for s in seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids.to(device), mask.to(device)


def pick_tokens(logits, temperature):
    """Next tokens from [B, V] float32 logits: greedy when temperature is 0, else the same draw as HF generate."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial((logits / temperature).softmax(-1), 1).squeeze(1)


def decode_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention for one-token decoding with grouped KV heads. Given a padding mask (batched rollouts always
    have one), transformers' SDPA path on CUDA first copies the whole KV cache to every query head (repeat_kv),
    which multiplies the memory traffic of a decode step by the group size (6 for Qwen2.5-1.5B). Here the G
    query heads that share a KV head become G query rows of that head, so the cache is read once. Anything
    else (prefill, models without grouped heads) goes to transformers' own SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    B, H, _, D = query.shape
    q = query.view(B, H // groups, groups, D)  # [B, KVH, G, D]: query head h = kv head h // G, row h % G
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask,
                                         scale=kwargs.get("scaling"))  # [B, KVH, G, D]; mask [B, 1, 1, L]
    return out.reshape(B, 1, H, D), None  # [B, 1, H, D], the layout attention modules expect back


def _use_decode_attention(model):
    """Route `model`'s attention through decode_attention (same masks as SDPA) when it uses SDPA."""
    if model.config._attn_implementation != "sdpa":
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register("thinktuning_decode", decode_attention)
    AttentionMaskInterface.register("thinktuning_decode", sdpa_mask)
    model.set_attn_implementation("thinktuning_decode")


def _static_decoder(model, batch, length, compile_step=None):
    """The static cache and decode step of `model` for this shape, made on first use (compiled on GPUs)."""
    key = (id(model), batch, length)
    if key not in _STATIC:
        import inspect
        from transformers import StaticCache
        _use_decode_attention(model)
        cache = StaticCache(config=model.config, max_cache_len=length)
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.2x renamed it

        def step(tokens, positions, mask):  # [B, 1], [B, 1], [B, L] -> [B, V] float32
            return model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                         **{kw: cache}).logits[:, -1].float()

        compile_step = model.device.type == "cuda" if compile_step is None else compile_step
        if compile_step:  # a compilation per shape and model, a re-recording per call: lift the default limits
            tqdm.write(f"compiling the sampler for {batch} rows x {length} slots (about 30 s, once per shape)")
            cfg = torch._dynamo.config
            limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, limit, max(64, getattr(cfg, limit)))
            torch._inductor.config.triton.cudagraph_unexpected_rerecord_limit = 1 << 30
        _STATIC[key] = {"cache": cache, "kw": kw, "eager": step,
                        "step": torch.compile(step, mode="reduce-overhead", dynamic=False) if compile_step else step}
    return _STATIC[key]


def _release(cache):
    """Free the KV tensors of a static cache; its next use allocates them again (same shape, no recompile)."""
    for layer in cache.layers:
        layer.keys = layer.values = None
        layer.is_initialized = False
        layer.cumulative_length = torch.tensor(0, dtype=torch.long)


def _forget_decoders(model):
    """Drop the static caches and compiled decode steps of a model that will not sample again."""
    for key in [k for k in _STATIC if k[0] == id(model)]:
        del _STATIC[key]


def _decode(dec, token, positions, mask):
    """One compiled decode step, or the eager one for a model torch.compile cannot capture (said once)."""
    try:
        logits = dec["step"](token, positions, mask)
    except Exception as e:
        if dec["step"] is dec["eager"]:
            raise
        print(f"note: compiled decoding failed ({type(e).__name__}); decoding eagerly. --no-fast uses generate.")
        dec["step"] = dec["eager"]
        return dec["step"](token, positions, mask)
    return logits.clone() if dec["step"] is not dec["eager"] else logits  # a CUDA graph reuses its output


@torch.no_grad()
def generate_static(model, prompts, how, desc="sample"):
    """Same tokens as generate_plain for the same seed, over a static cache of how.batch rows x (how.prompt_len
    + how.max_new) slots. Extra rows (batch > len(prompts)) are padding and are dropped; a row that has
    finished writes the pad id after its stop token."""
    n, pad_id, max_new = len(prompts), how.pad_id, how.max_new
    batch = max(how.batch or n, n)
    ids, mask = left_pad(prompts + [prompts[0]] * (batch - n), pad_id, model.device, width=how.prompt_len)
    dec = _static_decoder(model, batch, ids.shape[1] + max_new)
    dec["cache"].reset()
    full_mask = torch.cat([mask, mask.new_ones(batch, max_new)], 1)  # [B, L]: fixed, so one compiled graph
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{dec["kw"]: dec["cache"]}).logits[:, -1].float()
    next_pos = mask.sum(-1, keepdim=True)  # [B, 1]: position of the first new token
    stop_t = torch.tensor(how.stops, device=model.device)
    out = torch.full((batch, max_new), pad_id, dtype=torch.long, device=model.device)
    done = torch.zeros(batch, dtype=torch.bool, device=model.device)
    for t in tqdm(range(max_new), desc=desc, leave=False):
        token = torch.full((batch,), pad_id, dtype=torch.long, device=model.device)
        token[:n] = pick_tokens(logits[:n], how.temperature)  # padding rows draw nothing (same RNG)
        token = torch.where(done, pad_id, token)
        out[:, t] = token
        done |= torch.isin(token, stop_t)
        if t == max_new - 1 or (t % 16 == 15 and bool(done[:n].all())):
            break
        logits = _decode(dec, token[:, None], next_pos + t, full_mask)
    if model.device.type == "cuda":
        _release(dec["cache"])
    return out[:n].tolist()


# ------------------------------------------------------------------------------------------------ small helpers
def right_pad(seqs, device, pad_id=0):
    """[N, L] ids of full sequences (prompt + response), padded at the end (any id: causal attention hides it)."""
    rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id).to(device)


def pad_rows(rows, width):
    """Stack 1-D tensors of different lengths into [n, width], zero-padded at the end."""
    return torch.stack([F.pad(r, (0, width - len(r))) for r in rows])


def by_length(rollouts):
    """Rollouts sorted by full sequence length, so that micro-batches pad little."""
    return sorted(rollouts, key=lambda r: len(r.prompt) + len(r.response))


def nanmean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def num(v):
    """A finite float, or None (null, NaN, text, bool: no value this step)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def read_json(path):
    """A JSON object from a file; {} when missing, unreadable or not an object."""
    try:
        obj = json.load(open(path, encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def read_jsonl(path):
    """The JSON objects of a jsonl file; [] when missing. A torn line (a run killed mid-write) is skipped."""
    rows = []
    for line in open(path, encoding="utf-8") if os.path.exists(path) else []:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict)]


def round_up(n, multiple=64):
    return -(-n // multiple) * multiple


def sync(device):
    """A timestamp after the device has finished its queued work (GPU work runs asynchronously)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ------------------------------------------------------------------------------------------------ optimizer
class MasterAdamW:
    """AdamW over fp32 master weights. At lr 1e-6 a step moves a weight by ~1e-6, far below bf16's resolution
    (~0.4% of the weight), so applied to bf16 weights every update would round to nothing. Float32 weights
    (CPU) are their own master weights."""

    def __init__(self, model, lr, weight_decay, fused=False):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=fused)
        self.separate = any(m is not p for m, p in zip(self.master, self.params))  # master weights are copies (bf16)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self, grad_clip, chunk=1 << 26):
        """Clip the gradient norm and step; a non-finite norm skips the step. Returns (norm, stepped).
        Gradients are converted to fp32 and applied ~64M elements at a time, so the fp32 gradients of the whole
        model never exist at once. A weight without a gradient (no row could move it) steps with a zero one."""
        grads = [p.grad for p in self.params]
        if WORLD > 1:  # several GPUs: every rank steps with the sum of all ranks' gradients (none: zeros)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
            for g in grads:
                torch.distributed.all_reduce(g)
        self.zero_grad()  # AdamW steps every weight holding a gradient, and a float32 weight is its own master
        present = [g for g in grads if g is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                     for g in present])) if present else torch.tensor(0.0)
        ok, scale = bool(torch.isfinite(norm)), (grad_clip / (norm + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_
        todo = list(zip(self.params, self.master, grads))
        del grads, present  # each chunk's gradients are freed once it has stepped
        while ok and todo:
            size, part = 0, []
            while todo and (not part or size + todo[0][0].numel() <= chunk):
                part.append(todo.pop(0))
                size += part[-1][0].numel()
            for p, m, g in part:  # only this chunk's weights hold a gradient while AdamW steps
                m.grad = g.float().mul_(scale) if g is not None else torch.zeros_like(m)
            self.opt.step()
            with torch.no_grad():
                for p, m, _ in part:
                    m.grad = None
                    if m is not p:
                        p.copy_(m)
        return float(norm), ok

    def state_dict(self):
        return {"optimizer": self.opt.state_dict(), "master": self.master if self.separate else None}

    def load_state_dict(self, saved):
        if [tuple(s["exp_avg"].shape) for s in saved["optimizer"]["state"].values()] != [m.shape for m in self.master]:
            raise UserError("the checkpoint's trainer_state.pt belongs to a model of another shape than its weights: "
                            "start a new run from the weights with --model CKPT --out ANOTHER")
        self.opt.load_state_dict(saved["optimizer"])
        if saved["master"] is not None and self.separate:
            with torch.no_grad():
                for m, s in zip(self.master, saved["master"]):
                    m.copy_(s)


# ------------------------------------------------------------------------------------------------ the start-up plan
def start_run(args):
    """Data, models, optimizer and (with --resume) the saved state; prints the plan. None: nothing left to do."""
    problems = load_problems(args.train_data)  # data errors end the run before any model is loaded
    eval_items = load_benchmark(args.eval_data, args.eval_every_limit) if args.eval_every else None
    ckpt, resuming = os.path.join(args.out, "ckpt"), args.resume is not None
    if not resuming and not looks_loadable(args.model):
        raise UserError(f"--model {args.model}: no such folder (a local model folder, or a Hub name like org/model)")
    on_rank_0(check_out_folder, args, ckpt, resuming)  # several GPUs: the others wait, and stop on its error
    local_teacher = None if args.no_teacher or is_url(args.teacher) else args.teacher or args.model
    for frozen in {local_teacher, args.model if args.kl_beta > 0 else None} - {None}:
        if resuming and not looks_loadable(frozen):
            raise UserError(f"the initial model {frozen} (teacher or KL reference) is not there any more: pass its "
                            f"new place with --model (or --teacher)")
    tok = load_tokenizer(ckpt if resuming else args.model)
    teacher_tok = load_tokenizer(args.teacher) if args.teacher and local_teacher else tok  # local teachers only
    problems, skipped, prompt_width = tokenize_prompts(problems, tok, args)
    saved = load_trainer_state(ckpt) if resuming else None
    first_step = saved["step"] + 1 if saved else 1
    if first_step > args.steps:
        print(f"{args.out} already holds {first_step - 1} steps; ask for more with --steps")
        return None
    if saved:
        print(f"resuming {args.out} from step {first_step} (checkpoint of step {saved['step']})")
    # the teacher: by default a frozen copy of the initial student (read from --model, also when resuming),
    # loaded (or its server checked) only if some step still to run is guided
    guided_ahead = not args.no_teacher and guidance_pct(first_step, args.schedule_steps) > 0
    server = connect_teacher(args) if guided_ahead and is_url(args.teacher) else None
    torch.manual_seed(args.seed + RANK)  # several GPUs: each rank samples its own tokens
    student = load_model(ckpt if resuming else args.model, args, trainable=True).eval()
    teacher = server or (load_model(local_teacher, args, trainable=False) if guided_ahead else None)
    ref = None
    if args.kl_beta > 0:  # the frozen initial model is also the default teacher: no extra memory then
        ref = teacher if teacher is not None and not args.teacher else load_model(args.model, args, trainable=False)
    n_roll = args.prompts_per_step // WORLD * args.group_size  # this rank's rollouts
    student_how = make_sampling(tok, student, args.max_new_tokens, args.temperature, args.fast, n_roll, prompt_width)
    teacher_how = (make_sampling(teacher_tok, teacher, args.teacher_max_new_tokens, 0.0, args.fast, teacher_rows(args),
                                 args.teacher_max_prompt_len) if teacher is not None and not server else None)
    run = Run(args, tok, student, teacher, teacher_tok, ref,
              MasterAdamW(student, args.lr, args.weight_decay, fused=args.device.startswith("cuda")),
              problems, student_how, teacher_how, random.Random(args.seed),
              {"step": 0, "cursor": 0}, eval_items)
    if saved:
        restore(run, saved)
    if RANK > 0:
        return run
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    with open(os.path.join(args.out, "args_history.jsonl"), "a") as f:  # every start of this run, resumes too
        f.write(json.dumps({"first_step": first_step, "argv": sys.argv[1:], **vars(args)}) + "\n")
    print_plan(run, skipped)
    return run


def check_out_folder(args, ckpt, resuming):
    """Training never overwrites a run: a folder that holds one asks for --resume or another folder. A save
    killed between its two renames left the previous checkpoint in ckpt.old: it is put back. Logs of a run that
    stopped before its first checkpoint are set aside (*.aborted), and the run starts again."""
    writable_folder(args.out)
    if not os.path.exists(ckpt) and os.path.exists(os.path.join(args.out, "ckpt.old", "trainer_state.pt")):
        os.rename(os.path.join(args.out, "ckpt.old"), ckpt)
        print(f"note: {args.out}: a save was interrupted; the previous checkpoint (ckpt.old) is back in place")
    if resuming and not os.path.exists(os.path.join(ckpt, "trainer_state.pt")):
        raise UserError(f"--resume {args.resume}: no checkpoint at {ckpt} (start it again without --resume)")
    if not resuming and os.path.exists(ckpt):
        raise UserError(f"{args.out} already holds a training run: continue it with --resume {args.out}, "
                        f"or choose another --out")
    for name in ("metrics.jsonl", "samples.jsonl") if not resuming else ():
        path = os.path.join(args.out, name)
        if os.path.exists(path):  # .aborted, .aborted.2, ...: an earlier aborted run's logs are kept too
            names = (f"{path}.aborted{f'.{i}' if i > 1 else ''}" for i in range(1, 10**6))
            kept = next(n for n in names if not os.path.exists(n))
            os.replace(path, kept)
            print(f"note: {path}: logs of a run that saved no checkpoint, kept as {os.path.basename(kept)}")


HELD = {}  # run folder -> its open lock file; main lets go of them when it returns


def writable_folder(out):
    """Make `out` (a folder) or say in one line why it cannot be written, before any model is loaded; then hold it:
    an exclusive lock on OUT/.lock keeps a second training, --eval or --report out. The system drops the lock when
    the process ends, so a crashed run leaves nothing stuck."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    key = os.path.realpath(out)
    if key in HELD:  # this process holds it already
        return
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a")
    except OSError as e:
        raise UserError(f"cannot write in {out} ({first_line(e)}): choose another --out (to resume or report a "
                        f"read-only run, copy its folder somewhere writable first)")
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise UserError(f"{out} is in use by another thinktuning.py process (training, --eval or --report): "
                            f"wait for it to end, or choose another --out")
    HELD[key] = lock


def looks_loadable(name):
    """Whether `name` can still be a model: an existing folder, or (not a path) a Hub name."""
    path_like = name.startswith((".", "/", "~")) or name.count("/") > 1
    return os.path.isdir(name) or not path_like


def load_trainer_state(ckpt):
    try:  # CPU first: RNG states must be CPU tensors; the optimizer moves its state to the parameters' device
        return torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False, map_location="cpu")
    except Exception as e:
        raise UserError(f"{ckpt}/trainer_state.pt cannot be read ({first_line(e)}): the checkpoint is damaged; "
                        f"start a new run from {ckpt} with --model {ckpt} --out ANOTHER")


def tokenize_prompts(problems, tok, args):
    """The student's prompts, tokenised once; questions whose prompt is too long are skipped. Returns the kept
    problems, how many were skipped and the student cache's fixed prompt width."""
    for p in problems:
        p["prompt"] = student_prompt(tok, p["question"])
    kept = [p for p in problems if len(p["prompt"]) <= args.max_prompt_len]
    if not kept:
        raise UserError(f"every prompt of {args.train_data} is longer than --max-prompt-len {args.max_prompt_len}")
    return kept, len(problems) - len(kept), round_up(max(len(p["prompt"]) for p in kept))


def restore(run, saved):
    """Optimizer, master weights, RNG states and the data position from a checkpoint."""
    run.optim.load_state_dict(saved)
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    if WORLD > 1:  # several GPUs: the saved state is rank 0's; each rank draws from a stream of its own
        torch.manual_seed(run.args.seed + RANK + WORLD * saved["step"])
    run.state = {k: saved[k] for k in ("step", "cursor", "py_rng")}
    run.rng.setstate(run.state["py_rng"])
    if RANK == 0:  # steps logged after the checkpoint are done again
        truncate_logs(run.args.out, run.state["step"])


def teacher_rows(args):
    """The most rollouts one step can send to the teacher on this rank (k <= max(1, floor(G * 0.1)) per group,
    since pct <= 0.1): the teacher sampler's fixed batch."""
    return args.prompts_per_step // WORLD * max(1, math.floor(args.group_size * 0.1))


def kv_cache_bytes(cfg, rows, length, itemsize):
    """Bytes of a KV cache of rows x length slots: K and V for every layer, KV head and head dimension."""
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * itemsize * rows * length


def mlp_width(cfg):
    return getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size  # GPT-2 style configs leave it unset


def forward_bytes(cfg, tokens, itemsize):
    """Transient memory of a forward pass without gradient over `tokens` tokens: about 4 h + 3 I values per token
    (one layer's hidden states, attention and MLP outputs; h the hidden size, I the MLP width)."""
    return (4 * cfg.hidden_size + 3 * mlp_width(cfg)) * itemsize * tokens


def activation_bytes(cfg, tokens, itemsize, checkpointed):
    """Activations a backward pass over `tokens` tokens needs: about 12 h + 3 I values per token and layer (fitted to
    a Qwen2.5-1.5B-shaped update on an H100, README). Gradient checkpointing keeps only each layer's input, plus one
    layer's activations while it is recomputed."""
    layer = 12 * cfg.hidden_size + 3 * mlp_width(cfg)
    kept = cfg.num_hidden_layers * cfg.hidden_size + layer if checkpointed else cfg.num_hidden_layers * layer
    return kept * itemsize * tokens


def memory_estimate(run):
    """Bytes of one step: (trained: weights, AdamW's moments and fp32 master weights, also the checkpoint's size;
    frozen: teacher and KL reference; {phase: what comes and goes}). The peak is trained + frozen + the largest
    phase: each KV cache lives only while its model samples, gradients and activations only in the update.
    Sampling takes the shapes of the samplers (run.student_how, run.teacher_how: rows, prompt and new slots)."""
    args, cfg, how = run.args, run.student.config, run.student_how
    size, width = run.student.dtype.itemsize, how.prompt_len + how.max_new
    n_params, rows = sum(p.numel() for p in run.optim.params), min(args.micro_batch, how.batch // args.minibatches)
    frozen_models = {id(m): m for m in (run.teacher, run.ref) if isinstance(m, torch.nn.Module)}  # ref may be teacher
    frozen = sum(p.numel() * p.element_size() for m in frozen_models.values() for p in m.parameters())
    phases = {f"{role} sampling": kv_cache_bytes(m.config, h.batch, h.prompt_len + h.max_new, m.dtype.itemsize)
              + forward_bytes(m.config, h.batch * h.prompt_len, m.dtype.itemsize)  # + the prefill of every prompt
              for role, m, h in (("student", run.student, how), ("teacher", run.teacher, run.teacher_how)) if h}
    phases.update({"old log-probs": forward_bytes(cfg, min(how.batch, 4 * args.micro_batch) * width, size),
                   "update": n_params * size + activation_bytes(cfg, rows * width, size, args.grad_ckpt)})
    return n_params * (size + 8 + 4 * run.optim.separate), frozen, phases


def print_plan(run, skipped):
    """What a step does and what it costs: rollouts and tokens per step, a memory estimate, checkpoint size."""
    args, how, n_roll = run.args, run.student_how, run.student_how.batch * WORLD
    n_params = sum(p.numel() for p in run.optim.params)
    method = "ThinkTuning" if run.teacher is not None else "ThinkTuning (guidance over)"
    print(f"{'vanilla GRPO' if args.no_teacher else method}: {len(run.problems)} questions"
          f"{f' ({skipped} with prompts over --max-prompt-len skipped)' if skipped else ''}, "
          f"{args.prompts_per_step} x {args.group_size} = {n_roll} rollouts per step, up to "
          f"{n_roll * (how.prompt_len + how.max_new):,} tokens per step, "
          f"{args.minibatches} optimizer steps of {n_roll // args.minibatches} rollouts"
          + (f"; {WORLD} processes, {n_roll // WORLD} rollouts each (memory below: per process)" if WORLD > 1 else ""))
    trained, frozen, phases = memory_estimate(run)
    peak = trained + frozen + max(phases.values())
    masters = ", fp32 master weights" if run.optim.separate else ""
    if isinstance(run.teacher, TeacherServer):
        print(f"teacher: {run.teacher.model} at {run.teacher.url} (no teacher weights on {args.device})")
    print(f"student {n_params / 1e6:.0f}M parameters, {args.dtype} on {args.device}; memory estimate: "
          f"{fmt_bytes(trained + frozen)} always (weights{masters}, AdamW state, {fmt_bytes(frozen)} frozen "
          f"teacher/reference), plus the largest of " + ", ".join(f"{fmt_bytes(b)} {k}" for k, b in phases.items())
          + f" (gradient checkpointing {'on' if args.grad_ckpt else 'off'}): about {fmt_bytes(peak)} at the peak")
    free = shutil.disk_usage(args.out).free
    print(f"checkpoints: about {fmt_bytes(trained)} each (model, AdamW state{masters}; a save writes the new "
          f"one before deleting the old), {fmt_bytes(free)} free in {args.out}")
    if free < trained and not args.ignore_disk:
        raise UserError(f"{fmt_bytes(free)} free in {args.out}, a checkpoint needs {fmt_bytes(trained)}: free some "
                        f"space, choose another --out, or start anyway with --ignore-disk")
    if args.device.startswith("cuda"):
        total, what = torch.cuda.get_device_properties(torch.device(args.device)).total_memory, "this GPU's"
    else:  # the CPU: the machine's memory
        total, what = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"
    if peak > 0.95 * total:
        print(f"note: that is more than {what} {fmt_bytes(total)} can hold; lower --prompts-per-step or "
              f"--max-new-tokens (or --teacher-max-prompt-len)")


def fmt_bytes(n_bytes):
    """Bytes for a person: '1.6 GB', '301 MB', '12 kB'."""
    for unit, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n_bytes >= unit:
            return f"{n_bytes / unit:.{1 if unit == 1e9 else 0}f} {name}"
    return f"{n_bytes:.0f} bytes"


# ------------------------------------------------------------------------------------------------ logs
REFLECTIVE = re.compile(r"\b(?:wait|let me check|let me verify|verify|double-check|double check|re-check)\b",
                        re.IGNORECASE)


def step_metrics(run, step, rollouts, record):
    """One line of metrics.jsonl (README, "Reading the metrics")."""
    args, replies = run.args, record["replies"]
    whys = [rep["why"] for rep in replies if rep["why"]]
    guided = [r for r in rollouts if r.guided]
    teach = [w for r in guided if r.adv != 0 and r.old_logp is not None  # the teacher's tokens alone, stop token too
             for w, u in zip(*[t.tolist() for t in aas_weights(r, True)[1:]]) if u]
    own = [(r, text) for r, text in zip(rollouts, record["texts"]) if not r.guided]
    spread = torch.tensor([r.reward for r in rollouts]).view(-1, args.group_size).std(1)  # [B]
    row = {"step": step, "reward": sum(r.reward for r in rollouts) / len(rollouts),
           "reward_guided": nanmean([r.reward for r in guided]),
           "reward_unguided": nanmean([r.reward for r, _ in own]),
           "zero_spread_groups": (spread == 0).float().mean().item(),
           "guidance_pct": record["pct"], "n_selected": len(record["chosen"]), "teacher_asked": len(replies),
           "n_guided": len(guided),
           "teacher_format_pass": nanmean([float(rep["passed"]) for rep in replies]),
           "teacher_why": {w: whys.count(w) for w in sorted(set(whys))},  # failed replies by reason
           "response_len": sum(len(r.response) for r in rollouts) / len(rollouts),
           "finished_frac": sum(r.finished for r in rollouts) / len(rollouts),
           "reflect_rate": nanmean([float(bool(REFLECTIVE.search(text))) for _, text in own]),
           "aas_weight_teacher": nanmean(teach),
           **record["update"], **dict(zip(("t_student", "t_teacher", "t_logprob", "t_update"), record["seconds"]))}
    if args.eval_every and step % args.eval_every == 0:  # held-out accuracy, in the sampler's shape
        held_out, _ = evaluate(run.student, run.tok, run.eval_items, run.student_how)  # greedy: k = 1
        row.update(eval_accuracy=held_out["accuracy"], eval_truncated_pct=held_out["truncated_pct"])
    if args.device.startswith("cuda"):  # this step's high-water mark, to compare with the estimate
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(args.device) / 1e9
        torch.cuda.reset_peak_memory_stats(args.device)
    return row


def aas_weights(r, teacher_tokens_only):
    """A guided rollout's p, AAS weight p / d (exactly 1 where A = 0) and the tokens AAS shapes (the routing of
    policy_loss), token by token at its old log-probs: [T] each."""
    A = torch.full((len(r.response),), r.adv)  # [T]
    p = r.old_logp.cpu().exp() if r.old_logp is not None else torch.ones(len(r.response))  # [T]
    return p, p / aas_d(p, A), guided_mask(r, teacher_tokens_only).bool() & ~((A < 0) & (p < 0.01))


def sample_record(run, step, r):
    """A rollout for samples.jsonl; a guided one also token by token, with p and its AAS weight p / d."""
    rec = {"step": step, "question": r.question, "gold": r.gold, "reward": r.reward, "adv": r.adv,
           "finished": r.finished, "guided": r.guided,
           "student": run.tok.decode(r.response[:r.n_student], skip_special_tokens=True).rstrip("\ufffd"),
           "teacher": r.teacher_text}
    if r.guided:
        p, weight, use = aas_weights(r, run.args.guide_teacher_tokens_only)
        rec.update(tokens=[run.tok.decode([i]) for i in r.response], n_student=r.n_student,
                   p=[float(f"{x:.4g}") for x in p.tolist()] if r.old_logp is not None else None,
                   weight=[float(f"{w:.4g}") if u else None for w, u in zip(weight.tolist(), use.tolist())])
    return rec


def log_step(run, step, rollouts, record):
    """Append the step's metrics, a few rollouts (guided first) and every teacher reply; returns the metrics.
    Several GPUs: every rank computes them for the whole step, rank 0 writes them."""
    rollouts, record = gather_step(rollouts, record)
    row = step_metrics(run, step, rollouts, record)
    if RANK > 0:
        return row
    if row["reward"] == 0 and "no signal" not in run.said:
        run.said.add("no signal")
        tqdm.write(f"note: step {step}: every rollout earned 0, so every advantage is 0 and the step learns nothing "
                   f"(a task too hard for the model, or answers cut by --max-new-tokens; a lower --temperature helps)")
    with open(os.path.join(run.args.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({k: None if v != v else v for k, v in row.items()}) + "\n")  # NaN -> null
    shown = sorted(rollouts, key=lambda r: not r.guided)[:run.args.log_samples]  # guided first, in step order
    entries = [sample_record(run, step, r) for r in shown] + [{"step": step, **rep} for rep in record["replies"]]
    with open(os.path.join(run.args.out, "samples.jsonl"), "a") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    return row


def release_teacher(run, step):
    print(f"guidance is over after step {step}: plain GRPO from here on, teacher memory freed")
    _forget_decoders(run.teacher)  # nothing to forget for a server
    run.teacher = None  # the last reference, unless the KL reference shares the weights
    torch.cuda.empty_cache()  # a no-op where CUDA was never initialised


# ------------------------------------------------------------------------------------------------ checkpoints, Ctrl-C
@contextlib.contextmanager
def ctrl_c_saves():
    """Yields a list that becomes non-empty on Ctrl-C: the loop finishes its step and saves. A second Ctrl-C
    quits at once. (torchrun's ranks run in sessions of their own: only the launcher gets a terminal's Ctrl-C, and
    it passes one on to every rank.)"""
    requested, previous = [], signal.getsignal(signal.SIGINT)

    def on_ctrl_c(*_):
        requested.append(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: finishing this step, then saving (press Ctrl-C again to quit without saving)")

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def trainer_state(run):
    """What a resume needs beyond the model: optimizer, master weights, RNG states, step and data position."""
    return {**run.state, **run.optim.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(out, model, tok, state):
    """Write OUT/ckpt via a temporary folder and a rename: an interrupted save never destroys the last one."""
    final, tmp, old = (os.path.join(out, name) for name in ("ckpt", "ckpt.tmp", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    except Exception as e:  # a full disk, say (torch and safetensors raise their own errors, not OSError)
        shutil.rmtree(tmp, ignore_errors=True)  # the last checkpoint stays: the folder can be resumed from it
        how = (f"the previous checkpoint is intact: free some space and continue with --resume {out}"
               if os.path.exists(final) else "no checkpoint was written yet: free some space and start again")
        raise UserError(f"could not save a checkpoint in {out} ({first_line(e)}); {how}")
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def truncate_logs(out, step):
    """Drop the lines of metrics.jsonl and samples.jsonl logged after `step` (a resume does them again)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            rows = read_jsonl(path)
            if sum(1 for line in open(path) if line.strip()) > len(rows):
                print(f"note: {path}: a line cut short (a crash mid-write) is dropped")
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step)


def given_flags(parser, argv):
    """The dests of the flags written on this command line."""
    return {a.dest for a in parser._actions for tok in argv if tok.split("=")[0] in a.option_strings}


def check_modes(given):
    """Refuse flags that another mode would silently ignore."""
    if {"eval", "compare"} <= given:
        raise UserError("--eval evaluates and --compare only reads eval.json files: run them one after the other")
    extra = given - {"report", "compare"} if "report" in given else given - {"compare"} if "compare" in given else ()
    if extra:
        mode = "--report draws a page from a run folder" if "report" in given else "--compare reads eval.json files"
        raise UserError(f"{mode}; it ignores --{', --'.join(sorted(f.replace('_', '-') for f in extra))}: drop them")


def resume_args(parser, argv):
    """--resume OUT: the saved settings of that run, overridden by the flags given on this command line."""
    args = parser.parse_args(argv)
    path = os.path.join(args.resume, "args.json")
    if not os.path.exists(path):
        raise UserError(f"--resume {args.resume}: no args.json there (is it the --out folder of a run?)")
    given = given_flags(parser, argv)
    saved = json.load(open(path))
    if "model" in given and saved.get("model") not in (None, args.model) and looks_loadable(saved["model"]):
        raise UserError(f"--resume {args.resume} was trained from {saved['model']}, which is its teacher and KL "
                        f"reference; --model {args.model} would swap them: drop --model (pass it only when "
                        f"{saved['model']} has moved)")
    merged = {**saved, **{k: v for k, v in vars(args).items() if k in given}}
    if "out" in given and os.path.normpath(args.out) != os.path.normpath(args.resume):
        raise UserError(f"--resume {args.resume} continues in that folder; --out {args.out} cannot move it "
                        f"(copy the folder, then --resume the copy)")
    merged["out"], merged["resume"] = args.resume, args.resume
    if "device" in given and "dtype" not in given:  # the saved dtype was chosen for the saved device
        merged["dtype"] = "auto"
    return argparse.Namespace(**{**vars(args), **merged})


# ------------------------------------------------------------------------------------------------ several GPUs
# `torchrun --nproc_per_node N thinktuning.py ...` starts N processes (ranks), with RANK and WORLD_SIZE set. Rank r
# samples the r-th of N equal shares of each step's questions (whole groups: rewards and advantages stay on their
# rank) and the update stays the one-process method: every rank draws the same guidance choice and mini-batch order
# from the whole step (run.rng is the same on every rank), each mini-batch's token mean counts every rank's tokens,
# and MasterAdamW sums the ranks' gradients before the clip, so all ranks take the identical step. Rank 0 writes
# every file. Plain `python thinktuning.py` is rank 0 of 1: no process group, and each function returns its input.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def start_ranks(args):
    """Join torchrun's process group: NCCL with one GPU per local rank, gloo on the CPU. Ranks above 0 print
    nothing but their errors."""
    if WORLD == 1:
        return
    if args.eval or args.report or args.compare is not None:
        raise UserError("under torchrun only training runs: start --eval, --report and --compare with python")
    if args.prompts_per_step % WORLD:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} is not a multiple of the {WORLD} processes: "
                        f"each takes an equal share of every step's questions (use {WORLD * 4}, say)")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                                         timeout=datetime.timedelta(hours=1))  # while rank 0 saves a checkpoint
    if RANK:  # no output, no progress bars
        sys.stdout, tqdm.__init__ = open(os.devnull, "w"), functools.partialmethod(tqdm.__init__, disable=True)


def on_rank_0(check, *args):
    """check(*args) on rank 0 alone, the others waiting for it; its UserError stops every rank, one line each."""
    error = None
    if RANK == 0:
        try:
            check(*args)
        except UserError as e:
            error = str(e)
    error = everyone([error])[0]
    if error:
        raise UserError(error)


def share(items):
    """This rank's part of a step-wide list: the RANK-th of WORLD equal contiguous parts."""
    n = len(items) // WORLD
    return items[RANK * n:(RANK + 1) * n]


def mine(indices, n):
    """The step-wide row indices that are this rank's, as indices into its own n rows (rank r holds r n ...)."""
    return [i - RANK * n for i in indices if i // n == RANK]


def everyone(items):
    """Every rank's list, joined in rank order (all_gather_object: any picklable items)."""
    if WORLD == 1:
        return items
    parts = [None] * WORLD
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def gather_step(rollouts, record):
    """The whole step's rollouts (log-probs moved to the CPU), texts and teacher replies, for its metrics."""
    if WORLD == 1:
        return rollouts, record
    off = RANK * len(rollouts)  # this rank's first row in the step
    ours = ([replace(r, old_logp=None if r.old_logp is None else r.old_logp.cpu(), ref_logp=None) for r in rollouts],
             record["texts"], [{**rep, "rollout": rep["rollout"] + off} for rep in record["replies"]],
             [i + off for i in record["chosen"]])
    parts = everyone([ours])  # one gather per step: (rollouts, texts, replies, chosen) of each rank
    rows, texts, replies, chosen = ([x for part in parts for x in part[k]] for k in range(4))
    return rows, {**record, "texts": texts, "replies": replies, "chosen": chosen}


# ------------------------------------------------------------------------------------------------ evaluation
# name -> (Hub dataset, split, config). A path to a local file with the same fields works in place of a name.
BENCHMARKS = {"gsm8k": ("openai/gsm8k", "test", "main"),
              "math500": ("HuggingFaceH4/MATH-500", "test", None),
              "aime24": ("HuggingFaceH4/aime_2024", "train", None),
              "aime25": ("math-ai/aime25", "test", None),
              "gpqa": ("Idavidrein/gpqa", "train", "gpqa_diamond")}
# The paper's Table 1 (Llama-3.2-3B-Instruct, greedy pass@1, %): vanilla GRPO / ThinkTuning.
PAPER = {"math500": ("45.46", "47.54"), "gpqa": ("24.19", "28.18")}


def load_benchmark(name, limit=None):
    """[{'question', 'gold'}] for a benchmark name, a Hub dataset or a local file with the same fields."""
    if name not in BENCHMARKS and "/" not in name and not name.endswith((".jsonl", ".json", ".parquet")):
        raise UserError(f"unknown benchmark {name!r}: use {', '.join(BENCHMARKS)}, a Hub dataset or a local file")
    try:
        # a Hub dataset named here is read from its test split (from its only split when it has one)
        items = (to_problems(_read_table(*BENCHMARKS[name]), name) if name in BENCHMARKS
                 else load_problems(name, split="test"))
    except UserError:
        if name == "gpqa":
            raise UserError("could not load GPQA-Diamond from the Hub: it is gated (accept its terms on the page of "
                            "Idavidrein/gpqa and run `hf auth login`) and needs the network; or pass a local file")
        raise
    return items[:limit] if limit else items


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, tok, items, how, k=1, desc="eval"):
    """Generate k samples per item (greedy when k = 1), grade, and return (summary, predictions). how.batch
    is the rows of one generate call (questions x k); the prompt width is the benchmark's longest prompt."""
    prompts = [student_prompt(tok, it["question"]) for it in items]
    order = sorted(range(len(items)), key=lambda i: (len(prompts[i]), i))  # similar lengths share a batch
    how = replace(how, temperature=how.temperature if k > 1 else 0.0,
                  prompt_len=round_up(max(len(p) for p in prompts)))  # one static shape for the whole benchmark
    preds, per_call = [], max(1, how.batch // k)
    for b in tqdm(range(0, len(order), per_call), desc=desc, leave=False):
        idx = [i for i in order[b:b + per_call] for _ in range(k)]
        responses, finished = generate(model, [prompts[i] for i in idx], how, desc="tokens")
        for j, (i, r, f) in enumerate(zip(idx, responses, finished)):
            text = tok.decode(r, skip_special_tokens=True).rstrip("\ufffd")  # a cut may end inside a character
            preds.append({"index": i, "sample": j % k, "question": items[i]["question"], "gold": items[i]["gold"],
                          "response": text, "extracted": extract_answer(text),
                          "correct": bool(f and grade(text, items[i]["gold"])), "finished": f, "length": len(r)})
    preds.sort(key=lambda p: (p["index"], p["sample"]))
    correct = [sum(p["correct"] for p in preds[i * k:(i + 1) * k]) for i in range(len(items))]  # per question
    summary = {"n": len(items), "samples": k, "accuracy": 100 * sum(c / k for c in correct) / len(items),
               "mean_length": sum(p["length"] for p in preds) / len(preds),
               "truncated_pct": 100 * sum(not p["finished"] for p in preds) / len(preds),
               "reflective_pct": 100 * sum(bool(REFLECTIVE.search(p["response"])) for p in preds) / len(preds)}
    if k > 1:
        summary[f"pass@{k}"] = 100 * sum(pass_at_k(k, c, k) for c in correct) / len(items)
    return summary, preds


EVAL_HEAD = ("benchmark|n|samples|accuracy % [95% CI]|pass@k %|mean length|truncated %|reflective %|paper GRPO|"
             "paper ThinkTuning")


def eval_rows(results):
    """Per benchmark: n, samples, accuracy with its interval, pass@k, length, truncation, the share of answers with a
    reflection (REFLECTIVE: "wait", "let me check", "verify"...), the paper's Table 1."""
    return [[b, r.get("n", "-"), r.get("samples", "-"), acc_cell(r),
             ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.startswith("pass@") and num(v) is not None) or "-",
             f"{num(r.get('mean_length')) or 0:.0f}", f"{num(r.get('truncated_pct')) or 0:.1f}",
             "-" if num(r.get("reflective_pct")) is None else f"{r['reflective_pct']:.1f}", *PAPER.get(b, ("-", "-"))]
            for b, r in results.items()]


def markdown(head, rows):
    """A markdown table: head is 'col|col|...', rows are lists of cells."""
    cols = head.split("|")
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def eval_labels(names):
    """name -> its row label: a benchmark's name; a local file's base name, or the benchmark it is named after
    (gsm8k_test.jsonl -> gsm8k, so that it lines up with the paper's rows), or its path when that label is taken.
    Benchmarks are labelled first, so a file never takes the label of a benchmark evaluated beside it."""
    labels = {}
    for name in sorted(dict.fromkeys(names), key=lambda n: n not in BENCHMARKS):
        base = os.path.splitext(os.path.basename(name))[0]
        label = name if name in BENCHMARKS else next((b for b in BENCHMARKS if base.lower().startswith(b)), base)
        labels[name] = name if label in labels.values() else label
    return {name: labels[name] for name in dict.fromkeys(names)}


def run_eval(args):
    """--eval: every benchmark is checked, then the model loaded (a run folder given by --resume: its checkpoint)."""
    if args.resume:  # evaluating a run folder means evaluating what it trained
        args.model = os.path.join(args.resume, "ckpt")
        if not os.path.exists(os.path.join(args.model, "config.json")):
            raise UserError(f"--resume {args.resume} --eval: no checkpoint at {args.model} to evaluate")
    labels = eval_labels([n.strip() for n in args.eval.split(",") if n.strip()])
    sets = {label: load_benchmark(name, args.eval_limit) for name, label in labels.items()}
    writable_folder(args.out)
    json_path, samples_path = os.path.join(args.out, "eval.json"), os.path.join(args.out, "eval_samples.jsonl")
    model_id = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    kept = read_json(json_path).get("results") or {}  # earlier results of this model for other benchmarks stay
    others = {r.get("model") for r in kept.values()} - {model_id}
    if others:  # one model per folder: results of two models side by side would be read as one run's
        raise UserError(f"{json_path} holds results of {', '.join(map(str, others))}: evaluate {model_id} into "
                        f"another --out (without --out: runs/eval-MODEL)")
    tok = load_tokenizer(args.model)
    model = load_model(args.model, args, trainable=False)
    how = make_sampling(tok, model, args.eval_max_new_tokens or args.max_new_tokens, args.eval_temperature, args.fast,
                        batch=args.eval_batch_size * args.eval_samples)
    made = {"model": model_id, "samples": args.eval_samples,  # also in each result: a folder may hold several calls
            "temperature": args.eval_temperature if args.eval_samples > 1 else 0.0, "max_new_tokens": how.max_new,
            "limit": args.eval_limit}
    results, all_preds = {}, [p for p in read_jsonl(samples_path) if p.get("benchmark") not in labels.values()]
    for (name, label), items in zip(labels.items(), sets.values()):
        results[label], preds = evaluate(model, tok, items, how, args.eval_samples, desc=label)
        all_preds += [{"benchmark": label, **p} for p in preds]
        content = json.dumps([[it["question"], it["gold"]] for it in items]).encode()  # what --compare pairs on
        results[label].update(data=os.path.abspath(name) if os.path.exists(name) else name,
                              data_sha256=hashlib.sha256(content).hexdigest()[:16], **made)
    with open(json_path, "w") as f:
        json.dump({**made, "results": {**kept, **results}}, f, indent=1)
    with open(samples_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in all_preds)
    print(markdown(EVAL_HEAD, eval_rows(results)))
    print(f"wrote {write_report(args.out)}")


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval (lo, hi) for k successes in n trials; stays inside [0, 1] even at k = 0 or n."""
    if n <= 0:
        return 0.0, 1.0
    p, zz = k / n, z * z
    centre, half = (p + zz / (2 * n)) / (1 + zz / n), z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)) / (1 + zz / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p: under no difference each discordant pair goes either way with chance 1/2."""
    return min(1.0, 2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c))


def paired_test(samples_a, samples_b, benchmark):
    """(n_paired, b, c, p) on one benchmark's first answer per question (sample 0: the greedy one with the default
    --eval-samples 1) of two runs, paired by question index; b = A right and B wrong, c = A wrong and B right."""
    def first(rows): return {r.get("index"): bool(r.get("correct")) for r in rows
                             if r.get("benchmark") == benchmark and r.get("sample", 0) == 0}
    a, bb = first(samples_a), first(samples_b)
    both = a.keys() & bb.keys()
    b, c = sum(a[i] and not bb[i] for i in both), sum(bb[i] and not a[i] for i in both)
    return len(both), b, c, mcnemar_exact(b, c)


def acc_cell(r):
    """'47.5 [43.1, 51.9]': accuracy % and its 95% Wilson interval. Trials = the n questions, not n * samples:
    the samples of one question are not independent, so counting them all would make the interval too narrow."""
    n, acc = num(r.get("n")) or 0, num(r.get("accuracy"))
    lo, hi = wilson_interval((acc or 0) / 100 * n, n)
    return "-" if acc is None else f"{acc:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def read_runs(folders, strict=True):
    """name -> (results, eval_samples rows) per run folder. A folder without an eval.json written by
    --eval is an error when strict (--compare), a run without results otherwise (the report page)."""
    folders = list(dict.fromkeys(os.path.normpath(f) for f in folders))
    names = [os.path.basename(f) for f in folders]
    names = names if len(set(names)) == len(names) else folders  # x/run and run: one column each
    runs = {}
    for folder, name in zip(folders, names):
        results = read_json(os.path.join(folder, "eval.json")).get("results")
        if not isinstance(results, dict) or not all(isinstance(r, dict) and num(r.get("accuracy")) is not None
                                                    for r in results.values()):
            if strict:
                raise UserError(f"{os.path.join(folder, 'eval.json')}: missing, or not an eval.json written by --eval "
                                f"(run --eval with --out {folder} first)")
            results = {}
        runs[name] = (results, read_jsonl(os.path.join(folder, "eval_samples.jsonl")))
    return runs


def compare_table(folders, strict=True):
    """(head, rows) for --compare and the report: per benchmark and run (its OUT/eval.json) the accuracy with its 95%
    Wilson interval, and McNemar's exact test of its first answers against the first run's on the same questions;
    then the paper's numbers."""
    runs = list(read_runs(folders, strict).items())
    (first, (base, base_preds)), rows = runs[0], []
    for b in dict.fromkeys(b for _, (res, _) in runs for b in res):
        for i, (name, (res, preds)) in enumerate(runs):
            both = i and b in res and b in base  # paired only on the same questions and golds (their hash; files
            same = both and base[b].get("data_sha256") == res[b].get("data_sha256")  # older than it: taken as equal)
            n, x, y, p = paired_test(base_preds, preds, b) if same else (0, 0, 0, 1)
            cmp = [n, x, y, f"{p:.3g}"] if n else ["other data" if both and not same else "-", "-", "-", "-"]
            cells = [res[b].get("n", "-"), acc_cell(res[b])] if b in res else ["-", "-"]
            rows.append([b, name, *cells, *cmp])
        paper = zip(("paper GRPO", "paper ThinkTuning"), PAPER.get(b, ()))
        rows += [[b, who, "full", value, "-", "-", "-", "-"] for who, value in paper]
    return (f"benchmark|run|n|accuracy % [95% CI]|paired n|right only in {first}|right only in this run|"
            f"McNemar p against {first}"), rows


PAPER_NOTE = ("The paper's numbers are for Llama-3.2-3B-Instruct, full benchmarks, greedy pass@1: not comparable to "
              "another model or to an --eval-limit subset.")
COMPARE_NOTE = ("McNemar: the exact two-sided test on the questions where the two runs' first answers (greedy with "
                "--eval-samples 1) disagree; p < 0.05 suggests a real difference. " + PAPER_NOTE)


# ------------------------------------------------------------------------------------------------ the report page
# One self-contained HTML page (inline SVG and CSS, no script) from whatever a run folder holds.
# (id, title, y-axis unit, series): one small chart each; a chart whose series never have a value is left out.
CHARTS = [("reward", "reward", "mean of 0/1", "reward reward_guided reward_unguided"),
          ("loss", "loss", "token mean", "loss"), ("eval_accuracy", "held-out accuracy", "%", "eval_accuracy"),
          ("guidance_pct", "guidance pct", "fraction", "guidance_pct"),
          ("response_len", "response length", "tokens", "response_len"),
          ("finished_frac", "finished", "fraction", "finished_frac"),
          ("reflect_rate", "own rollouts reflecting", "fraction", "reflect_rate"),
          ("clip", "clipped PPO tokens", "fraction", "clip_frac dual_clip_frac"),
          ("aas_weight", "AAS weight p/d", "token mean", "aas_weight aas_weight_teacher"),
          ("grad_norm", "gradient norm", "before clip", "grad_norm"),
          ("seconds", "time per phase", "s", "t_student t_teacher t_logprob t_update"), ("kl", "KL", "k3", "kl"),
          ("peak_mem_gb", "peak GPU memory", "GB", "peak_mem_gb")]
OVERLAID = {"reward_unguided", "reflect_rate", "response_len"}  # --report A --compare B draws B's beside A's
COLORS = ["#1f5fa8", "#d2691e", "#2e8b57", "#8b3a8b"]
DASHES = ["", "6 3", "2 3", "8 3 2 3"]  # equal curves would hide each other: each series has its own dash
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1160px}h2{margin-top:28px}
.charts{display:flex;flex-wrap:wrap;gap:10px}svg text{font:11px sans-serif;fill:#333}.ttl{font-weight:bold}
.frame{fill:none;stroke:#bbb}.zero{stroke:#999;stroke-dasharray:3 3}svg .ax{fill:#777}
.band{fill:#fde9b8;shape-rendering:crispEdges}table{border-collapse:collapse}.note,.hdr{color:#555;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td{white-space:nowrap}
td:first-child,th:first-child{text-align:left}
.roll{border:1px solid #ccc;border-radius:4px;margin:14px 0;padding:8px}.sw{padding:0 8px;border:1px solid #ccc}
.toks{font:13px/1.9 monospace;white-space:pre-wrap;word-break:break-word}.tt{color:#0b3d91;font-style:italic}
.toks span{box-shadow:inset -1px 0 #d4d4d4}
.cut{color:#fff;background:#0b3d91;font:bold 11px sans-serif;padding:0 4px;margin:0 4px}
.ppo{outline:1px dotted #444;background:repeating-linear-gradient(45deg,#ddd 0 3px,#fff 3px 6px)}"""


def tick(v, span):
    """A tick label with the decimals the chart's span needs: 0.00002 on a 0-0.05 axis reads 0, not 2e-05."""
    d = max(0, 2 - math.floor(math.log10(span))) if span > 0 else 3
    text = f"{v:.{d}f}".rstrip("0").rstrip(".") if d else f"{v:.0f}"
    return "0" if text == "-0" else text


def line_chart(cid, title, unit, series, guided):
    """One small SVG line chart; series = [(name, [(step, value or None)])], guided steps shaded. A series that has
    a value at most of its steps breaks its line where one is missing; a sparse one (evaluations) joins its points."""
    W, H, L, R, T, B = 370, 190, 52, 12, 34, 32  # size and margins in px: room for the title and labels
    lines = []
    for (m, pts), col, dash in zip(series, COLORS * 2, DASHES + DASHES[::-1]):
        dense, segs = 2 * sum(v is not None for _, v in pts) > len(pts), [[]]
        for st, v in pts:
            if v is not None:
                segs[-1].append((st, v))
            elif dense and segs[-1]:
                segs.append([])
        lines += [(m, seg, col, dash) for seg in segs if seg]
    if not lines:
        return ""
    xs = [st for _, pts in series for st, _ in pts]  # every logged step: all charts share one step axis
    ys = [v for _, pts, _, _ in lines for _, v in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    def X(st): return L + (st - x0) / ((x1 - x0) or 1) * (W - L - R)
    def Y(v): return H - B - 5 - (v - y0) / ((y1 - y0) or 1) * (H - T - B - 10)  # 5 px off the frame
    half = (W - L - R) / max(1, x1 - x0) / 2  # a guided step's band is one step wide, centred on it: consecutive
    out = [f'<svg data-metric="{cid}" width="{W}" height="{H}" viewBox="0 0 {W} {H}">']  # steps' bands touch
    for st in guided:
        lo, hi = max(L, X(st) - half), min(W - R, X(st) + half)
        out.append(f'<rect class="band" x="{lo:.1f}" y="{T}" width="{hi - lo:.1f}" height="{H - T - B}"/>')
    out.append(f'<rect class="frame" x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}"/>')
    if y0 < 0 < y1:  # a loss changes sign: where zero is
        out.append(f'<line class="zero" x1="{L}" x2="{W - R}" y1="{Y(0):.1f}" y2="{Y(0):.1f}"/>')
    for m, pts, col, dash in lines:
        xy = " ".join(f"{X(st):.1f},{Y(v):.1f}" for st, v in pts)
        out.append(f'<polyline data-metric="{m}" fill="none" stroke="{col}" stroke-width="1.6" '
                   f'stroke-dasharray="{dash}" points="{xy}"/>')
        if len(pts) == 1 or len(xs) <= 40:  # dots keep a lone point (one eval, one guided step) visible
            out += [f'<circle cx="{X(st):.1f}" cy="{Y(v):.1f}" r="2.2" fill="{col}"/>' for st, v in pts]
    names = dict.fromkeys((m, c) for m, _, c, _ in lines)
    legend = "".join(f'<tspan fill="{c}">\u25a0</tspan> {html.escape(m)}  ' for m, c in names) if len(series) > 1 else ""
    out += [f'<text class="ttl" x="4" y="14">{html.escape(title)}</text>', f'<text x="4" y="28">{legend}</text>',
            f'<text class="ax" transform="translate(11 {(T + H - B) / 2:.0f}) rotate(-90)">{html.escape(unit)}</text>']
    for v in dict.fromkeys((y0, (y0 + y1) / 2, y1)):  # y ticks: min, middle, max
        out.append(f'<text x="{L - 4}" y="{Y(v) + 4:.0f}" text-anchor="end">{tick(v, y1 - y0)}</text>')
    for st in dict.fromkeys((x0, round((x0 + x1) / 2), x1)):  # x ticks: first, middle, last step
        anchor = "start" if st == x0 else "end" if st == x1 else "middle"
        out.append(f'<text x="{X(st):.0f}" y="{H - B + 14}" text-anchor="{anchor}">{st:g}</text>')
    out.append(f'<text class="ax" x="{(L + W - R) / 2:.0f}" y="{H - 4}" text-anchor="middle">step</text></svg>')
    return "\n".join(out)


def curves_section(rows, others=()):
    """Every chart of CHARTS over the logged steps, the steps with guided rollouts shaded; others: the folders of
    compared runs, whose OVERLAID curves are drawn on the same charts."""
    others = [(os.path.basename(os.path.normpath(f)), read_jsonl(os.path.join(f, "metrics.jsonl"))) for f in others]
    if not rows:
        return '<p class="note">No metrics.jsonl in this folder.</p>'
    def pts(rs, m): return [(num(r.get("step")) if num(r.get("step")) is not None else i, num(r.get(m)))  # noqa
                            for i, r in enumerate(rs)]
    guided = [st for st, n in pts(rows, "n_guided") if (n or 0) > 0]
    charts = [line_chart(cid, title, unit, [(m, pts(rows, m)) for m in ms.split()]
                         + [(f"{name}: {m}", pts(rs, m)) for name, rs in others for m in ms.split() if m in OVERLAID],
                         guided) for cid, title, unit, ms in CHARTS
              if cid != "guidance_pct" or any(num(r.get(cid)) for r in rows)]  # none in a GRPO run
    return (f'<p class="note">{len(rows)} steps logged, {len(guided)} with guided rollouts (shaded: the teacher\'s '
            f'feedback was spliced onto at least one rollout).</p>'
            f'<div class="charts">{"".join(charts)}</div>')


def teacher_section(rows):
    """Per step that asked the teacher: replies asked and passed, why the others failed, the reward of guided and
    unguided rollouts, and the share of the student's own rollouts with a reflection."""
    asked = [r for r in rows if num(r.get("teacher_asked"))]
    if not asked:
        return ('<p class="note">The teacher was never asked: a --no-teacher run, guidance already over, or no '
                'finished rollout to select.</p>')
    def f(v): return "-" if num(v) is None else f"{num(v):.3g}"  # noqa: E306
    body = [[r.get("step"), r["teacher_asked"], round(num(r.get("teacher_format_pass")) * r["teacher_asked"]),
             "; ".join(f"{n} x {w}" for w, n in (r.get("teacher_why") or {}).items()) or "-",
             f(r.get("reward_guided")), f(r.get("reward_unguided")), f(r.get("reflect_rate"))] for r in asked]
    return table("step|asked|passed|why not|reward guided|reward unguided|own rollouts reflecting", body)


def table(head, rows):
    """An HTML table: head is 'col|col|...', rows are lists of cells (escaped here)."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head.split("|"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def eval_section(ev, preds):
    """The evaluation table of eval.json, with how its results were made above it; then per benchmark its first
    wrong and first right answer (eval_samples.jsonl)."""
    if not ev.get("results"):
        return '<p class="note">No readable eval.json in this folder.</p>'
    conf = ", ".join(f"{k} {html.escape(str(v))}" for k, v in ev.items() if k != "results")
    shown = [p for b in ev["results"] for right in (False, True)
             for p in [next((p for p in preds if p.get("benchmark") == b and p.get("correct") == right), None)] if p]
    answers = "".join(answer_block(p) for p in shown)
    return (f'<p class="note">{conf}</p>' + table(EVAL_HEAD, eval_rows(ev["results"])) + '<p class="note">95% Wilson '
            "interval over the n questions (not n &times; samples: one question's samples are not independent). "
            f"{html.escape(PAPER_NOTE)}</p>" + answers)


def answer_block(p):
    """One evaluation answer: benchmark, gold, the extracted answer and its verdict, above question and response."""
    e = lambda v: html.escape(str(v))  # noqa: E731
    hdr = (f"<b>{e(p.get('benchmark'))}</b> &middot; gold {e(p.get('gold'))} &middot; extracted {e(p.get('extracted'))}"
           f": <b>{'right' if p.get('correct') else 'wrong'}</b>"
           f"{' &middot; not finished' if not p.get('finished') else ''}"
           f"<br>Q: {e(str(p.get('question', ''))[:200])}")
    return f'<div class="roll"><div class="hdr">{hdr}</div><div class="toks">{e(p.get("response", ""))}</div></div>'


def weight_style(w):
    """A token's background by its AAS weight p/d, on log scales that span the values that occur: white at 1, orange
    below (AAS damps the token's push; full at 0.001, a typical unlikely teacher token), blue above (negative
    advantage: pushed away harder; p/d cannot pass about 1.11 there, so the blue is full at 1.1)."""
    if num(w) is None:
        return ""
    t = min(1.0, math.log10(1 / max(w, 1e-9)) / 3 if w < 1 else math.log(w) / math.log(1.1))
    r, g, b = (255, 255 - 110 * t, 255 - 230 * t) if w < 1 else (255 - 170 * t, 255 - 110 * t, 255)
    return f"background:rgb({r:.0f},{g:.0f},{b:.0f})"


def token_spans(s):
    """A guided response token by token, each span carrying data-tok and data-w (its weight, or 'ppo')."""
    toks, ws, ps = s["tokens"], s.get("weight"), s.get("p") or []
    if not isinstance(ws, list) or len(ws) != len(toks):  # weights not logged: unknown, not PPO
        ws = ["?"] * len(toks)
    n_s, out = s.get("n_student", len(toks)), []
    for i, (tok, w) in enumerate(zip(map(str, toks), ws)):
        if i == n_s:
            out.append('<b class="cut">teacher \u25b8</b>')
        p, wn = num(ps[i]) if i < len(ps) else None, num(w)
        tip = ("" if p is None else f"p={p:.3g} ") + ("routed to PPO" if w is None else f"p/d={w}")
        cls = ("s" if i < n_s else "tt") + (" ppo" if w is None else "")
        text = html.escape(tok).replace("\n", "\u21b5\n")  # a visible mark, then the line break (pre-wrap)
        out.append(f'<span class="{cls}" data-tok="{html.escape(tok)}" data-w="{"ppo" if w is None else w}" '
                   f'title="{html.escape(tip)}" style="{weight_style(wn)}">{text}</span>')
    return "".join(out)


def rollout_block(s):
    """One rollout: step, reward, advantage, gold and the (truncated) question above its text."""
    def f(v, spec): return "-" if num(v) is None else format(num(v), spec)
    q = str(s.get("question", ""))
    hdr = (f"<b>step {s.get('step')}</b> &middot; reward {f(s.get('reward'), '.3g')} &middot; advantage "
           f"{f(s.get('adv'), '+.3f')}{' (no policy gradient)' if num(s.get('adv')) == 0 else ''} &middot; gold "
           f"{html.escape(str(s.get('gold')))}{' &middot; not finished' if s.get('finished') is False else ''}<br>"
           f"Q: {html.escape(q[:200])}{'&hellip;' if len(q) > 200 else ''}")
    if isinstance(s.get("tokens"), list):
        body = token_spans(s)
    else:  # unguided rollouts, or guided ones logged without tokens: plain text
        body = html.escape(str(s.get("student", "")))
        if isinstance(s.get("teacher"), str):
            body += f'<b class="cut">teacher \u25b8</b><span class="tt">{html.escape(s["teacher"])}</span>'
    return f'<div class="roll"><div class="hdr">{hdr}</div><div class="toks">{body}</div></div>'


def rollouts_section(samples, shown=6):
    """The latest guided rollouts, token by token; without any, the latest two unguided ones as text."""
    replies = [s for s in samples if s.get("kind") == "teacher_reply"]
    rolls = [s for s in samples if s.get("kind", "rollout") == "rollout" and "student" in s]
    guided = sorted((s for s in rolls if s.get("guided")), key=lambda s: -(num(s.get("step")) or 0))
    ok = sum(bool(r.get("passed")) for r in replies)
    note = (f"<p class='note'>Teacher replies: {ok} passed the format check, {len(replies) - ok} failed.</p>"
            if replies else "")
    sw = "".join(f'<span class="sw" style="{weight_style(w)}">{w}</span>'
                 for w in (0.001, 0.01, 0.1, 0.5, 1, 1.05, 1.1))
    legend = (f"<p>{EXPLAIN}</p>" f'<p class="note">AAS weight p/d: {sw} <span class="sw ppo">PPO</span> &nbsp; '
              f'student text, <span class="tt">teacher text</span>. Hover a token for p and p/d.</p>')
    if not guided:  # e.g. a vanilla GRPO run: show what the student wrote instead
        latest = rolls[::-1][:2]
        head = "No guided rollouts logged" + ("; the latest unguided ones:" if latest else ".")
        return note + f'<p class="note">{head}</p>' + "".join(rollout_block(s) for s in latest)
    return legend + note + "".join(rollout_block(s) for s in guided[:shown])


EXPLAIN = ("The student's tokens are plain black, the teacher's blue italic after a "
           "<b>teacher &#9656;</b> marker. A token's background is its AAS weight p/d, the factor on its gradient: "
           "white near 1 (as an ordinary token), orange below 1 on a log scale (a token the student found very "
           "unlikely: its push is damped), blue above 1 (negative advantage: pushed away harder). Hatched tokens "
           "with a dotted outline went to the PPO loss instead (negative advantage and p &lt; 0.01, or student tokens "
           "when only the teacher's are shaped).")


def write_report(out, others=()):
    """Write OUT/report.html from whichever of metrics.jsonl, samples.jsonl, eval.json the folder holds; with
    others (more run folders), a table comparing their evals to this run's. Returns the page's path."""
    name, settings = html.escape(os.path.basename(os.path.normpath(out))), read_json(os.path.join(out, "args.json"))
    metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
    kind = "GRPO run (--no-teacher)" if settings.get("no_teacher") else "ThinkTuning run" if settings else "Run folder"
    parts = [f"<h1>{kind}: {name}</h1>", "<details><summary>Settings (args.json)</summary>"
             + table("flag|value", [[k, v] for k, v in settings.items()]) + "</details>" if settings else "",
             "<h2>Training curves</h2>", curves_section(metrics, others), "<h2>Teacher</h2>", teacher_section(metrics),
             "<h2>Evaluation</h2>", eval_section(read_json(os.path.join(out, "eval.json")),
                                                 read_jsonl(os.path.join(out, "eval_samples.jsonl")))]
    if others:
        head, rows = compare_table([out, *others], strict=False)
        parts += ["<h2>Against other runs</h2>", table(head, rows), f'<p class="note">{html.escape(COMPARE_NOTE)}</p>']
    parts += ["<h2>Guided rollouts</h2>", rollouts_section(read_jsonl(os.path.join(out, "samples.jsonl")))]
    head = f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{name}</title><style>{CSS}</style></head>'
    path = os.path.join(out, "report.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(head + "<body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return path


# ------------------------------------------------------------------------------------------------ exercises
# A course hands these out in this order; README, "Exercises", gives each one's equation, hint and question.
EXERCISES = ["group_advantages", "guidance_pct", "select_for_guidance", "parse_teacher", "splice", "aas_gamma",
             "policy_loss", "token_share", "response_logprobs", "kl_k3", "pass_at_k"]


def handout(names):
    """This file with the bodies of the named functions replaced by a NotImplementedError; signatures and
    docstrings stay. Bodies are found with `ast`, so comments and formatting elsewhere are untouched."""
    import ast
    unknown = [n for n in names if n not in EXERCISES]
    if unknown or not names:
        raise UserError(f"unknown exercise {', '.join(unknown) or '(none)'}: choose from {', '.join(EXERCISES)}")
    with open(os.path.abspath(__file__)) as f:
        lines = f.read().splitlines(keepends=True)
    nodes = {n.name: n for n in ast.parse("".join(lines)).body if isinstance(n, ast.FunctionDef)}
    for fn in sorted((nodes[n] for n in set(names)), key=lambda n: -n.lineno):  # bottom up: line numbers hold
        first = fn.body[1] if ast.get_docstring(fn) is not None else fn.body[0]
        stub = " " * first.col_offset + f'raise NotImplementedError("exercise: write {fn.name} (README, Exercises)")\n'
        lines[first.lineno - 1:fn.end_lineno] = [stub]
    return "".join(lines)


def print_exercise(spec):
    if spec.strip() == "list":
        for name in EXERCISES:
            print(f"{name:20s} pytest test_thinktuning.py -k {name}")
    else:
        sys.stdout.write(handout([n.strip() for n in spec.split(",") if n.strip()]))


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.exercise:
            return print_exercise(args.exercise) or 0
        if args.resume:
            args = resume_args(parser, argv)
        check_modes(given_flags(parser, argv))
        check_args(args)
        start_ranks(args)  # several GPUs (torchrun) only
        folders = [f.strip() for f in (args.compare or "").split(",") if f.strip()]
        if args.compare is not None and not folders:
            raise UserError(f"--compare {args.compare!r} names no run folder: use --compare A,B")
        if args.report:
            if not os.path.isdir(args.report):
                raise UserError(f"--report {args.report}: no such run folder")
            writable_folder(args.report)
            print(f"wrote {write_report(args.report, [f for f in folders if f != args.report])}")
        elif args.compare:
            print(markdown(*compare_table(folders)) + "\n" + COMPARE_NOTE)
        elif args.eval:
            run_eval(args)
        elif not train(args):
            return 130  # stopped by Ctrl-C, after saving
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped by Ctrl-C: nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory: lower --micro-batch (update), or --prompts-per-step, --max-new-tokens "
              "or --eval-batch-size (sampling)", file=sys.stderr)
        return 3
    finally:
        while HELD:  # let go of the run folders
            HELD.popitem()[1].close()
        if WORLD > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
