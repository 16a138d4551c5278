"""report.py: intervals against hand computations, the results files (no overwrite, atomic, resumable), and
compare / report on small hand-made result files. Offline, a few seconds."""
import json
import math
import os
import time

import numpy as np
import pytest

from lab import report
from lab.report import compare
from lab.results import Checkpoint, done_ids, read_partial, write_result
from lab.stats import bootstrap_mean, correlation, mean_metric, paired_difference, proportion_metric, wilson

# ------------------------------------------------------------------------------------------------- intervals


def test_wilson_hand_computed():
    # center = (8 + 1.9208) / 13.8416 = 0.71674, half = 1.96 / 13.8416 * sqrt(1.6 + 0.9604) = 0.22658
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # k = 0: lo is exactly 0, hi = z² / (n + z²) = 3.8416 / 13.8416; k = n mirrors it
    assert wilson(0, 10) == pytest.approx((0.0, 3.8416 / 13.8416), abs=1e-12)
    assert wilson(10, 10) == pytest.approx((1 - 3.8416 / 13.8416, 1.0), abs=1e-12)
    assert all(math.isnan(v) for v in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_bootstrap_contains_mean_and_is_reproducible():
    x = np.random.default_rng(1).normal(0.3, 1.0, size=200)
    lo, hi = bootstrap_mean(x, seed=5)
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / math.sqrt(len(x)), rel=0.1)  # ~ the normal interval
    assert bootstrap_mean(x, seed=5) == (lo, hi)
    assert bootstrap_mean(x, seed=6) != (lo, hi)
    assert bootstrap_mean([0.7]) == (0.7, 0.7)
    assert all(math.isnan(v) for v in bootstrap_mean([]))


def test_metric_builders_skip_missing():
    m = proportion_metric([True, False, None, 1, 0, None])
    assert m == {"value": 0.5, "ci": list(wilson(2, 4)), "n": 4, "kind": "proportion", "n_missing": 2}
    with pytest.raises(ValueError):
        proportion_metric([0.5, 1])
    m = mean_metric([0.2, None, 0.4, 0.9], seed=0)
    assert (m["value"], m["n"], m["n_missing"], m["kind"]) == (pytest.approx(0.5), 3, 1, "mean")
    assert m["ci"][0] <= 0.5 <= m["ci"][1]
    assert mean_metric([None, None]) == {"value": None, "ci": None, "n": 0, "kind": "mean", "n_missing": 2}
    with pytest.raises(ValueError, match="None"):
        mean_metric([0.1, float("nan")])


def test_paired_difference_by_hand():
    a = {"q1": 0.5, "q2": 0.2, "q3": 0.9, "q4": None, "only_a": 1.0}
    b = {"q1": 0.7, "q2": 0.2, "q3": 0.6, "q4": 0.3, "only_b": 0.0}
    d = paired_difference(a, b, seed=0)
    # pairs q1, q2, q3: differences +0.2, 0, -0.3 -> mean -0.1/3
    assert d["value"] == pytest.approx(-0.1 / 3)
    assert (d["n"], d["n_unpaired"], d["n_up"], d["n_down"]) == (3, 3, 1, 1)
    assert d["ci"][0] <= d["value"] <= d["ci"][1]
    assert d["ci"] == pytest.approx(bootstrap_mean([0.2, 0.0, -0.3], seed=0))  # the paired bootstrap is over the d_i
    assert paired_difference({"x": 1}, {"y": 1})["value"] is None


