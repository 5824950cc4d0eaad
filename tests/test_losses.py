"""The loss group: every option trains, known closed forms at step 1, and `loss=` touches loss keys only."""

import math

import pytest
from conftest import tiny_overrides
from omegaconf import OmegaConf

from dpo_recipes import config, schema, train

LOSS_DIR = config.CONF_DIR / "loss"
LOSSES = sorted(p.stem for p in LOSS_DIR.glob("*.yaml"))


def loss_keys(option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(LOSS_DIR / f"{option}.yaml"), resolve=True)


def test_every_trl_loss_type_has_an_option():
    assert schema.loss_types() <= set(LOSSES)
    for option in LOSSES:
        header = (LOSS_DIR / f"{option}.yaml").read_text().splitlines()
        assert header[0] == "# @package train" and header[1].startswith("# ")


@pytest.mark.parametrize("option", LOSSES)
def test_switching_loss_changes_loss_keys_and_nothing_else(option):
    base, _ = config.compose(["loss=sigmoid"])
    switched, _ = config.compose([f"loss={option}"])
    before, after = dict(base.train), dict(switched.train)
    owned = set(loss_keys("sigmoid")) | set(loss_keys(option))
    assert {k: v for k, v in before.items() if k not in owned} == {
        k: v for k, v in after.items() if k not in owned
    }
    assert {k: after[k] for k in loss_keys(option)} == loss_keys(option)
    assert list(after["loss_type"]) == loss_keys(option)["loss_type"]
    config.check(switched)


def test_label_smoothing_where_trl_ignores_it_is_refused():
    cfg, _ = config.compose(["+train.label_smoothing=0.1"])
    with pytest.raises(config.ConfigError, match="use loss=robust"):
        config.check(cfg)


def test_a_loss_type_given_as_one_name_is_a_list_of_one(tmp_path):
    cfg, _ = config.compose(["loss=sigmoid", "train.loss_type=robust", "train.label_smoothing=0.1"])
    config.check(cfg)  # "robust" is not the letters r, o, b, u, s, t
    assert config.build(cfg, tmp_path).args.loss_type == ["robust"]


def test_a_loss_type_that_leaves_the_weights_of_another_is_refused_with_the_fix():
    cfg, _ = config.compose(["loss=rpo", "train.loss_type=robust"])
    with pytest.raises(
        config.ConfigError, match=r"train.loss_weights: 2 weights for 1 loss \['robust'\]; .*loss=robust"
    ):
        config.check(cfg)


def run(tmp_path, *overrides):
    cfg, recipe = config.compose(tiny_overrides("tiny_lora_dpo", *overrides))
    return train.run(cfg, tmp_path / "run", recipe)


def first_loss(trainer) -> float:
    return next(e["loss"] for e in trainer.state.log_history if "loss" in e)


@pytest.mark.slow
@pytest.mark.parametrize("option", LOSSES)
def test_every_loss_trains_with_finite_loss(option, tmp_path):
    trainer = run(tmp_path, f"loss={option}")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert trainer.state.global_step == 2 and all(math.isfinite(x) for x in losses)
    assert trainer.args.loss_type == loss_keys(option)["loss_type"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "option,expected", [("sigmoid", math.log(2)), ("cdpo", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2)]
)
def test_first_loss_matches_the_closed_form_at_policy_equals_reference(option, expected, tmp_path):
    assert first_loss(run(tmp_path, f"loss={option}")) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("epsilon", [0.1, 0.2, 0.35])
def test_cdpo_is_the_label_smoothed_sigmoid_at_any_label_smoothing(epsilon, tmp_path):
    """TRL's robust loss (as dpo_trainer.py writes it) and sigmoid, weighted as loss=cdpo builds them, equal
    -(1-e) log s(bh) - e log s(-bh) at margins -3, 0 and 2 (to 1e-6)."""
    import torch
    import torch.nn.functional as F

    cfg, _ = config.compose(["loss=cdpo", f"train.label_smoothing={epsilon}"])
    args = config.build(cfg, tmp_path).args
    assert args.loss_type == ["robust", "sigmoid"] and args.label_smoothing == epsilon
    x = torch.tensor([-3.0, 0.0, 2.0])
    robust = (-(1 - epsilon) * F.logsigmoid(x) + epsilon * F.logsigmoid(-x)) / (1 - 2 * epsilon)
    combined = args.loss_weights[0] * robust + args.loss_weights[1] * -F.logsigmoid(x)
    closed = -(1 - epsilon) * F.logsigmoid(x) - epsilon * F.logsigmoid(-x)
    assert torch.allclose(combined, closed, atol=1e-6)


def test_cdpo_weights_that_do_not_match_its_label_smoothing_are_refused():
    cfg, _ = config.compose(["loss=cdpo", "train.label_smoothing=0.2", "train.loss_weights=[-0.8,1.8]"])
    with pytest.raises(config.ConfigError, match=r"not cDPO at label_smoothing 0.2 .*leave loss_weights out"):
        config.check(cfg)
