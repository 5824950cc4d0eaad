"""`python -m benchmarks gpu_memory`, on one CUDA GPU (about 6 minutes on an H100): each run's own memory
prediction (memory/) beside `torch.cuda.max_memory_allocated`, for LoRA, QLoRA and full fine-tuning
with fp32 master weights, at Qwen2.5-1.5B's published shape (random bf16 weights built on the GPU,
Qwen2.5's real tokenizer, nothing downloaded) on rows that fill 2048 tokens: the shipped Qwen recipes
with only the weights and data swapped, on one GPU (`hardware=gpu`: the full recipe then stores its
weights in fp32 under bf16 autocast), micro-batch 1, 2 optimizer steps (the second holds the optimizer
states). The peak a run predicts less the allocator's reserve and the context, which that counter
leaves out, is the number compared. On a machine without CUDA, `--tiny` runs the same code at the tiny
Qwen's shape (a test does).
"""

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.gpu import predicted_mb, timed, write_rows
from dpo_recipes.sources import tiny

QWEN2_5_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)
RUNS = {  # name: the recipe and what changes on one GPU
    "LoRA r64 (qwen7b_lora_dpo)": ["recipes=qwen7b_lora_dpo"],
    "QLoRA r64 (qwen7b_qlora_dpo)": ["recipes=qwen7b_qlora_dpo"],
    "full, fp32 masters (qwen7b_full_dpo, hardware=gpu)": ["recipes=qwen7b_full_dpo", "hardware=gpu"],
}
STEPS = 2


def run(tiny_shape: bool = False, only: tuple = ()) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-gpu-memory-") as scratch:
        return measure(Path(scratch), tiny_shape, only)


def measure(scratch: Path, tiny_shape: bool, only: tuple) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, rows = scratch / "model", scratch / "rows.jsonl"
    tiny.build_qwen(model, device=device, **({} if tiny_shape else QWEN2_5_1_5B))
    length = 64 if tiny_shape else 2048
    write_rows(rows, STEPS, (length // 8, length, length))  # answers past max_length: every row fills it
    results = []
    for name, recipe in RUNS.items():
        if only and name not in only:
            continue
        run_dir = scratch / str(len(results))
        cmd = ["dpo_recipes.train", *recipe, f"model.model_name_or_path={model}", f"dataset.path={rows}"]
        cmd += ["dataset.format=trl", "dataset.eval_split=null", "logger=none", f"train.max_length={length}"]
        cmd += [f"train.max_steps={STEPS}", "train.eval_strategy=no", "train.save_strategy=no"]
        cmd += ["train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1"]
        cmd += ["train.disable_tqdm=true", f"hydra.run.dir={run_dir}"]
        cmd += [] if device == "cuda" else ["train.use_cpu=true", "hardware.device=cpu"]
        measured = timed(scratch / f"run{len(results)}", cmd)
        predicted = predicted_mb(run_dir)
        peak = measured["peak_gpu_mb"] if measured else None
        results.append(
            {
                "what": name,
                "predicted_gb": round(predicted / 1024, 2) if predicted else None,
                "measured_gb": round(peak / 1024, 2) if peak else None,
                "error": round(predicted / peak - 1, 3) if predicted and peak else None,
                "first_loss": measured["loss"][0] if measured else None,
            }
        )
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "shape": "tiny Qwen" if tiny_shape else "Qwen2.5-1.5B",
        "length": length,
        "results": results,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['shape']} shape on {result['device']}, rows of {result['length']} tokens, micro-batch 1, "
        f"{STEPS} steps: predicted (less allocator reserve and context) beside torch.cuda.max_memory_allocated.",
        "",
        "| run | predicted GB | measured GB | error |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["results"]:
        error = f"{r['error']:+.1%}" if r["error"] is not None else "-"
        lines.append(
            f"| {r['what']} | {r['predicted_gb'] or '-'} | {r['measured_gb'] or 'out of memory'} | {error} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Predicted vs measured GPU memory at Qwen2.5-1.5B's shape.")
    parser.add_argument("--tiny", action="store_true", help="the tiny Qwen's shape (a CPU check)")
    print(table(run(parser.parse_args().tiny)))
