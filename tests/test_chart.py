"""The server-drawn loss chart (web/chart.py): its smoothing and its scales, with numbers."""

from __future__ import annotations

import re
from itertools import pairwise

from fluxlab.web.chart import loss_svg, smoothed


def test_the_moving_average_is_debiased_and_follows_a_step():
    assert smoothed([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]  # no pull toward zero at the start
    s = smoothed([1.0] * 5 + [0.0] * 40)
    assert s[4] == 1.0 and 0 < s[5] < 1 and s[-1] < 0.05 and all(a >= b for a, b in pairwise(s))


def test_the_svg_has_both_lines_axes_and_a_log_scale():
    losses = [1.0 / (i + 1) for i in range(50)]
    svg = loss_svg(losses)
    points = [re.search(rf'class="{c}" fill="none" points="([^"]+)"', svg).group(1).split() for c in ("raw", "smooth")]
    assert len(points[0]) == len(points[1]) == 50 and "step 50" in svg and "loss over 50 steps" in svg
    ys = [float(p.split(",")[1]) for p in points[0]]
    assert ys[0] < ys[-1]  # the highest loss at the top (smaller y)
    log = loss_svg(losses, log=True)
    assert "log10 loss" in log and log != svg
    assert "no steps yet" in loss_svg([])
