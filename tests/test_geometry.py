"""geometry.py: AUROC and probes against their definitions, and the three runs end to end on a tiny model."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import studies.geometry as geo
from runtime.session import open_session
from studies import steering


def test_auroc_is_the_mann_whitney_probability():
    labels = [1, 1, 0, 0, 1]
    scores = [0.9, 0.4, 0.5, 0.1, 0.5]
    # positive/negative pairs: (0.9,0.5) (0.9,0.1) (0.4,0.5) (0.4,0.1) (0.5,0.5) (0.5,0.1) -> 1+1+0+1+0.5+1 = 4.5 of 6
    assert geo.auroc(labels, scores) == pytest.approx(4.5 / 6)
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    y, s = rng.random(200) < 0.3, rng.normal(size=200).round(1)     # rounding makes ties
    assert geo.auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_auroc_metric_has_interval_and_point_biserial_r():
    rng = np.random.default_rng(1)
    y = rng.random(120) < 0.5
    s = y + rng.normal(size=120)
    m = geo.auroc_metric(y, s, n_boot=500)
    assert m["ci"][0] < m["value"] < m["ci"][1] and m["n"] == 120 and m["n_pos"] + m["n_neg"] == 120
    assert m["r"] == pytest.approx(np.corrcoef(y.astype(float), s)[0, 1]) and m["p"] < 1e-3
    one_class = geo.auroc_metric([True] * 5 + [False], [1, 2, 3, 4, 5, 6])
    assert one_class["value"] is None and one_class["n_neg"] == 1          # undefined, never a made-up number


def test_probe_finds_a_separable_signal_and_not_shuffled_labels():
    rng = np.random.default_rng(2)
    N = 60
    base = rng.normal(size=(N, 10))
    X = np.r_[base + np.eye(10)[0] * 4, base]            # pair i: (i, N + i); Bayes accuracy about 0.98
    y, groups = np.r_[np.ones(N, int), np.zeros(N, int)], np.r_[np.arange(N), np.arange(N)]
    assert geo.probe_accuracy(X, y, groups, seed=0).mean() > 0.9
    assert abs(geo.probe_accuracy(X, y, groups, seed=0, shuffle=True).mean() - 0.5) < 0.2


def test_shuffled_control_vector_swaps_answers():
    pos, neg = torch.ones(4, 1, 3), torch.zeros(4, 1, 3)
    letters = np.array(["A", "B", "A", "B"])
    flip = np.array([True, True, False, False])
    v = geo.vector_of(pos, neg, letters, np.arange(4), flip)
    assert torch.allclose(v, torch.zeros(1, 3))          # two pairs swapped, two kept: the difference cancels
    assert torch.allclose(geo.vector_of(pos, neg, letters, np.arange(4)), torch.ones(1, 3))


@pytest.fixture(scope="module")
def made(tiny_chat, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    cfg = steering.SteerConfig(model=str(tiny_chat[0]), out=str(out), n=12, n_test=8, layers="0,2")
    s = open_session(cfg)
    result, path = steering.vectors_run(cfg, s)
    gcfg = geo.GeometryConfig(model=str(tiny_chat[0]), out=str(out), n=8, n_ood=6, n_boot=50, n_splits=3,
                              max_new_tokens=3, vector=str(path.with_suffix(".safetensors")))
    return gcfg, s, path


def test_predict_run(made):
    cfg, s, _ = made
    result, path = geo.predict_run(cfg, s)
    m = result["metrics"]
    assert "auroc_prompt[in_distribution,L0]" in m and "auroc_continuation[out_of_distribution,L2]" in m
    assert m["sycophantic_rate[in_distribution]"]["n"] == len([r for r in result["items"]
                                                               if r["set"] == "in_distribution"])
    assert path.with_suffix(".png").exists()
    row = result["items"][0]
    assert set(row["cos_prompt"]) == {"0", "2"} and row["cos_prompt"] != row["cos_continuation"]


def test_consistency_and_geometry_runs(made):
    cfg, s, vec_path = made
    result, path = geo.consistency_run(replace(cfg, layers="0,2", n=16), s)
    m = result["metrics"]
    assert "split_half[n4,L2]" in m and "cos[arithmetic_vs_facts,L0]" in m and "cos[real_vs_shuffled_labels,L2]" in m
    assert path.with_suffix(".png").exists()
    acts = vec_path.parent / (vec_path.stem + ".acts.safetensors")
    result, path = geo.geometry_run(replace(cfg, acts=str(acts)), s)
    assert {"probe_accuracy[L0]", "probe_accuracy_shuffled[L2]"} <= set(result["metrics"])
    assert set(result["projections"]) == {"0", "2"} and path.with_suffix(".png").exists()
