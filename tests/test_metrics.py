"""The metrics callback keeps drawing off the training loop: at most one plot per PLOT_EVERY_S."""

from types import SimpleNamespace

import torch

from dpo_recipes import metrics


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
    assert len(drawn) == 2 and drawn[-1][1].startswith("r on CPU")
    assert (tmp_path / "training_metrics.csv").exists()
