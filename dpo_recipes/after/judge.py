"""Did DPO make the answers better: a judge compares two answers to one prompt, and `compare` turns a
set of verdicts into the numbers to act on; `ranked` scores several answers to each prompt and `pairs`
pairs the best against the worst (on-policy rounds).

- `reward`: a sequence-classification reward model scores each (prompt, answer) as text, through its
  own tokenizer and chat template; the higher score wins, the same answer ties.
- `pairwise`: a causal LM is asked which of two answers is better, A or B, in both orders; the
  probabilities of its two option tokens, averaged over the orders, give the preference, so the
  position bias cancels and swapping the answers mirrors every verdict exactly.

A preference is a number in [0, 1]: above 0.5 the first answer wins, 0.5 is a tie.
"""

import json
import math

import numpy as np

from dpo_recipes.sources import hub

KINDS = ("reward", "pairwise")
QUESTION = (
    "Which answer to the request is better?\n\nRequest: {prompt}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Reply with one letter, A or B."
)
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def text(value) -> str:
    """A prompt or answer as text: a string as is, messages as their contents."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] if isinstance(m["content"], str) else str(m["content"]) for m in value)


def reachable(path: str, revision: str | None = None) -> None:
    """Fail fast, before any answer is generated, on a judge that cannot be had (its config alone)."""
    from transformers import AutoConfig

    with hub.fetching("judge", path, "judge.path"):
        AutoConfig.from_pretrained(path, revision=revision)


def load(kind: str, path: str, revision: str | None = None, batch_size: int = 16):
    return (RewardJudge if kind == "reward" else PairwiseJudge)(path, revision, batch_size)


class Judge:
    auto_class = None

    def __init__(self, path: str, revision: str | None = None, batch_size: int = 16):
        import torch
        import transformers

        with hub.fetching("judge", path, "judge.path"):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, revision=revision)
            model = getattr(transformers, self.auto_class).from_pretrained(
                path,
                revision=revision,
                use_safetensors=True,
                dtype="auto",  # as saved: bf16 for most
            )
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        if self.tokenizer.pad_token is None:  # the model's own pad token where it was trained with one:
            own = model.config.pad_token_id  # a reward model reads its score before the first pad
            self.tokenizer.pad_token = (
                self.tokenizer.convert_ids_to_tokens(own) if own is not None else self.tokenizer.eos_token
            )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    def chat(self, messages: list[dict], **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def batches(self, texts: list[str], side: str, **kwargs):
        """The logits of each batch of `texts`, tokenized as written (the template wrote any special
        tokens) and padded on `side`; on the left, positions start at each text's first token."""
        import torch

        self.tokenizer.padding_side = side
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                add_special_tokens=False,
                return_tensors="pt",
            ).to(self.model.device)
            if side == "left":
                kwargs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                yield self.model(**batch, **kwargs).logits.float()


class RewardJudge(Judge):
    auto_class = "AutoModelForSequenceClassification"

    def scores(self, prompts: list, answers: list[str]) -> list[float]:
        if self.tokenizer.chat_template:
            texts = [
                self.chat([*(p if isinstance(p, list) else [{"role": "user", "content": p}]),
                           {"role": "assistant", "content": a}])
                for p, a in zip(prompts, answers, strict=True)
            ]  # fmt: skip
        else:
            texts = [f"{text(p)}\n\n{a}" for p, a in zip(prompts, answers, strict=True)]
        return [s for logits in self.batches(texts, "right") for s in logits[:, 0].tolist()]

    def prefer(self, prompts: list, a: list[str], b: list[str]) -> tuple[list[float], dict]:
        """Preferences of `a` over `b`, and both answers' scores."""
        sa, sb = self.scores(prompts, a), self.scores(prompts, b)
        return preferences(a, b, sa, sb), {"a": sa, "b": sb}


def preferences(a: list[str], b: list[str], sa: list[float], sb: list[float]) -> list[float]:
    """`a` over `b` by their reward scores: 1, 0, or 0.5 for the same text or the same score."""
    return [0.5 if x == y or sx == sy else float(sx > sy) for x, y, sx, sy in zip(a, b, sa, sb, strict=True)]