def test_correlation_by_hand():
    # n = 4: r = 4 / sqrt(5 * 5) = 0.8, t = 0.8 sqrt(2 / 0.36); with 2 df, p = 1 - |t| / sqrt(t² + 2) = 0.2
    c = correlation([1, 2, 3, 4], [1, 3, 2, 4])
    assert (c["r"], c["p"], c["n"]) == (pytest.approx(0.8), pytest.approx(0.2), 4)
    # n = 3: r = 0.5, t = 1/sqrt(3); with 1 df (Cauchy), p = 1 - (2/pi) atan(|t|) = 1 - 1/3
    c = correlation([1, 2, 3], [1, 3, 2])
    assert (c["r"], c["p"]) == (pytest.approx(0.5), pytest.approx(2 / 3))
    c = correlation([1, 2, 3, 4], [1, 9, 4, 16], method="spearman")  # ranks 1 3 2 4: as the first case
    assert (c["r"], c["p"]) == (pytest.approx(0.8), pytest.approx(0.2))
    with pytest.raises(ValueError, match="n >= 3"):
        correlation([1, 2], [2, 1])
    with pytest.raises(ValueError, match="constant"):
        correlation([1, 2, 3], [5, 5, 5])


# -------------------------------------------------------------------------------------------- results files


def test_write_result_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20250101-000000")  # both writes in the same second
    p1 = write_result(tmp_path, "run", {"metrics": {}, "k": 1})
    p2 = write_result(tmp_path, "run", {"metrics": {}, "k": 2})
    assert (p1.name, p2.name) == ("run-20250101-000000.json", "run-20250101-000000-2.json")
    assert [json.loads(p.read_text())["k"] for p in (p1, p2)] == [1, 2]
    assert {f.name for f in tmp_path.iterdir()} == {p1.name, p2.name}  # no temp files left


@pytest.mark.parametrize("fail", ["fsync", "link"])
def test_write_result_is_atomic(tmp_path, monkeypatch, fail):
    (tmp_path / "run.partial.jsonl").write_text('{"config": null}\n')

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, fail, full_disk)
    with pytest.raises(OSError, match="No space left") as e:
        write_result(tmp_path, "run", {"metrics": {}})
    assert str(tmp_path / "run-") in str(e.value) and e.value.errno == 28
    assert [f.name for f in tmp_path.iterdir()] == ["run.partial.jsonl"]  # nothing new; the progress is kept
    with pytest.raises(TypeError):  # unserializable: fails before any file is made
        write_result(tmp_path, "run", {"metrics": {}, "x": object()})
    assert [f.name for f in tmp_path.iterdir()] == ["run.partial.jsonl"]


def test_checkpoint_resumes_after_a_torn_line(tmp_path):
    ck = Checkpoint(tmp_path, "run", config={"seed": 0, "layers": (13, 14)})
    for i in range(3):
        ck.add({"id": i, "p_match": i / 10})
    with pytest.raises(ValueError):
        ck.add({"id": 1, "p_match": 0.0})  # done already
    with open(ck.path, "a") as f:
        f.write('{"id": 3, "p_mat')  # killed mid-write
    with pytest.warns(UserWarning, match="torn"):
        header, rows, n_bad = read_partial(ck.path)
    assert (header["config"], [r["id"] for r in rows], n_bad) == ({"seed": 0, "layers": [13, 14]}, [0, 1, 2], 1)
    with pytest.warns(UserWarning):
        assert done_ids(ck.path) == {0, 1, 2}
    assert done_ids(tmp_path / "none.partial.jsonl") == set()

    with pytest.warns(UserWarning):
        ck = Checkpoint(tmp_path, "run", config={"seed": 0, "layers": (13, 14)})  # resumes, drops the torn line
    assert ck.done == {0, 1, 2}
    ck.add({"id": 3, "p_match": 0.3})
    header, rows, n_bad = read_partial(ck.path)  # clean now: no warning, the new row on its own line
    assert ([r["id"] for r in rows], n_bad) == ([0, 1, 2, 3], 0)
    with pytest.raises(ValueError, match="another config"):
        Checkpoint(tmp_path, "run", config={"seed": 1, "layers": [13, 14]})
    write_result(tmp_path, "run", {"metrics": {}, "items": ck.rows})
    assert not ck.path.exists()


# ----------------------------------------------------------------------------------------------- comparison


