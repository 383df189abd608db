"""Hybrid KID/KIS switching (issue 5): the online detector, the schedule, ranks agreeing, resume, MNIST.

The detector rules (ds_hylo/switching.py): windows of ``switch_window`` committed steps; window
k's relative change of the summed gradient norm against window k-1 >= ``switch_threshold`` ->
KID for window k+1, else KIS; a phase's first window is critical (so windows 0 and 1 use KID);
a learning-rate change >= ``switch_threshold`` (relative) switches every layer to KID at once and
starts a new phase.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


from ds_hylo import HyLo, HyLoConfig
from ds_hylo.switching import AccordionPolicy, ModePolicy, ScheduledPolicy, SwitchEvent, build_policy

REPO = Path(__file__).resolve().parents[2]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"


from hybrid_helpers import drive, feed_lr, modes_from_history, per_step, tiny_batches, tiny_model  # noqa: E402

# --------------------------------------------------------------------------- the detector


WINDOW = 2
# Window sums per layer and what the rule must make of them (threshold 0.5):
#   a: 4, 4 (0.0 -> KIS), 8 (1.0 -> KID), 8 (0.0 -> KIS), 2 (0.75 -> KID), 2.5 (0.25 -> KIS)
#   b: 10, 14 (0.4 -> KIS), 21 (exactly 0.5 -> KID), 31.5 (exactly 0.5 -> KID), 31.5 (0 -> KIS), 31.5
#   c: 10, 10 (0 -> KIS), 14.999 (0.4999, just under -> KIS), 14.999, 14.999, 14.999
SUMS = {
    "a": [4.0, 4.0, 8.0, 8.0, 2.0, 2.5],
    "b": [10.0, 14.0, 21.0, 31.5, 31.5, 31.5],
    "c": [10.0, 10.0, 14.999, 14.999, 14.999, 14.999],
}
# A decision at the end of window k applies from step (k + 1) * WINDOW.
EXPECTED_LAYER_HISTORY = [
    SwitchEvent(0, "*", "kid"),
    SwitchEvent(4, "a", "kis"), SwitchEvent(4, "b", "kis"), SwitchEvent(4, "c", "kis"),
    SwitchEvent(6, "a", "kid"), SwitchEvent(6, "b", "kid"),
    SwitchEvent(8, "a", "kis"),
    SwitchEvent(10, "a", "kid"), SwitchEvent(10, "b", "kis"),
    SwitchEvent(12, "a", "kis"),
]


def test_detector_per_layer_switches_exactly_where_the_rule_says():
    norms = {name: per_step(sums, WINDOW) for name, sums in SUMS.items()}
    policy = AccordionPolicy(list(SUMS), window=WINDOW, threshold=0.5, scope="layer")
    seen = drive(policy, norms)
    steps = len(norms["a"])
    assert policy.history == EXPECTED_LAYER_HISTORY
    assert seen == modes_from_history(EXPECTED_LAYER_HISTORY, list(SUMS), steps)
    # The first two windows (the first is critical by definition) use KID everywhere.
    assert all(set(modes.values()) == {"kid"} for modes in seen[: 2 * WINDOW])
    # One decision record per window, with the relative changes the rule used.
    assert [(d["start"], d["end"]) for d in policy.decisions] == [(k * WINDOW, (k + 1) * WINDOW) for k in range(6)]
    assert policy.decisions[0]["phase_first"] and policy.decisions[0]["change"]["a"] is None
    assert policy.decisions[2]["change"]["b"] == 0.5 and policy.decisions[2]["critical"]["b"]
    assert policy.decisions[2]["change"]["c"] == pytest.approx(0.4999) and not policy.decisions[2]["critical"]["c"]
    assert [d["next_modes"]["a"] for d in policy.decisions] == ["kid", "kis", "kid", "kis", "kid", "kis"]
    log = policy.switch_log()
    assert log[0]["reason"] == "start" and {e["reason"] for e in log[1:]} == {"norm"}


def test_detector_global_scope_decides_once_for_all_layers():
    sums = {"a": SUMS["a"], "b": SUMS["b"]}
    # Totals 14, 18 (0.286 -> KIS), 29 (0.611 -> KID), 39.5 (0.362 -> KIS), 33.5 (0.152), 34 (0.015).
    norms = {name: per_step(s, WINDOW) for name, s in sums.items()}
    policy = AccordionPolicy(list(sums), window=WINDOW, threshold=0.5, scope="global")
    seen = drive(policy, norms)
    expected = [SwitchEvent(0, "*", "kid"), SwitchEvent(4, "*", "kis"), SwitchEvent(6, "*", "kid"),
                SwitchEvent(8, "*", "kis")]
    assert policy.history == expected
    assert seen == modes_from_history(expected, list(sums), len(norms["a"]))
    assert all(modes["a"] == modes["b"] for modes in seen)
    assert list(policy.decisions[1]["sums"]) == ["*"] and policy.decisions[1]["sums"]["*"] == 18.0
    # The per-layer rule would have switched b back to KID at step 6 but a to KIS at 8: global does not.
    layer_policy = AccordionPolicy(list(sums), window=WINDOW, threshold=0.5, scope="layer")
    drive(layer_policy, norms)
    assert layer_policy.history != policy.history


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("second_sum, expected_mode", [(15.0, "kid"), (5.0, "kid"), (14.99, "kis"), (5.01, "kis")])
def test_detector_exactly_at_threshold_is_critical(scope, second_sum, expected_mode):
    # Window sums 10 -> 10 -> second_sum: |second_sum - 10| / 10 = 0.5 exactly for 15 and 5 (exact in
    # binary: per-step values 2.5 / 3.75 / 1.25 add up without rounding).
    sums = [10.0, 10.0, second_sum, second_sum]
    norms = {"only": per_step(sums, 4)}
    policy = AccordionPolicy(["only"], window=4, threshold=0.5, scope=scope)
    seen = drive(policy, norms)
    assert [m["only"] for m in seen] == ["kid"] * 8 + ["kis"] * 4 + [expected_mode] * 4


def test_detector_zero_and_nonfinite_sums():
    policy = AccordionPolicy(["dead", "born", "bad"], window=1, threshold=0.5)
    drive(policy, {"dead": [0.0, 0.0, 0.0], "born": [0.0, 0.0, 1.0], "bad": [1.0, 1.0, math.nan]})
    # dead: 0 -> 0 is no change (KIS); born: 0 -> 1 is an infinite change (KID); NaN counts as critical.
    assert policy.current == {"dead": "kis", "born": "kid", "bad": "kid"}
    assert policy.decisions[-1]["change"]["born"] == math.inf


def test_discard_step_drops_that_steps_observations():
    norms = {name: per_step(sums, WINDOW) for name, sums in SUMS.items()}
    lrs = [0.1] * len(norms["a"])
    clean = AccordionPolicy(list(SUMS), window=WINDOW, threshold=0.5)
    clean_seen = drive(clean, norms, lrs=lrs)
    # Skipped steps with absurd norms and a 1e8x smaller lr, including mid-window and at window ends.
    skipped = AccordionPolicy(list(SUMS), window=WINDOW, threshold=0.5)
    skipped_seen = drive(skipped, norms, lrs=lrs, discard={0, 3, 5, 6, 11})
    assert skipped.history == clean.history == EXPECTED_LAYER_HISTORY
    assert skipped_seen == clean_seen
    assert skipped.decisions == clean.decisions
    assert skipped.lr_changes == []
    # A pending (undecided) lr change reports KID for that step's refresh, then is forgotten on discard.
    skipped.observe_lr(1e-3)
    assert skipped.mode_for("a", 12) == "kid"
    skipped.discard_step()
    assert skipped.mode_for("a", 12) == "kis"


def test_learning_rate_drop_switches_to_kid_at_once_and_restarts_the_window():
    window, steps, drop = 4, 28, 14  # the drop falls in the middle of window [12, 16)
    norms = {"a": [1.0] * steps, "b": [2.0] * steps}  # flat norms: rule 1 alone says KIS from step 8 on
    lrs = [0.1 if s < drop else 0.01 for s in range(steps)]
    policy = AccordionPolicy(["a", "b"], window=window, threshold=0.5)
    seen = drive(policy, norms, lrs=lrs)
    assert policy.history == [
        SwitchEvent(0, "*", "kid"),
        SwitchEvent(8, "a", "kis"), SwitchEvent(8, "b", "kis"),
        SwitchEvent(drop, "a", "kid"), SwitchEvent(drop, "b", "kid"),  # the drop step's refresh already uses KID
        SwitchEvent(drop + 2 * window, "a", "kis"), SwitchEvent(drop + 2 * window, "b", "kis"),
    ]
    assert [log["reason"] for log in policy.switch_log()] == ["start", "norm", "norm", "lr", "lr", "norm", "norm"]
    assert seen[drop] == {"a": "kid", "b": "kid"} and seen[drop - 1] == {"a": "kis", "b": "kis"}
    # The partial window [12, 14) is dropped; windows restart at the drop.
    assert [(d["start"], d["end"]) for d in policy.decisions] == [(0, 4), (4, 8), (8, 12), (14, 18), (18, 22),
                                                                 (22, 26)]
    assert policy.decisions[3]["phase_first"]
    assert policy.lr_changes == [{"step": drop, "lr": 0.01, "previous_lr": 0.1}]
    assert policy.lr_reference == 0.01


def test_learning_rate_changes_below_threshold_accumulate_against_the_phase_start():
    # A smooth decay (x0.9 per step) triggers when the lr has fallen by >= 50% since the phase began.
    steps = 20
    lrs = [0.1 * 0.9**s for s in range(steps)]
    policy = AccordionPolicy(["a"], window=100, threshold=0.5)
    drive(policy, {"a": [1.0] * steps}, lrs=lrs)
    # 0.9^6 = 0.531 (change 0.469), 0.9^7 = 0.478 (change 0.522): triggers at steps 7 and 14.
    assert [c["step"] for c in policy.lr_changes] == [7, 14]
    # Warm-up jumps count too (relative change of an increase).
    up = AccordionPolicy(["a"], window=100, threshold=0.5)
    drive(up, {"a": [1.0] * 4}, lrs=[0.1, 0.14, 0.16, 0.17])
    assert [c["step"] for c in up.lr_changes] == [2]


def test_policy_validates_its_arguments():
    with pytest.raises(ValueError, match="switch_scope"):
        AccordionPolicy(["a"], window=2, threshold=0.5, scope="model")
    with pytest.raises(ValueError, match="switch_window"):
        AccordionPolicy(["a"], window=0, threshold=0.5)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="switch_threshold"):
            AccordionPolicy(["a"], window=2, threshold=bad)


# --------------------------------------------------------------------------- schedule


def test_scheduled_policy_uses_kid_inside_the_ranges_only():
    policy = ScheduledPolicy([(0, 5), (10, 12)])
    modes = [policy.mode_for("any", s) for s in range(15)]
    assert modes == ["kid"] * 5 + ["kis"] * 5 + ["kid"] * 2 + ["kis"] * 3
    assert policy.history == [SwitchEvent(0, "*", "kid"), SwitchEvent(5, "*", "kis"), SwitchEvent(10, "*", "kid"),
                              SwitchEvent(12, "*", "kis")]
    late = ScheduledPolicy([[3, 4]])
    assert [late.mode_for("x", s) for s in range(6)] == ["kis"] * 3 + ["kid"] + ["kis"] * 2
    assert late.history[0] == SwitchEvent(0, "*", "kis")
    # Observations and lr changes do not move a schedule.
    late.observe("x", 1e9)
    late.observe_lr(1e-9)
    late.end_step(3)
    assert late.mode_for("x", 3) == "kid"


def test_only_the_online_policy_asks_for_gradient_norms():
    assert not ModePolicy("kis").needs_grad_norms
    assert not ScheduledPolicy([(0, 1)]).needs_grad_norms
    assert AccordionPolicy(["a"], window=2, threshold=0.5).needs_grad_norms


def test_build_policy_picks_the_policy_from_the_config():
    assert isinstance(build_policy(HyLoConfig(mode="kis"), ["a"]), ModePolicy)
    assert isinstance(build_policy(HyLoConfig(mode="hybrid", kid_schedule=[[0, 10]]), ["a"]), ScheduledPolicy)
    config = HyLoConfig(mode="hybrid", switch_window=7, switch_threshold=0.3, switch_scope="global")
    policy = build_policy(config, ["a"])
    assert isinstance(policy, AccordionPolicy)
    assert (policy.window, policy.threshold, policy.scope) == (7, 0.3, "global")


def test_scheduled_hybrid_through_the_optimizer():
    model = tiny_model()
    opt = HyLo(model, lr=0.05, mode="hybrid", kid_schedule=[[0, 4]], update_freq=2, rank_ratio=0.5)
    used = []
    for step, (x, y) in enumerate(tiny_batches(8)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 2 == 0:
            used.append(set(opt.layer_modes().values()))
    assert used == [{"kid"}, {"kid"}, {"kis"}, {"kis"}]


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("options, key", [
    (dict(switch_scope="layers"), "switch_scope"),
    (dict(switch_scope=None), "switch_scope"),
    (dict(switch_threshold=0.0), "switch_threshold"),
    (dict(switch_threshold=-0.5), "switch_threshold"),
    (dict(switch_threshold=float("nan")), "switch_threshold"),
    (dict(switch_threshold="0.5"), "switch_threshold"),
    (dict(switch_window=0), "switch_window"),
    (dict(switch_window=2.5), "switch_window"),
    (dict(kid_schedule=[[5, 2]]), "kid_schedule"),
])
def test_bad_hybrid_config_raises_naming_the_key(options, key):
    with pytest.raises(ValueError, match=key):
        HyLo(tiny_model(), mode="hybrid", **options)
    with pytest.raises(ValueError, match=key):  # the DeepSpeed JSON path
        HyLoConfig.from_dict({"mode": "hybrid", **options})


# --------------------------------------------------------------------------- resume


def _train_hybrid(model, opt, batches, start: int, drop_at: int) -> list[dict]:
    modes = []
    for step, (x, y) in enumerate(batches, start=start):
        if step == drop_at:
            for group in opt.param_groups:
                group["lr"] *= 0.1
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        feed_lr(opt)
        opt.step()
        modes.append(opt.layer_modes())
    return modes


def test_state_survives_save_and_load_mid_window():
    options = dict(lr=0.2, base="sgd", momentum=0.9, mode="hybrid", rank_ratio=0.5, update_freq=2, damping=0.1, seed=4,
                   switch_window=3, switch_threshold=0.15)
    steps, save_at, drop_at = 20, 7, 13  # step 7 is one step into the window [6, 9)
    batches = tiny_batches(steps, seed=2)

    straight = tiny_model()
    straight_opt = HyLo(straight, **options)
    straight_modes = _train_hybrid(straight, straight_opt, batches, 0, drop_at)

    first = tiny_model()
    first_opt = HyLo(first, **options)
    first_modes = _train_hybrid(first, first_opt, batches[:save_at], 0, drop_at)
    assert first_opt.preconditioner.policy.window_steps == 1, "the checkpoint must fall inside a window"
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = tiny_model(seed=123)  # different weights: everything must come from the checkpoint
    resumed_opt = HyLo(resumed, **options)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    resumed_modes = first_modes + _train_hybrid(resumed, resumed_opt, batches[save_at:], save_at, drop_at)

    a, b = straight_opt.preconditioner.policy, resumed_opt.preconditioner.policy
    assert resumed_modes == straight_modes
    assert a.history == b.history and a.switch_log() == b.switch_log()
    assert a.decisions == b.decisions and a.lr_changes == b.lr_changes
    assert {e.mode for e in a.history[1:]} == {"kid", "kis"}, "the run never switched: the test would not cover it"
    assert [c["step"] for c in a.lr_changes] == [drop_at]
    assert torch.equal(a.window_sums, b.window_sums)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_policy_state_rejects_a_different_scope_or_policy():
    policy = AccordionPolicy(["a"], window=2, threshold=0.5, scope="layer")
    state = policy.state_dict()
    with pytest.raises(ValueError, match="switch_scope"):
        AccordionPolicy(["a"], window=2, threshold=0.5, scope="global").load_state_dict(state)
    with pytest.raises(ValueError, match="scheduled"):
        ScheduledPolicy([(0, 1)]).load_state_dict(state)
    with pytest.raises(ValueError, match="layers"):
        AccordionPolicy(["b"], window=2, threshold=0.5).load_state_dict(state)


def test_preconditioner_feeds_the_learning_rate_to_the_policy():
    model = tiny_model()
    opt = HyLo(model, lr=0.1, mode="hybrid", switch_window=100, update_freq=2)
    for step, (x, y) in enumerate(tiny_batches(4)):
        if step == 2:
            opt.param_groups[0]["lr"] = 0.01
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # no feed_lr
    assert [c["step"] for c in opt.preconditioner.policy.lr_changes] == [2]


# --------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist_subset():
    if not MNIST_DIR.is_dir():
        pytest.skip(f"MNIST not found in {MNIST_DIR}")
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import data  # noqa: PLC0415
    finally:
        sys.path.remove(str(REPO / "examples"))
    train_x, train_y, _, _ = data.load_mnist(MNIST_DIR)
    return train_x[:8192], train_y[:8192]


def test_mnist_hybrid_kid_then_kis_then_kid_after_lr_drop(mnist_subset):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import models  # noqa: PLC0415
    finally:
        sys.path.remove(str(REPO / "examples"))
    steps, drop, window, batch, update_freq = 300, 200, 25, 64, 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = models.MnistCNN()
        opt = HyLo(model, lr=0.05, base="sgd", momentum=0.9, mode="hybrid", damping=0.03, switch_window=window, update_freq=update_freq)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[drop], gamma=0.1)
        x_all, y_all = mnist_subset
        order = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(0))
        refresh_modes = {}
        for step in range(steps):
            idx = order[(step * batch) % x_all.shape[0]:][:batch]
            opt.zero_grad()
            F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            feed_lr(opt)
            opt.step()
            scheduler.step()
            if step % update_freq == 0:
                refresh_modes[step] = opt.layer_modes()
    finally:
        torch.set_num_threads(threads)

    policy = opt.preconditioner.policy
    layers = list(opt.preconditioner.layers)
    log = policy.switch_log()
    # Starts in KID everywhere.
    assert log[0] == {"step": 0, "layer": "*", "mode": "kid", "reason": "start"}
    assert set(refresh_modes[0].values()) == {"kid"}
    # Every layer moves to KIS once its gradient norm settles, well before the drop ...
    before_drop = {name: [e["mode"] for e in log if e["layer"] in (name, "*") and e["step"] < drop] for name in layers}
    assert before_drop == {name: ["kid", "kis"] for name in layers}, log
    assert set(refresh_modes[drop - update_freq].values()) == {"kis"}
    # ... and back to KID at the drop (the learning-rate rule), from the drop step's refresh on ...
    at_drop = [e for e in log if e["step"] == drop]
    assert {(e["layer"], e["mode"], e["reason"]) for e in at_drop} == {(name, "kid", "lr") for name in layers}
    assert set(refresh_modes[drop].values()) == {"kid"}
    # ... then KIS again once the norm settles at the new learning rate.
    assert set(refresh_modes[steps - update_freq].values()) == {"kis"}
    # The gradient-norm rule alone could not have seen the drop: the windowed norm sums around it
    # change by much less than the threshold.
    before = next(d for d in policy.decisions if d["end"] == drop)
    after = next(d for d in policy.decisions if d["start"] == drop)
    for name in layers:
        change = abs(after["sums"][name] - before["sums"][name]) / before["sums"][name]
        assert change < policy.threshold, (name, change)