class PairwiseJudge(Judge):
    auto_class = "AutoModelForCausalLM"

    def first(self, prompts: list, a: list[str], b: list[str]) -> list[float]:
        """P(A) / (P(A) + P(B)) for the answer in place A, read at the reply's first token."""
        questions = [QUESTION.format(prompt=text(p), a=x, b=y) for p, x, y in zip(prompts, a, b, strict=True)]
        if self.tokenizer.chat_template:
            texts = [
                self.chat([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions
            ]
            letters = ("A", "B")
        else:
            texts, letters = [f"{q}\n\nBetter answer:" for q in questions], (" A", " B")
        options = [self.tokenizer.encode(letter, add_special_tokens=False)[0] for letter in letters]
        return [
            p
            for logits in self.batches(texts, "left", logits_to_keep=1)  # the reply's first token only
            for p in logits[:, -1, options].softmax(-1)[:, 0].tolist()
        ]

    def prefer(self, prompts: list, a: list[str], b: list[str]) -> tuple[list[float], dict]:
        forward, backward = self.first(prompts, a, b), self.first(prompts, b, a)
        prefs = [(x + 1 - y) / 2 for x, y in zip(forward, backward, strict=True)]
        return prefs, {"a_first": forward, "b_first": backward}


def ranked(judge, prompts: list, texts: list[list[str]]) -> list[list[float]]:
    """A score for each answer to each prompt: the reward model's, or a pairwise judge's mean preference
    for it over each other answer to its prompt (every pair judged, in both orders)."""
    if isinstance(judge, RewardJudge):
        flat = iter(judge.scores([p for p, made in zip(prompts, texts, strict=True) for _ in made],
                                 [t for made in texts for t in made]))  # fmt: skip
        return [[next(flat) for _ in made] for made in texts]
    games = [
        (g, i, j) for g, made in enumerate(texts) for i in range(len(made)) for j in range(i + 1, len(made))
    ]
    prefs, _ = judge.prefer([prompts[g] for g, _, _ in games], [texts[g][i] for g, i, _ in games],
                            [texts[g][j] for g, _, j in games])  # fmt: skip
    won = [[0.0] * len(made) for made in texts]
    for (g, i, j), p in zip(games, prefs, strict=True):
        won[g][i] += p
        won[g][j] += 1 - p
    return [[w / max(len(row) - 1, 1) for w in row] for row in won]


def answer(prompt, text: str):
    """An answer in its prompt's style: an assistant message, or text that follows the prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else " " + text


def pairs(prompts: list, texts: list[list[str]], scores: list[list[float]], min_margin: float) -> tuple:
    """Each prompt's best-scored answer against its worst, where they differ in text and the judge's
    margin is above `min_margin`; returns the rows and the drops counted by reason."""
    rows, dropped = [], {"same_answer": 0, "small_margin": 0}
    for prompt, made, score in zip(prompts, texts, scores, strict=True):
        best, worst = int(np.argmax(score)), int(np.argmin(score))
        if made[best] == made[worst]:
            dropped["same_answer"] += 1
        elif score[best] - score[worst] <= min_margin:
            dropped["small_margin"] += 1
        else:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": answer(prompt, made[best]),
                    "rejected": answer(prompt, made[worst]),
                }
            )
    return rows, {k: v for k, v in dropped.items() if v}


def unit(prompt) -> str:
    """A prompt as the unit an interval counts: the same prompt in two rows is one unit."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def selection(prompts: list, k: int) -> list:
    """The held-out prompts `judge.every` picks the best checkpoint on: the last `k` distinct ones.
    `make eval` reports on the others, so that the pick is not judged on the prompts it was made on."""
    return list({unit(p): p for p in prompts}.values())[-k:]


def outcomes(prefs) -> np.ndarray:
    """1 for a win, 0.5 for a tie, 0 for a loss."""
    p = np.asarray(prefs, dtype=float)
    return np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))


