"""Step: the CPU log-prob head, padding-free batches and the shared prompt (dpo_recipes/training/segments.py, cpu_head.py)
against TRL as shipped.

Each case runs five ways, alternating in fresh processes so that drift hits all alike: TRL 1.16 as
shipped (its head, padded batches; had by turning ours off: `trainer.cpu_head` made a no-op), the CPU
head, and the CPU head with `train.padding_free=true`, `train.share_prompt=true` and both. Per run: median step time, whole-process wall
time, peak RSS, and the tokens the network processed per optimizer step (padding included; the policy's
and the reference's passes, counted at the backbone's input).
- the Qwen smoke line as a user runs it (`qwen7b_lora_dpo +smoke=tiny_qwen train.max_steps=4`: the
  real 152,064-token vocabulary, real-length UltraFeedback rows, micro-batch 1), and the same at
  micro-batch 4 for 2 steps (TRL's head takes over a minute a step there);
- the tiny Llama on the same 300 real pairs at micro-batch 1 and 4 (LoRA, the reference by disabling
  the adapter), and on the toy data as the default recipe ships.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 2
REAL = ["dataset=real_ultrafeedback", "train.max_steps=12", "train.eval_strategy=no", "train.max_length=1024"]
QWEN = "tiny Qwen smoke, 4 steps, micro-batch 1"
CASES = {
    QWEN: [
        "recipes=qwen7b_lora_dpo",
        "+smoke=tiny_qwen",
        "train.max_steps=4",
    ],
    "tiny Qwen smoke, 2 steps, micro-batch 4": [
        "recipes=qwen7b_lora_dpo",
        "+smoke=tiny_qwen",
        "train.max_steps=2",
        "train.per_device_train_batch_size=4",
    ],
    "tiny Llama, real rows, micro-batch 1": [*REAL, "train.per_device_train_batch_size=1"],
    "tiny Llama, real rows, micro-batch 4": [*REAL, "train.per_device_train_batch_size=4"],
    "tiny Llama default, 30 steps": ["train.max_steps=30", "train.eval_strategy=no"],
}


GOALS = [  # this CPU's goals: (case, way, ratio, at most, what)
    ("tiny Llama, real rows, micro-batch 4", "both", "step_ratio", 0.65, "step"),
    ("tiny Llama, real rows, micro-batch 1", "shared", "step_ratio", 0.85, "step"),
    (QWEN, "ours", "step_ratio", 0.35, "step"),
    (QWEN, "ours", "wall_ratio", 1 / 3, "process wall time (3x faster)"),
]


def layout(padding_free: bool, share_prompt: bool) -> list[str]:
    """Both fields named: the tiny recipes ship with both on, the 7B ones with both off."""
    return [
        f"++train.padding_free={str(padding_free).lower()}",
        f"++train.share_prompt={str(share_prompt).lower()}",
    ]


WAYS = {  # name: (label, overrides)
    "trl": ("TRL 1.16 as shipped", layout(False, False)),
    "ours": ("CPU head", layout(False, False)),
    "packed": ("CPU head + padding_free", layout(True, False)),
    "shared": ("CPU head + share_prompt", layout(False, True)),
    "both": ("CPU head + both", layout(True, True)),
}
CHILD = """
import contextlib, json, sys, time
start = time.perf_counter()
from dpo_recipes import config, train, trainer
from dpo_recipes.training.metrics import peak_rss_mb
if sys.argv[2] == "trl":
    trainer.cpu_head = contextlib.nullcontext
tokens = []
built = trainer.RecipeTrainer.__init__
def counting(self, *args, **kwargs):  # every forward's tokens, at the backbone: after any packing
    built(self, *args, **kwargs)
    for model in (self.model, self.ref_model):
        if model is not None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.base_model.register_forward_pre_hook(
                lambda module, args, kwargs: tokens.append(kwargs["input_ids"].numel()), with_kwargs=True
            )
trainer.RecipeTrainer.__init__ = counting
cfg, recipe = config.compose(["train.disable_tqdm=true", *sys.argv[3:]])
t = train.run(cfg, __import__("pathlib").Path(sys.argv[1]), recipe)
steps = [e["train_runtime"] for e in t.state.log_history if "train_runtime" in e]
print(json.dumps({"wall_s": time.perf_counter() - start, "train_s": steps[0],
                  "step_s": steps[0] / t.state.global_step, "peak_rss_mb": peak_rss_mb(),
                  "tokens_per_step": sum(tokens) / t.state.global_step}))
"""


def once(way: str, overrides: list[str], tmp: Path, i: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(tmp / f"{way}-{i}"), way, *overrides, *WAYS[way][1]]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(repeats: int = REPEATS, cases: dict = CASES, ways: tuple = tuple(WAYS)) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (case, overrides) in enumerate(cases.items()):
            runs = {way: [] for way in ways}
            for i in range(repeats):
                for way in runs:
                    runs[way].append(once(way, overrides, Path(tmp) / str(n), i))
            median = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
            for way, m in median.items():
                rows.append(
                    {
                        "case": case,
                        "way": WAYS[way][0],
                        **{k: round(v, 2) for k, v in m.items()},
                        "step_ratio": round(m["step_s"] / median["trl"]["step_s"], 3),
                        "wall_ratio": round(m["wall_s"] / median["trl"]["wall_s"], 3),
                    }
                )
    return {"rows": rows, "repeats": repeats}


def table(result: dict) -> str:
    lines = [
        "| case | way | step s | x TRL | tokens/step | train s | process wall s | x TRL | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['case']} | {r['way']} | {r['step_s']} | {r['step_ratio']} | {r['tokens_per_step']:,.0f} | "
            f"{r['train_s']} | {r['wall_s']} | {r['wall_ratio']} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join([*lines, "", *goals(result["rows"]), ""]) + (
        f"\nMedian of {result['repeats']} alternating runs in fresh processes."
    )


def goals(rows: list[dict]) -> list[str]:
    """Each goal whose row was measured, met or missed by how much."""
    found = {(r["case"], r["way"]): r for r in rows}
    lines = []
    for case, way, ratio, limit, what in GOALS:
        if row := found.get((case, WAYS[way][0])):
            verdict = "met" if row[ratio] <= limit else f"missed by {row[ratio] - limit:.3f}"
            lines.append(
                f"- Goal: {case}, {WAYS[way][0]}, {what} <= {limit:.3g}x TRL's: {row[ratio]}, {verdict}."
            )
    return lines
