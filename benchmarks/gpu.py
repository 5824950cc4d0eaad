"""`make bench-gpu`: the `qwen7b_lora_dpo` recipe on a model of Qwen2.5-7B's published shape (random
bf16 weights built on the GPU, Qwen2.5's real tokenizer, nothing downloaded), on synthetic rows of
UltraFeedback's length, for a fixed number of optimizer steps, against a plain TRL script with the same
settings (benchmarks/plain_trl.py). Variants: the recipe as shipped, `reference=precomputed`,
`train.use_liger_kernel=true` (where liger-kernel is installed), padding-free batches, the shared
prompt and both (each under the attention that runs its layout best here: `layout`), and the largest
micro-batch that fits with the same effective batch of 16, padded, packed and both. Each of our runs'
own memory prediction (memory/) stands beside its measured `torch.cuda.max_memory_allocated`, with the error.

Model FLOPs per optimizer step, with N the parameters that multiply activations (every linear layer
and the LM head; not the embedding lookup), T the step's non-padding tokens (prompt + chosen and prompt
+ rejected: TRL's `num_tokens`), L layers, d the hidden size and s the mean sequence length:

    forward = 2 N T + 2 L d s T          (matmuls + causal attention scores and values)
    LoRA:   policy forward + backward of activations only (frozen weights get no gradient) = 2 forward,
            reference forward = 1 forward                      -> 3 forward per step
    reference=precomputed: no reference forward in the step  -> 2 forward per step
    MFU = FLOPs per step / step time / the GPU's dense bf16 peak (H100 and H200 SXM: 989 TFLOP/s).

Activation checkpointing's recomputed forward is not counted (model FLOPs, not hardware FLOPs).
On a machine without CUDA, `python -m benchmarks.gpu --tiny` runs the same code at the tiny Qwen's
shape for 2 steps (the test that keeps this script from rotting).
"""

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.data_prep import text
from dpo_recipes import ROOT
from dpo_recipes.sources import tiny

QWEN2_5_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
STEPS, EFFECTIVE_BATCH = 4, 16  # the first step warms up; 3 are timed


def write_rows(path: Path, n: int, words: tuple[int, int, int]) -> None:
    """Conversational rows of UltraFeedback's length: about 150 prompt and 300 answer tokens."""
    rng = random.Random(0)
    turn = lambda role, k: [{"role": role, "content": text(rng, k)}]  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": turn("user", words[0]), "chosen": turn("assistant", words[1])}
            row["rejected"] = turn("assistant", words[2])
            f.write(json.dumps(row) + "\n")


def flops_per_token(shape: dict, seq: float) -> float:
    """Forward FLOPs per token (see the module's header)."""
    d, layers = shape["hidden_size"], shape["num_hidden_layers"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * shape["intermediate_size"]  # q, o; k, v; gate, up, down
    n = layers * per_layer + d * shape["vocab_size"]
    return 2 * n + 2 * layers * d * seq


def timed(out: Path, target: list[str]) -> dict:
    """One run in a fresh process, timed by benchmarks/timed.py; an out-of-memory run returns None."""
    result = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "benchmarks.timed", str(result), *target]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        if "OutOfMemoryError" in done.stderr or "CUDA out of memory" in done.stderr:
            return None
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(result.read_text())


def predicted_mb(run_dir: Path) -> float | None:
    """The run's own prediction (summary.json's memory) of what torch.cuda.max_memory_allocated counts:
    the predicted peak without the allocator's reserve and the context, which that counter leaves out."""
    summary = run_dir / "dpo_metrics" / "summary.json"
    record = json.loads(summary.read_text()).get("memory") if summary.exists() else None
    if not record:
        return None
    return record["predicted_peak_mb"] - record["breakdown_mb"].get("CUDA allocator and context", 0)


def summarize(
    name: str,
    run: dict,
    shape: dict,
    passes: int,
    micro_batch: int,
    pairs: int,
    predicted: float | None = None,
) -> dict:
    steps = run["step_s"] or [run["first_step_s"]]
    tokens = [b - a for a, b in zip([0, *run["num_tokens"]], run["num_tokens"], strict=False)]
    per_step = statistics.mean(tokens[1:] or tokens)  # the first step also pays the warm-up
    flops = passes * flops_per_token(shape, per_step / (2 * pairs)) * per_step  # two sequences a pair
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    step = statistics.median(steps)
    return {
        "what": name,
        "micro_batch": micro_batch,
        "step_s": round(step, 3),
        "tokens_per_s": round(per_step / step),
        "peak_gpu_gb": round(run["peak_gpu_mb"] / 1024, 1) if run["peak_gpu_mb"] else None,
        "predicted_gb": round(predicted / 1024, 1) if predicted else None,
        "prediction_error": round(predicted / run["peak_gpu_mb"] - 1, 3)
        if predicted and run["peak_gpu_mb"]
        else None,
        "mfu": round(flops / step / peak, 3) if peak else None,
        "first_loss": run["loss"][0],
    }


def attention_of(cmd) -> str:
    return next((c.split("=", 1)[1] for c in cmd if c.startswith("model.attn_implementation=")), "sdpa")


def layout(device: str, *flags: str) -> tuple:
    """`flags` (padding_free, share_prompt) with the attention that layout runs best under: flash attention
    2's varlen kernel for packed rows on a GPU where flash-attn is installed (it takes no shared-prompt
    mask), else sdpa, which attends by segment (`trainer.by_segment`), as a run gets by default."""
    best = "sdpa"
    if device == "cuda" and "share_prompt" not in flags and importlib.util.find_spec("flash_attn"):
        best = "flash_attention_2"
    return *(f"++train.{flag}=true" for flag in flags), f"model.attn_implementation={best}"


