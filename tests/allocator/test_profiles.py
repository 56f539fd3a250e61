"""Latency fits recover known parameters and pick the right family; profiles round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allocator.profiles import (
    MEASURED_EXPERT_POINTS,
    ExpertLatency,
    ExponentialCurve,
    HyperbolicCurve,
    LinearModel,
    Profiles,
    fit_expert_latency,
    fit_linear,
    plot_fits,
)


def grid_points(latency: ExpertLatency) -> np.ndarray:
    memory = np.array([0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
    tokens = np.array([1, 8, 32])
    y, n = np.meshgrid(memory, tokens)
    return np.column_stack([y.ravel(), n.ravel(), latency.seconds(y.ravel(), n.ravel())])


def test_noiseless_exponential_points_recover_remoe_curve():
    truth = ExpertLatency(ExponentialCurve(a=0.02, b=2.4363, c=0.001), token_slope=0.04)
    fit = fit_expert_latency(grid_points(truth))
    assert fit.best.curve.family == "exponential"
    np.testing.assert_allclose(
        [fit.best.curve.a, fit.best.curve.b, fit.best.curve.c, fit.best.token_slope],
        [0.02, 2.4363, 0.001, 0.04],
        rtol=1e-4,
    )
    assert fit.report("exponential").rmse_s < 1e-9
    assert fit.report("hyperbolic").rmse_s > 1e-5


def test_noiseless_hyperbolic_points_recover_one_over_cpu_share():
    truth = ExpertLatency(HyperbolicCurve(a=0.0005, b=0.0038), token_slope=0.1)
    fit = fit_expert_latency(grid_points(truth))
    assert fit.best.curve.family == "hyperbolic"
    np.testing.assert_allclose(
        [fit.best.curve.a, fit.best.curve.b, fit.best.token_slope], [0.0005, 0.0038, 0.1], rtol=1e-5
    )
    assert fit.report("hyperbolic").relative_error < 1e-6


def test_measured_points_report_both_families_and_choose_by_residual_error():
    fit = fit_expert_latency(MEASURED_EXPERT_POINTS)
    for report in fit.reports:
        print(
            f"{report.family}: RMSE {report.rmse_s * 1e3:.3f} ms, relative error {report.relative_error:.1%}, "
            f"RSE {report.residual_standard_error_s * 1e3:.3f} ms, {report.parameters}"
        )
    # The exponential's extra parameter lowers its RMSE, not its residual standard error.
    assert fit.best.curve.family == "hyperbolic"
    assert fit.best.token_slope == 0.0  # one token count: the slope is not identifiable, fixed at 0
    assert 3.5e-3 < float(fit.best.seconds(1.0, 1)) < 5.0e-3


def test_fixed_token_slope_is_kept():
    fit = fit_expert_latency(MEASURED_EXPERT_POINTS, token_slope=0.05, saturation_gb=2.0)
    assert fit.best.token_slope == 0.05
    assert fit.best.curve.saturation_gb == 2.0
    assert float(fit.best.seconds(4.0, 1)) == pytest.approx(float(fit.best.seconds(2.0, 1)))


def test_fit_preconditions():
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        fit_expert_latency(np.ones((3, 2)))
    with pytest.raises(ValueError, match="two or more memory sizes"):
        fit_expert_latency([[1.0, 1, 0.01], [1.0, 2, 0.02]])
    with pytest.raises(ValueError, match="seconds > 0"):
        fit_expert_latency([[1.0, 1, 0.0], [2.0, 1, 0.01]])


def test_linear_fit_recovers_cold_start_and_bandwidth():
    weight_bytes = np.array([1e7, 5e7, 2e8, 1e9])
    model, report = fit_linear(weight_bytes, 0.25 + weight_bytes / 1.5e9)
    assert model.intercept == pytest.approx(0.25)
    assert model.bandwidth == pytest.approx(1.5e9)
    assert report.rmse_s < 1e-12


def test_profiles_json_round_trip_is_strict_and_exact():
    profiles = Profiles.synthetic()
    text = profiles.to_json()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert Profiles.from_json(text) == profiles
    unsaturated = Profiles.synthetic()
    unsaturated = Profiles.from_dict(
        {
            **unsaturated.to_dict(),
            "expert": {
                "curve": {
                    "family": "exponential",
                    "a": 0.02,
                    "b": 2.0,
                    "c": 0.001,
                    "saturation_gb": None,
                },
                "token_slope": 0.0,
            },
        }
    )
    assert Profiles.from_json(unsaturated.to_json()) == unsaturated


def test_linear_model_expected_time_below_one_call():
    model = LinearModel(0.001, 0.0001)
    assert float(model.expected(0.5)) == pytest.approx(0.0005 + 0.00005)
    assert float(model.expected(3)) == pytest.approx(float(model(3)))


def test_plot_fits_writes_a_png(tmp_path):
    truth = ExpertLatency(HyperbolicCurve(0.0005, 0.0038), 0.1)
    points = grid_points(truth)
    fit = fit_expert_latency(points)
    path = tmp_path / "fits.png"
    plot_fits(points, fit.candidates, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
