"""The quality sweep: rows for every run, resumability, a row that says why, and the files it writes."""

import json
from dataclasses import replace

import pytest

from compemb.bench.quality import run_sweep
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "synth"
    generate_synthetic(
        out, SyntheticConfig(rows={"train": 2048, "val": 512, "test": 512}, scale=1e-4, seed=1), progress=False
    )
    return str(out)


def test_sweep_rows_files_and_resume(data, tmp_path):
    base = TrainConfig(
        data=data, out="", embedding_dim=8, bottom=(8,), top=(8,), optimizer="adagrad", lr=0.02, batch_size=512
    )
    rows = run_sweep(base, ["full", "hash", "qr"], [4, 1000], seeds=1, out=str(tmp_path))
    by_key = {(row.method, row.ratio_asked): row for row in rows}
    assert set(by_key) == {("full", 1.0), ("hash", 4), ("hash", 1000), ("qr", 4), ("qr", 1000)}
    assert by_key[("hash", 4)].ratio_reached == pytest.approx(4, rel=0.01)
    assert by_key[("hash", 4)].test_bce > 0 and by_key[("hash", 4)].bayes_bce > 0
    assert by_key[("qr", 1000)].test_bce is None and "budget" in by_key[("qr", 1000)].note
    for name in ("results.csv", "results.md", "bce.png", "auc.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| hash | 4 |" in (tmp_path / "results.md").read_text()
    # the verdicts against hash (the default baseline): one seed a side cannot be tested, and the table says so
    comparison = (tmp_path / "comparison.md").read_text()
    assert "against `hash`" in comparison and "| qr | 4 | 1 / 1 |" in comparison and "too few seeds" in comparison
    # a second sweep reads the finished runs instead of training again
    result = tmp_path / "runs" / "hash-4x-s0" / "result.json"
    marked = json.loads(result.read_text()) | {"note": "from disk"}
    result.write_text(json.dumps(marked))
    again = run_sweep(base, ["hash"], [4], seeds=1, out=str(tmp_path))
    assert again[0].note == "from disk"
    # other settings: the stale result is not reported, the run is trained again
    retrained = run_sweep(replace(base, lr=0.03), ["hash"], [4], seeds=1, out=str(tmp_path))
    assert retrained[0].note == "" and retrained[0].test_bce != again[0].test_bce
    assert json.loads(result.read_text())["config"]["lr"] == 0.03


def test_method_specs_carry_options_into_the_run_config(data, tmp_path):
    from compemb.bench.quality import parse_method_spec

    assert parse_method_spec("cce:accounting=paper:columns=2") == ("cce", {"accounting": "paper", "columns": 2})
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_method_spec("cce:paper")
    with pytest.raises(ValueError, match="hash"):
        parse_method_spec("hahs")
    base = TrainConfig(
        data=data, out="", embedding_dim=8, bottom=(8,), top=(8,), optimizer="adagrad", lr=0.02, batch_size=512
    )
    rows = run_sweep(base, ["full", "ce:columns=2"], [4], seeds=1, out=str(tmp_path))
    saved = json.loads((tmp_path / "runs" / "ce-columns-2-4x-s0" / "result.json").read_text())
    assert rows[1].method == "ce:columns=2" and saved["config"]["method_options"] == {"columns": 2}
    assert (tmp_path / "match.md").exists() and (tmp_path / "bce_params.png").stat().st_size > 0


def test_params_to_match_interpolates_the_crossing_in_log_params():
    from compemb.bench.quality import SweepRow, match_table, params_to_match

    def row(method, ratio, params, bce):
        return SweepRow(method, ratio, 0, params=params, val_bce=bce)

    rows = [row("hash", 100, 1_000, 0.50), row("hash", 10, 10_000, 0.46), row("hash", 1, 100_000, 0.40)]
    # 0.46 -> 0.40 crosses 0.43 half way, in log params: sqrt(10,000 x 100,000)
    assert params_to_match(rows, 0.43) == pytest.approx(31_622.8, rel=1e-4)
    assert params_to_match(rows, 0.39) is None and params_to_match(rows, 0.6) == 1_000
    table = match_table([row("full", 1, 200_000, 0.43), *rows, row("ce", 10, 10_000, 0.45)])
    assert "| hash | 31,623 | 0.158 |" in table and "| ce | not reached at the sizes tried |" in table


def test_tables_show_the_spread_over_seeds():
    from compemb.bench.quality import SweepRow, markdown_table

    rows = [
        SweepRow("hash", 10, seed, ratio_reached=10, params=100, val_bce=v, test_bce=v, test_auc=0.7)
        for seed, v in enumerate([0.40, 0.42, 0.44])
    ]
    line = next(line for line in markdown_table(rows).splitlines() if line.startswith("| hash"))
    assert "| 3 | 0.4200 ± 0.0200 | 0.4200 ± 0.0200 | 0.7000 ± 0.0000 |" in line


def test_files_gather_every_invocation_made_with_the_same_settings(data, tmp_path):
    from compemb.bench.quality import collect_rows

    base = TrainConfig(
        data=data, out="", embedding_dim=8, bottom=(8,), top=(8,), optimizer="adagrad", lr=0.02, batch_size=512
    )
    run_sweep(base, ["full", "hash"], [4], seeds=1, out=str(tmp_path))
    # more seeds for one method, a budget no qr can meet, then a sweep with other shared settings
    run_sweep(base, ["hash", "qr"], [4, 1000], seeds=2, out=str(tmp_path))
    run_sweep(replace(base, lr=0.05), ["ce"], [4], seeds=1, out=str(tmp_path / "other"))
    gathered = collect_rows(base, tmp_path, first=["full", "hash"])
    keys = [(r.method, r.ratio_asked, r.seed) for r in gathered]
    assert keys == [
        ("full", 1.0, 0),
        ("hash", 4, 0),
        ("hash", 4, 1),
        ("hash", 1000, 0),
        ("hash", 1000, 1),
        ("qr", 4, 0),
        ("qr", 4, 1),
        ("qr", 1000, 0),
        ("qr", 1000, 1),
    ]
    assert all(
        r.test_bce is None and "budget" in r.note for r in gathered if r.method == "qr" and r.ratio_asked == 1000
    )
    table = (tmp_path / "results.md").read_text()
    assert "| full | 1 |" in table and "| hash | 4 |" in table and "| ce |" not in table
    # a run made with another learning rate in the same directory is not part of this table
    run_sweep(replace(base, lr=0.05), ["ce"], [4], seeds=1, out=str(tmp_path))
    assert all(r.method != "ce" for r in collect_rows(base, tmp_path))


def test_quantized_rows_test_the_trained_runs_tables_after_quantization(data, tmp_path):
    from compemb.bench.quality import parse_sweep_spec

    assert parse_sweep_spec("cce:columns=2+int8") == ("cce", {"columns": 2}, "int8")
    assert parse_sweep_spec("hash") == ("hash", {}, None)
    base = TrainConfig(
        data=data, out="", embedding_dim=8, bottom=(8,), top=(8,), optimizer="adagrad", lr=0.02, batch_size=512
    )
    rows = {
        row.method: row for row in run_sweep(base, ["full", "full+int8", "hash+int4"], [10], seeds=1, out=str(tmp_path))
    }
    # the trained run is shared: full+int8 quantizes full's run (trained once), hash+int4 trained hash itself
    assert (tmp_path / "runs" / "full-1x-s0" / "result.json").exists()
    assert (tmp_path / "runs" / "hash-10x-s0" / "checkpoints" / "best.json").exists()
    full, int8 = rows["full"], rows["full+int8"]
    assert int8.ratio_reached == pytest.approx(4 * 8 / (8 + 4), rel=1e-6)  # codes + fp16 scale and bias per row
    assert abs(int8.test_bce - full.test_bce) < 0.01 * full.test_bce and int8.test_bce != full.test_bce
    assert rows["hash+int4"].ratio_reached > 10 * 2 and rows["hash+int4"].test_bce > 0
    refused = run_sweep(base, ["qr+int8"], [1000], seeds=1, out=str(tmp_path))[0]
    assert refused.test_bce is None and "budget" in refused.note  # qr cannot reach 1000x: the row says why
    assert "| full+int8 |" in (tmp_path / "results.md").read_text()
    # read back, not recomputed
    result = tmp_path / "runs" / "full+int8-1x-s0" / "result.json"
    result.write_text(json.dumps(json.loads(result.read_text()) | {"note": "from disk"}))
    assert run_sweep(base, ["full+int8"], [10], seeds=1, out=str(tmp_path))[0].note == "from disk"
