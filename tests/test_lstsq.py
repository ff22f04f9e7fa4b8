"""CCE for least squares (compemb.lstsq): dense CCE against Theorem 3.1, sparse CCE and hashing against each other."""

import json

import pytest
import torch

from compemb.cli import main
from compemb.lstsq import (
    LeastSquaresProblem,
    dense_cce,
    hashing_baseline,
    optimum,
    run_lstsq,
    sparse_cce,
    theorem_bound,
)

N, D1, K, D2, ITERATIONS = 2_000, 200, 20, 5, 60


@pytest.fixture(scope="module")
def problem() -> LeastSquaresProblem:
    return LeastSquaresProblem.generate(N, D1, D2, seed=0)


@pytest.fixture(scope="module")
def runs(problem) -> dict[str, list[float]]:
    return {
        "dense": dense_cce(problem, K, ITERATIONS, seed=0),
        "sparse": sparse_cce(problem, K, ITERATIONS, seed=0),
        "hashing": hashing_baseline(problem, K, ITERATIONS, seed=0),
        "bound": theorem_bound(problem, K, ITERATIONS),
    }


def test_optimum_matches_an_independent_solver(problem):
    reference = torch.linalg.lstsq(problem.X, problem.Y, driver="gelsd").solution
    assert optimum(problem) == pytest.approx(problem.loss(reference), rel=1e-12)
    # the optimum's residual is orthogonal to X's columns
    residual = problem.X @ problem.solution - problem.Y
    assert torch.allclose(problem.X.T @ residual, torch.zeros(D1, D2, dtype=torch.float64), atol=1e-8)


def test_bound_at_zero_is_fit_plus_optimum_and_the_rate_is_rho(problem):
    fit = float((problem.X @ problem.solution).square().sum())
    best = optimum(problem)
    bound = theorem_bound(problem, K, 3)
    assert bound[0] == pytest.approx(fit + best, rel=1e-12)
    assert bound[0] == pytest.approx(float(problem.Y.square().sum()), rel=1e-12)  # = ||Y||^2, the loss of T = 0
    sigma = torch.linalg.svdvals(problem.X)
    rho = float(sigma.min() ** 2 / sigma.square().sum())
    assert bound[3] - best == pytest.approx((1 - rho) ** (3 * K) * fit, rel=1e-9)


def test_dense_cce_stays_under_the_bound_and_shrinks_its_excess_tenfold(problem, runs):
    dense, bound = runs["dense"], runs["bound"]
    assert len(dense) == len(bound) == ITERATIONS + 1
    assert dense[0] == pytest.approx(bound[0], rel=1e-12)  # both start at T = 0
    assert all(loss <= limit * (1 + 1e-12) for loss, limit in zip(dense, bound))
    best = optimum(problem)
    assert (dense[0] - best) / (dense[-1] - best) >= 10


def test_dense_cce_never_increases(runs):
    dense = runs["dense"]
    assert all(after <= before * (1 + 1e-12) for before, after in zip(dense, dense[1:]))
    assert dense[-1] < dense[1] < dense[0]


def test_hashing_is_constant_and_ten_times_further_from_the_optimum(problem, runs):
    best, hashing = optimum(problem), runs["hashing"]
    assert len(set(hashing)) == 1 and len(hashing) == ITERATIONS + 1
    assert hashing[0] - best >= 10 * (runs["dense"][-1] - best)


def test_sparse_cce_improves_on_hashing(problem, runs):
    best, sparse, hashing = optimum(problem), runs["sparse"], runs["hashing"]
    assert sparse[-1] < hashing[-1]
    assert sparse[-1] - best <= 0.8 * (hashing[-1] - best)
    assert sparse[-1] < sparse[1]  # clustering helps beyond the first, purely random, solve


def test_same_seed_same_results_and_a_new_seed_differs(problem, runs):
    again = LeastSquaresProblem.generate(N, D1, D2, seed=0)
    assert torch.equal(again.X, problem.X) and torch.equal(again.Y, problem.Y)
    assert dense_cce(again, K, ITERATIONS, seed=0) == runs["dense"]
    assert sparse_cce(again, K, ITERATIONS, seed=0) == runs["sparse"]
    assert hashing_baseline(again, K, ITERATIONS, seed=0) == runs["hashing"]
    assert dense_cce(problem, K, 3, seed=1) != runs["dense"][:4]
    assert not torch.equal(LeastSquaresProblem.generate(N, D1, D2, seed=1).X, problem.X)


def test_signal_zero_is_pure_noise_and_bad_sizes_are_rejected(problem):
    noise_only = LeastSquaresProblem.generate(300, 20, 2, seed=0, signal=0.0)
    # with Y pure noise, X T* is Y's projection onto d1 of n dimensions: about d1 * d2 of ||Y||^2 = n * d2
    assert float((noise_only.X @ noise_only.solution).square().sum()) < 0.3 * float(noise_only.Y.square().sum())
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        dense_cce(problem, 0, 5)
    with pytest.raises(ValueError, match="iterations must be >= 0, got -1"):
        theorem_bound(problem, K, -1)
    with pytest.raises(ValueError, match="k=201 clusters; k must be <= d1"):
        sparse_cce(problem, 201, 1)
    with pytest.raises(ValueError, match="d1 must be >= 1, got 0"):
        LeastSquaresProblem.generate(10, 0, 1)


def test_run_lstsq_reports_excess_against_the_optimum():
    result = run_lstsq(n=400, d1=40, k=4, d2=3, iterations=6, seed=2)
    assert result["bound_respected"] and result["iterations_above_bound"] == []
    for name in ("dense_cce", "sparse_cce", "hashing", "bound"):
        assert len(result["losses"][name]) == 7
        assert result["excess"][name] == [loss - result["optimum"] for loss in result["losses"][name]]
    assert result["excess"]["bound"][0] == pytest.approx(result["fit"])


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    stem = tmp_path / "results" / "lstsq"
    assert (
        main(
            [
                "lstsq",
                "--n",
                "400",
                "--d1",
                "40",
                "--k",
                "4",
                "--d2",
                "3",
                "--iterations",
                "5",
                "--seed",
                "1",
                "--out",
                str(stem),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| iteration | dense CCE | sparse CCE | hashing (2k buckets) | Theorem 3.1 bound |" in printed
    assert "under the bound at every iteration" in printed
    payload = json.loads((tmp_path / "results" / "lstsq.json").read_text())
    assert payload["settings"]["d1"] == 40 and len(payload["excess"]["dense_cce"]) == 6
    markdown = (tmp_path / "results" / "lstsq.md").read_text()
    assert markdown.count("\n| ") == 7  # header + 6 iterations
    assert (tmp_path / "results" / "lstsq.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(path.name for path in (tmp_path / "results").iterdir()) == ["lstsq.json", "lstsq.md", "lstsq.png"]


def test_cli_rejects_bad_input_with_one_line(capsys):
    assert main(["lstsq", "--n", "100", "--d1", "10", "--k", "0", "--d2", "2", "--iterations", "2", "--out", ""]) == 2
    assert "k must be >= 1, got 0" in capsys.readouterr().err


def test_cli_writes_nothing_unless_told_where(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["lstsq", "--n", "200", "--d1", "20", "--k", "4", "--d2", "2", "--iterations", "2", "--seed", "1"]) == 0
    assert "| iteration | dense CCE |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no benchmarks/results/ in the directory it was run from