def length_controlled(won: np.ndarray, len_a, len_b, l2: float = 1e-2) -> float:
    """The win rate at equal length: a logistic regression of the outcome on tanh(length difference / its
    standard deviation) alone, read at a difference of 0 (sigmoid of the intercept). It is the length
    term of AlpacaEval 2's length-controlled model, without its model and instruction-difficulty terms,
    which one comparison on one eval set cannot separate. A small L2 penalty on the length term keeps the
    fit finite where length alone decides."""
    diff = np.asarray(len_a, dtype=float) - np.asarray(len_b, dtype=float)
    x = np.stack([np.ones_like(diff), np.tanh(diff / (diff.std() or 1.0))], 1)
    w, penalty = np.zeros(2), np.diag([0.0, l2 * len(won)])
    for _ in range(100):  # Newton's method on the penalized log-likelihood (soft labels: ties as 0.5)
        p = 1 / (1 + np.exp(-x @ w))
        gradient = x.T @ (won - p) - penalty @ w
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + math.exp(-w[0])))


def wilson(rate: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion `rate` observed over `n` independent units."""
    shrink = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / shrink
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / shrink
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(per_prompt: np.ndarray) -> tuple[float, float]:
    """95% for the mean of the per-prompt outcomes: Wilson's interval at the effective number of prompts,
    the binomial variance over the variance the per-prompt outcomes show (ties and several answers a
    prompt lower it; a prompt is the unit, never an answer). Where the outcomes do not vary, the count of
    prompts itself: 32 wins of 32 gives [0.89, 1.0]. Its coverage is measured in the tests."""
    n, rate = len(per_prompt), float(per_prompt.mean())
    spread = float(per_prompt.var())
    binomial = rate * (1 - rate)
    return wilson(rate, n * binomial / spread if spread > 0 and binomial > 0 else n)


def compare(prefs, len_a, len_b, groups=None) -> dict:
    """Wins, ties, losses; the win rate (ties count half) with a 95% interval over prompts (`groups`: the
    prompt of each verdict, when there are several answers a prompt), the length-controlled rate and the
    mean answer-length ratio (a over b, in characters)."""
    won = outcomes(prefs)
    groups = np.arange(len(won)) if groups is None else np.asarray(groups)
    _, index = np.unique(groups, return_inverse=True)
    per_prompt = np.bincount(index, weights=won) / np.bincount(index)
    low, high = interval(per_prompt)
    return {
        "n": len(won),
        "wins": int((won == 1).sum()),
        "ties": int((won == 0.5).sum()),
        "losses": int((won == 0).sum()),
        "win_rate": round(float(per_prompt.mean()), 4),
        "interval": [round(float(low), 4), round(float(high), 4)],
        "lc_win_rate": round(length_controlled(won, len_a, len_b), 4),
        "length_ratio": round(float(np.sum(len_a) / max(np.sum(len_b), 1)), 3),
    }


def lines(report: dict) -> list[str]:
    """An eval report (dpo_recipes/after/evaluate.py) in words, a line per number."""
    out = [f"judge: {report['judge']['kind']} {report['judge']['path']}; {report['prompts']} prompts, "
           f"{report['decoding']}, {report['samples_per_prompt']} answer(s) each"]  # fmt: skip
    if report["judge_agrees_with_data"] is not None:
        out.append(
            f"this judge agrees with your data on {report['judge_agrees_with_data']:.0%} of eval pairs"
        )
    for name, c in report["comparisons"].items():
        low, high = c["interval"]
        out.append(
            f"{name.replace('_', ' ')}: win rate {c['win_rate']:.2f} (95% CI {low:.2f}-{high:.2f}; "
            f"{c['wins']} wins, {c['ties']} ties, {c['losses']} losses), length-controlled {c['lc_win_rate']:.2f}, "
            f"length ratio {c['length_ratio']:.2f}"
        )
    return out + [f"note: {n}" for n in report["notes"]]
