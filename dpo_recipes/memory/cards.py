"""The docs' memory table: each shipped GPU recipe's predicted peak per GPU as shipped, and on each card
size the largest micro-batch that fits. `python -m dpo_recipes.memory.cards` prints it."""

from dpo_recipes import ROOT, config
from dpo_recipes.memory.estimates import predict
from dpo_recipes.memory.preflight import largest_batch
from dpo_recipes.memory.shapes import shape_of

CARDS_GB = (24, 48, 80, 141)
TABLE_MARKS = ("<!-- memory table: python -m dpo_recipes.memory.cards -->", "<!-- end of memory table -->")


def table(recipes: list[str], cards=CARDS_GB) -> str:
    """The docs' table (docs/memory.md): each recipe's predicted peak per GPU as shipped (its engine over the GPUs its
    accelerate config names), and on each card the largest micro-batch that fits at the same effective
    batch, with its peak."""
    rows = [
        f"| recipe | engine | as shipped | {' | '.join(f'{gb} GB' for gb in cards)} |",
        f"| --- | --- | --- | {' | '.join('---' for _ in cards)} |",
    ]
    for recipe in recipes:
        cfg, _ = config.compose([f"recipes={recipe}"])
        built = config.build(cfg, "unused", machine=False)
        shape = shape_of(built)
        accumulation = built.args.gradient_accumulation_steps
        shipped = predict(shape)
        cells = []
        for gb in cards:
            best = largest_batch(shape, gb * 1024, shape.batch * accumulation)
            cells.append(f"{best[0]} ({best[1].peak_mb / 1024:.1f} GiB)" if best else "does not fit")
        rows.append(
            f"| `{recipe}` | {shape.processes} x {shape.engine} | {shape.batch} x {accumulation}, "
            f"{shipped.peak_mb / 1024:.1f} GiB | {' | '.join(cells)} |"
        )
    return "\n".join(rows)


def shipped_gpu_recipes() -> list[str]:
    recipes = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if not p.stem.startswith("tiny"))
    return [r for r in recipes if config.compose([f"recipes={r}"])[0].task == "dpo"]  # DPO steps only


if __name__ == "__main__":
    print(TABLE_MARKS[0])
    print(table(shipped_gpu_recipes()))
    print(TABLE_MARKS[1])
