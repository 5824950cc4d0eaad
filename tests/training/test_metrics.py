"""The metrics callback keeps drawing off the training loop (at most one plot per PLOT_EVERY_S), writes
one CSV row per step, and draws plots that say which run they show."""

from types import SimpleNamespace

import torch

from dpo_recipes.after import sweep
from dpo_recipes.training import metrics

HISTORY = [
    {"step": 1, "loss": 0.693, "rewards/accuracies": 0.0, "rewards/margins": 0.0},
    {"step": 10, "loss": 0.6, "rewards/accuracies": 0.75, "rewards/margins": 0.2},
    {"step": 10, "eval_loss": 0.62, "eval_rewards/accuracies": 0.7, "eval_rewards/margins": 0.15},
    {"step": 20, "loss": 0.5, "rewards/accuracies": 0.8, "rewards/margins": 0.4},
    {"step": 20, "train_runtime": 3.0},
]


def test_the_plot_is_redrawn_at_most_every_so_often_and_always_at_the_end(tmp_path, monkeypatch):
    clock, drawn = [1000.0], []
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(metrics, "plot", lambda rows, target, title: drawn.append((clock[0], title)))
    callback = metrics.MetricsCallback(tmp_path, {"recipe": "r"})
    state = SimpleNamespace(is_world_process_zero=True, log_history=[{"step": 1, "loss": 0.7}])
    args = SimpleNamespace(device=torch.device("cpu"))
    callback.on_train_begin(args, state, None)
    for _ in range(20):  # 20 evaluations in 10 s
        clock[0] += 0.5
        callback.on_evaluate(args, state, None)
    assert drawn == []
    clock[0] += metrics.PLOT_EVERY_S
    callback.on_evaluate(args, state, None)
    callback.on_evaluate(args, state, None)
    assert len(drawn) == 1
    callback.on_train_end(args, state, None)
    assert len(drawn) == 2 and drawn[-1][1].startswith("r / ") and " on CPU" in drawn[-1][1]
    assert (tmp_path / "training_metrics.csv").exists()


def test_each_step_is_one_csv_row_with_its_train_and_eval_columns():
    rows = metrics.step_rows(HISTORY)
    assert [r["step"] for r in rows] == [1, 10, 20]
    assert rows[1]["loss"] == 0.6 and rows[1]["eval_loss"] == 0.62
    lines = metrics.to_csv(rows).splitlines()
    assert len(lines) == 4 and lines[0].startswith("step,epoch,loss")


def test_the_plot_names_the_run_and_leaves_out_the_accuracy_before_any_pair_was_compared():
    context = {"recipe": "tiny_lora_dpo", "run_dir": "/x/outputs/first", "overrides": ["++train.beta=0.3"]}
    title = metrics.title(context, "CPU (2 cores)")
    assert title == "tiny_lora_dpo / first on CPU (2 cores)\ntrain.beta=0.3"
    fig = metrics.figure(metrics.step_rows(HISTORY), title)
    accuracy = next(ax for ax in fig.axes if ax.get_title() == "rewards/accuracies")
    drawn = {line.get_label(): list(line.get_xdata()) for line in accuracy.lines}
    assert drawn == {"train rewards/accuracies": [10, 20], "eval rewards/accuracies": [10]}
    assert fig._suptitle.get_text() == title


def test_heat_map_labels_contrast_with_their_cell():
    import matplotlib

    viridis = matplotlib.colormaps["viridis"]
    assert sweep.label_colour(viridis(0.0)) == "white"  # dark purple
    assert sweep.label_colour(viridis(1.0)) == "black"  # yellow
    for i in range(101):  # WCAG AA for normal text on every cell colour
        cell = viridis(i / 100)
        assert sweep.contrast(cell, sweep.label_colour(cell)) >= 4.5
