"""Tests for atoken/pipelines/visualize.py: the rate-distortion figure of the codec panel."""

from __future__ import annotations

import math

from atoken.pipelines.visualize import rate_distortion_figure


def test_rate_distortion_figure_draws_curves_budget_points_and_token_stars():
    curves = {"JPEG": [(0.9, 33.0), (0.2, 25.0)], "WebP": [(0.3, 28.0)]}
    at_budget = {"JPEG": (0.5, 30.0), "WebP": (0.49, math.inf)}
    tokens = {"tokens (counted bits)": (0.5, 29.0), "tokens as stored": (3.0, 29.1)}
    fig = rate_distortion_figure(curves, at_budget, tokens)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name) == [
        "JPEG",
        "WebP",
        "JPEG at the tokens' bits",
        "WebP at the tokens' bits",
        "tokens (counted bits)",
        "tokens as stored",
    ]
    # each curve passes through its budget point, ordered by bits per pixel
    assert list(by_name["JPEG"].x) == [0.2, 0.5, 0.9] and list(by_name["JPEG"].y) == [25, 30, 33]
    assert by_name["WebP at the tokens' bits"].y[0] == 100.0  # identical image: clipped, drawn
    assert by_name["tokens (counted bits)"].marker.symbol == "star"
    assert by_name["tokens as stored"].marker.symbol == "star-open"
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.title.text == "bits per pixel"
