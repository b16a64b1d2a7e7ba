import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from lesionlab.evaluation.metrics import (
    PAIRED,
    _rank_auc,
    bootstrap_ci,
    brier,
    check_policy,
    choose_threshold,
    confusion,
    expected_calibration_error,
    fit_temperature,
    metrics_with_ci,
    paired_differences,
    point_metrics,
    sensitivity_lower_bound,
)


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300), np.ones(200)].astype(int)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, len(y)), 0, 1)
    return y, p


def test_point_metrics_match_sklearn(scores):
    y, p = scores
    m = point_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    (tn, fp), (fn, tp) = confusion(y, p)
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert tn + fp + fn + tp == len(y)


def test_rank_auc_equals_sklearn_with_ties():
    s = np.array([0.9, 0.5, 0.5, 0.2, 0.5, 0.1, 0.9])
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    assert _rank_auc(s, 3) == pytest.approx(roc_auc_score(y, s))


def test_bootstrap_ci_is_seeded_and_brackets_the_value(scores):
    y, p = scores
    a = metrics_with_ci(y, p, n_resamples=300, seed=1)
    b = metrics_with_ci(y, p, n_resamples=300, seed=1)
    assert a == b
    for k in ("accuracy", "precision", "recall", "specificity", "f1", "auc"):
        lo, hi = a[k]["ci95"]
        assert lo <= a[k]["value"] <= hi and hi - lo < 0.2
    assert a["n"] == 500 and a["confusion"] == confusion(y, p)


def test_threshold_policies(scores):
    y, p = scores
    t = choose_threshold(y, p, "sensitivity:0.95")
    assert point_metrics(y, p, t)["recall"] >= 0.95
    # the threshold sits mid-gap between two validation scores: the highest score still kept as positive
    # and the next one below; any threshold in that gap gives the same counts, one above it does not
    kept = p[p >= t].min()
    below = p[p < t].max()
    assert t == pytest.approx((kept + below) / 2)
    assert confusion(y, p, kept) == confusion(y, p, t)
    assert point_metrics(y, p, kept + 1e-9)["recall"] < 0.95
    assert choose_threshold(y, p, "fixed:0.3") == 0.3
    assert 0 < choose_threshold(y, p, "youden") < 1
    with pytest.raises(ValueError, match="unknown threshold policy"):
        choose_threshold(y, p, "magic")


def test_sensitivity_lower_bound_policy_buys_a_margin(scores):
    y, p = scores
    n_pos = int(y.sum())
    t = choose_threshold(y, p, "sensitivity-lcb:0.9")
    hits = int(((p >= t) & (y == 1)).sum())
    assert sensitivity_lower_bound(np.array([hits]), n_pos)[0] >= 0.9
    assert sensitivity_lower_bound(np.array([hits - 1]), n_pos)[0] < 0.9  # the highest such threshold
    assert t <= choose_threshold(y, p, "sensitivity:0.9")
    # Clopper-Pearson: 234 of 240 is the fewest hits whose one-sided 95% lower bound reaches 0.95
    lb = sensitivity_lower_bound(np.array([0, 233, 234, 240]), 240)
    assert lb[0] == 0 and lb[1] < 0.95 <= lb[2] and lb[3] < 1
    with pytest.raises(ValueError, match="no threshold gives"):
        choose_threshold(y[270:330], p[270:330], "sensitivity-lcb:0.99")  # 30 positives: at best 0.905


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    overconfident = 3 * true_logit
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3, rel=0.15)
    before = expected_calibration_error(y, 1 / (1 + np.exp(-overconfident)))
    after = expected_calibration_error(y, 1 / (1 + np.exp(-overconfident / t)))
    assert after < before / 2 and after < 0.03
    assert brier(y, 1 / (1 + np.exp(-overconfident / t))) < brier(y, 1 / (1 + np.exp(-overconfident)))


def test_ece_of_perfect_calibration_is_small():
    rng = np.random.default_rng(1)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02


def test_bootstrap_keeps_class_counts(scores):
    y, p = scores
    ci = bootstrap_ci(y, p, n_resamples=50, seed=0)
    assert set(ci) == {"accuracy", "precision", "recall", "specificity", "f1", "auc"}


@pytest.mark.parametrize("policy", ["fixed:0.5", "youden", "sensitivity:0.95", "sensitivity:1", "sensitivity-lcb:0.9"])
def test_valid_policies_pass_the_check(policy):
    assert check_policy(policy) == policy


@pytest.mark.parametrize(
    "policy, message",
    [
        ("magic", "unknown threshold policy"),
        ("fixed:7", r"must lie in \(0, 1\)"),
        ("fixed:0", "must lie in"),
        ("sensitivity:0", r"must lie in \(0, 1\]"),
        ("sensitivity-lcb:1", "must lie in"),
        ("sensitivity:high", "needs a number"),
        ("fixed", "needs a number"),
        ("youden:2", "unknown threshold policy"),
    ],
)
def test_bad_policies_are_refused_with_the_accepted_forms(policy, message):
    with pytest.raises(ValueError, match=message) as e:
        check_policy(policy)
    assert "sensitivity:0.95" in str(e.value)  # says what to use instead


def test_a_single_class_validation_set_cannot_place_a_sensitivity_threshold():
    y, p = np.zeros(20), np.linspace(0, 1, 20)
    for policy in ("sensitivity:0.95", "youden", "sensitivity-lcb:0.9"):
        with pytest.raises(ValueError, match="both classes"):
            choose_threshold(y, p, policy)
    assert choose_threshold(y, p, "fixed:0.4") == 0.4


def test_paired_differences_are_zero_for_one_model_and_find_a_real_gain():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    before = np.clip(rng.normal(0.4 + 0.15 * y, 0.2), 0, 1)
    same = paired_differences(y, before, before, (0.5, 0.5), n_resamples=200)
    assert same is not None
    assert all(same[k] == {"value": 0.0, "ci95": [0.0, 0.0]} for k in PAIRED)
    after = np.clip(before + 0.2 * y * rng.random(400), 0, 1)  # malignant scores only rise: a real gain
    d = paired_differences(y, before, after, (0.5, 0.5), n_resamples=200)
    assert d is not None and d["auc"]["ci95"][0] > 0 and d["sensitivity"]["ci95"][0] > 0
    assert d["specificity"] == {"value": 0.0, "ci95": [0.0, 0.0]}  # benign scores did not move
    unpaired = point_metrics(y, after)["auc"] - point_metrics(y, before)["auc"]
    assert d["auc"]["value"] == pytest.approx(unpaired)
    assert d["auc"]["ci95"][0] <= d["auc"]["value"] <= d["auc"]["ci95"][1]
    # each model at its own threshold: the same scores with a threshold that flags everything lose all specificity
    own = paired_differences(y, before, before, (0.5, 0.0), n_resamples=50)
    assert own is not None and own["sensitivity"]["value"] >= 0 and own["specificity"]["value"] < 0
    assert paired_differences(np.zeros(5), before[:5], after[:5], (0.5, 0.5)) is None
