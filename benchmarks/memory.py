"""Peak memory of each reference strategy: the same ~30M-parameter Llama, LoRA policy, a few steps.

    python -m benchmarks.memory

Each run trains in its own process and reports the distinct weight storage it holds (policy and
reference together) and its peak RSS. Only the reference strategy changes between runs. On CPU the
RSS of `copy` barely grows: safetensors maps the file, and a frozen copy of the same file shares its
pages; on a GPU each copy is real memory, which the weights column shows.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
SIZE = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
)
STRATEGIES = ("adapter", "copy", "precomputed")


def build_model(target: Path) -> int:
    """The tiny model's tokenizer on a larger random Llama; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dpo_recipes.sources import tiny

    tokenizer = AutoTokenizer.from_pretrained(tiny.path())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **SIZE,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return model.num_parameters()


CHILD = """
import json, sys
from dpo_recipes import config, train
from dpo_recipes.training.metrics import peak_rss_mb
cfg, recipe = config.compose(sys.argv[2:])
trainer = train.run(cfg, __import__("pathlib").Path(sys.argv[1]), recipe)
storages = {}
for model in (trainer.model, trainer.ref_model):
    for tensor in [] if model is None else [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
print(json.dumps({"weights_held_mb": sum(storages.values()) / 2**20,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def measure(run_dir: Path, overrides: list[str]) -> dict:
    """Train in a fresh process; it reports the bytes of distinct weight storage it holds (policy and
    reference together) and its own peak RSS."""
    cmd = [sys.executable, "-c", CHILD, str(run_dir), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        params = build_model(model)
        rows = []
        for strategy in STRATEGIES:
            overrides = [
                f"model.model_name_or_path={model}",
                f"reference={strategy}",
                "train.max_steps=4",
                "train.eval_strategy=no",
                "train.disable_tqdm=true",
                "dataset.max_samples=64",
            ]
            got = measure(Path(tmp) / f"run-{strategy}", overrides)
            rows.append({"reference": strategy, **{k: round(v) for k, v in got.items()}})
    for row in rows:
        for key in ("weights_held_mb", "peak_rss_mb"):
            row[key.replace("_mb", "_x_adapter")] = round(row[key] / rows[0][key], 2)
    return {"parameters": params, "weights_mb_fp32": round(params * 4 / 2**20), "results": rows}


def table(result: dict) -> str:
    lines = [
        f"{result['parameters'] / 1e6:.1f}M-parameter Llama ({result['weights_mb_fp32']} MB fp32), LoRA policy, 4 steps.",
        "",
        "| reference | weights held MB | x adapter | peak RSS MB | x adapter |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['reference']} | {r['weights_held_mb']} | {r['weights_held_x_adapter']} "
            f"| {r['peak_rss_mb']} | {r['peak_rss_x_adapter']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