def _result(items, **metrics):
    return {"config": {}, "provenance": {"git_commit": "0123456789abcdef", "model_dir": "models/tiny", "seed": 0},
            "metrics": metrics, "items": items, "timing": {"seconds": 12.0}}


def _two_runs(tmp_path):
    a = [dict(id=i, correct=c, p_match=p) for i, (c, p) in enumerate(zip([1, 0, 1, None, 1], [.6, .4, .7, .5, .8]))]
    b = [dict(id=i, correct=c, p_match=p) for i, (c, p) in enumerate(zip([1, 1, 1, 0, 1], [.7, .5, .7, .4, .9]))]
    paths = []
    for name, items in (("before", a), ("after", b)):
        r = _result(items, correct=proportion_metric([it["correct"] for it in items]),
                    p_match=mean_metric([it["p_match"] for it in items]), only_here=mean_metric([1.0]))
        if name == "after":
            del r["metrics"]["only_here"]
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    return paths


def test_compare_pairs_items(tmp_path):
    cmp = compare(_two_runs(tmp_path), seed=0)
    d = cmp["metrics"]["p_match"]["diffs"][1]  # +0.1 +0.1 0 -0.1 +0.1
    assert (d["value"], d["n"], d["n_up"], d["n_down"]) == (pytest.approx(0.04), 5, 3, 1)
    d = cmp["metrics"]["correct"]["diffs"][1]  # item 3 failed to parse before: 4 pairs, one went 0 -> 1
    assert (d["value"], d["n"], d["n_unpaired"]) == (pytest.approx(0.25), 4, 1)
    assert cmp["not_in_all"] == ["only_here"] and cmp["correlations"] == []
    cmp = compare(_two_runs(tmp_path), metric_item_keys={"correct": "no_such_key"})
    assert cmp["metrics"]["correct"]["diffs"] == [None, None]


def test_compare_correlates_per_run_changes(tmp_path):
    # baseline (0, 0), then four runs changing x by 1 2 3 4 and y by 1 3 2 4: r = 0.8, p = 0.2 (see above)
    paths = []
    for i, (x, y) in enumerate([(0, 0), (1, 1), (2, 3), (3, 2), (4, 4)]):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(_result([], cap={"value": x, "n": 10}, syc={"value": y, "n": 10})))
    (c,) = compare(paths)["correlations"]
    assert (c["x"], c["y"], c["r"], c["p"], c["n"]) == ("cap", "syc", pytest.approx(0.8), pytest.approx(0.2), 4)
    (c,) = compare(paths[:3], correlate=[("cap", "syc")])["correlations"]  # 2 changes: refused, said in the report
    assert c["r"] is None and "n >= 3" in c["error"]
    md = report.render_comparison(compare(paths))
    assert "| cap | syc | +0.800 | 0.2 | 4 | pearson |" in md