def run(
    tiny_shape: bool = False, steps: int = STEPS, accumulation: int = EFFECTIVE_BATCH, only: tuple = ()
) -> dict:
    """Every variant, or those named in `only`."""
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:  # a 7B model's 15 GB: never left
        return measure(Path(scratch), tiny_shape, steps, accumulation, only)


def measure(scratch: Path, tiny_shape: bool, steps: int, accumulation: int, only: tuple) -> dict:
    shape = tiny.QWEN if tiny_shape else {**tiny.QWEN, **QWEN2_5_7B}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, rows = scratch / "model", scratch / "rows.jsonl"
    tiny.build_qwen(model, device=device, **({} if tiny_shape else QWEN2_5_7B))
    write_rows(rows, steps * accumulation, (12, 24, 20) if tiny_shape else (110, 230, 210))

    def ours(name: str, micro: int, *extra: str) -> list[str]:
        cmd = ["dpo_recipes.train", "recipes=qwen7b_lora_dpo", f"model.model_name_or_path={model}"]
        cmd += [f"dataset.path={rows}", "dataset.format=trl", "dataset.eval_split=null", "logger=none"]
        cmd += [] if device == "cuda" else ["hardware=cpu"]
        cmd += [f"train.max_steps={steps}", "train.logging_steps=1", "train.eval_strategy=no"]
        cmd += ["train.save_strategy=no", "train.disable_tqdm=true", f"hydra.run.dir={scratch / name}"]
        cmd += [f"train.per_device_train_batch_size={micro}"]
        return [*cmd, f"train.gradient_accumulation_steps={accumulation // micro}", *extra]

    plain = [str(ROOT / "benchmarks" / "plain_trl.py"), str(scratch / "plain"), "--recipe", "qwen7b_lora_dpo"]
    plain += ["--model", str(model), "--train", str(rows), "--max-steps", str(steps)]
    packed, both = layout(device, "padding_free"), layout(device, "padding_free", "share_prompt")
    variants = {  # name: (command, forward passes a step, micro-batch)
        "make train, as shipped": (ours("shipped", 1), 3, 1),
        "plain TRL script": ([*plain, "--accumulation", str(accumulation)], 3, 1),
        "reference=precomputed": (ours("precomputed", 1, "reference=precomputed"), 2, 1),
        "train.padding_free=true": (ours("packed", 1, *packed), 3, 1),
        "train.share_prompt=true": (ours("shared", 1, *layout(device, "share_prompt")), 3, 1),
        "padding_free + share_prompt": (ours("both", 1, *both), 3, 1),
    }
    skipped = []
    if importlib.util.find_spec("liger_kernel") is not None:
        variants["train.use_liger_kernel=true"] = (ours("liger", 1, "train.use_liger_kernel=true"), 3, 1)
    else:
        skipped.append(
            "train.use_liger_kernel=true: liger-kernel is not installed (pip install liger-kernel)"
        )
    results = []
    for name, (cmd, passes, micro) in variants.items():
        if only and name not in only:
            continue
        dir_ = Path(
            next((c.split("=", 1)[1] for c in cmd if c.startswith("hydra.run.dir=")), scratch / "none")
        )
        row = summarize(
            name,
            timed(scratch / name.split()[0], cmd),
            shape,
            passes,
            micro,
            accumulation,
            predicted_mb(dir_),
        )
        results.append({**row, "attention": attention_of(cmd)})
    for name, extra in (("", []), (", padding_free", packed), (", both", both)):
        largest = None
        for micro in (16, 8, 4, 2) if device == "cuda" else ():  # the same effective batch; largest first
            result = timed(scratch / f"mb{micro}{name}", ours(f"mb{micro}{name}", micro, *extra))
            if result is None:
                continue
            largest = summarize(
                f"largest micro-batch that fits{name}",
                result,
                shape,
                3,
                micro,
                accumulation,
                predicted_mb(scratch / f"mb{micro}{name}"),
            ) | {"attention": attention_of(extra)}
            break
        results += [largest] if largest else []
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU, fp32",
        "shape": "tiny Qwen" if tiny_shape else "Qwen2.5-7B",
        "steps": steps,
        "effective_batch": accumulation,
        "results": results,
        "skipped": skipped,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['shape']} shape on {result['device']}: the qwen7b_lora_dpo recipe (LoRA r64 all-linear, "
        f"max_length 2048), effective batch {result['effective_batch']}, {result['steps']} optimizer steps.",
        "",
        "| run | attention | micro-batch | step s | tokens/s | peak GPU GB | predicted GB (error) | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["results"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        error = r.get("prediction_error")
        predicted = (
            f"{r['predicted_gb']} ({error:+.1%})" if error is not None else r.get("predicted_gb") or "-"
        )
        lines.append(
            f"| {r['what']} | {r.get('attention', 'sdpa')} | {r['micro_batch']} | {r['step_s']} | {r['tokens_per_s']:,} | {r['peak_gpu_gb'] or '-'} | {predicted} | {mfu} |"
        )
    lines += [f"\nNot run: {s}" for s in result["skipped"]]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The qwen7b_lora_dpo recipe at 7B shape on a GPU.")
    parser.add_argument("--tiny", action="store_true", help="the tiny Qwen's shape (a CPU check)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--accumulation", type=int, default=EFFECTIVE_BATCH)
    args = parser.parse_args()
    print(table(run(args.tiny, args.steps, args.accumulation)))