def test_cli_compare_and_report(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    out = tmp_path / "cmp" / "compare.md"
    report.main(["compare", str(a), str(b), f"--out={out}"])
    md = out.read_text()
    assert md in capsys.readouterr().out  # printed too
    lines = md.splitlines()
    # Wilson by hand: 3/4 -> (0.30063, 0.95441), 4/5 -> (0.37553, 0.96377)
    assert "| correct | 0.750 [0.301, 0.954] n=4 (1 missing) | 0.800 [0.376, 0.964] n=5 |" in lines
    assert "| before | tiny | 01234567 | 0 | 5 | 12 |" in lines
    row = next(line for line in lines if line.startswith("| p_match | p_match | "))
    assert row.startswith("| p_match | p_match | +0.040 [") and row.endswith(" n=5 (3↑ 1↓) |")
    assert "| only_here | 1.000 [1.000, 1.000] n=1 | – |" in lines
    assert "Not in every run (not compared): only_here" in lines
    assert (out.parent / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bench = tmp_path / "bench.json"  # not a results file: skipped with a note, not a crash
    bench.write_text(json.dumps({"rows": []}))
    report.main(["report", str(a), str(b), str(bench), f"--out={tmp_path / 'report.md'}"])
    assert "skipping" in capsys.readouterr().err
    assert "| metric: value [95% CI] n | before | after |" in (tmp_path / "report.md").read_text().splitlines()
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_plot_curve(tmp_path):
    mults = [-1, 0, 1]
    ys = [[0.6, 0.75, 0.8], [0.7, 0.75, 0.77]]
    cis = [[(y - 0.05, y + 0.05) for y in line] for line in ys]
    dest = report.plot_curve(mults, ys, cis, ["layer 13", "layer 14"], tmp_path / "sweep.png",
                             "multiplier", "p(match)")
    assert dest.read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_changed_inputs_and_names_file_and_hashes(tmp_path):
    from lab.results import input_hashes, sha256
    data = tmp_path / "items.jsonl"
    data.write_text('{"q": 1}\n')
    ck = Checkpoint(tmp_path / "out", "run", config={"seed": 0}, inputs=input_hashes(None, [data]))
    ck.add({"id": 0})
    before = sha256(data)
    data.write_text('{"q": 2}\n')                      # edited between the kill and the resume
    with pytest.raises(ValueError, match="items.jsonl changed since the run started") as e:
        Checkpoint(tmp_path / "out", "run", config={"seed": 0}, inputs=input_hashes(None, [data]))
    assert before in str(e.value) and sha256(data) in str(e.value)
    data.write_text('{"q": 1}\n')                      # restored: resumes
    assert Checkpoint(tmp_path / "out", "run", config={"seed": 0}, inputs=input_hashes(None, [data])).done == {0}


def test_weights_hash_is_cached_beside_the_weights_and_redone_when_they_change(tmp_path):
    from lab.results import WEIGHTS_CACHE, weights_sha256, sha256
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"x" * 100)
    assert weights_sha256(tmp_path) == {"model.safetensors": sha256(w)}
    assert (tmp_path / WEIGHTS_CACHE).exists()
    w.write_bytes(b"y" * 101)                                                # another file: another size
    assert weights_sha256(tmp_path) == {"model.safetensors": sha256(w)}


def test_publish_together_leaves_all_or_none_when_the_disk_fills(tmp_path, monkeypatch):
    from conftest import disk_full_on_link
    from lab import results
    paths = results.publish_together(tmp_path, "vectors", {".safetensors": b"v", ".acts.safetensors": b"a",
                                                           ".json": b"{}"})
    assert {p.read_bytes() for p in paths.values()} == {b"v", b"a", b"{}"}
    assert len({p.name.removesuffix(s) for s, p in paths.items()}) == 1          # one stem for the three
    disk_full_on_link(monkeypatch, 3)
    before = set(tmp_path.iterdir())
    with pytest.raises(OSError, match="none of the run's 3 files was left"):
        results.publish_together(tmp_path, "vectors", {".safetensors": b"v", ".acts.safetensors": b"a",
                                                       ".json": b"{}"})
    assert set(tmp_path.iterdir()) == before                                     # no orphan, no temp file


def test_ratio_of_means_and_its_paired_bootstrap():
    from lab.stats import ratio_of_means
    num, den = [1.0, 2.0, 3.0, 2.0], [2.0, 4.0, 5.0, 5.0]
    got = ratio_of_means(num, den, seed=0, n_boot=2000)
    assert got["value"] == pytest.approx(8 / 16) and got["n"] == 4 and got["kind"] == "ratio"
    lo, hi = got["ci"]
    assert lo <= 0.5 <= hi and hi - lo < 0.2        # the items move together: a narrow interval
    assert ratio_of_means([1.0], [0.0])["value"] is None
    with pytest.raises(ValueError, match="numerators"):
        ratio_of_means([1.0], [1.0, 2.0])
