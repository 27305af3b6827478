"""Charts drawn with PIL, the report's only chart implementation (no plotting dependency,
no JavaScript): lines with an optional ±band and a smoothed trend, and stacked areas.

Each chart is drawn at `SCALE` times the size it is shown at, so that lines and text stay
sharp when a browser scales it down (and on high-density screens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

SCALE = 2
WIDTH, HEIGHT = 520, 250  # as shown, in CSS pixels
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 46, 30
MARKERS_UP_TO = 40  # points: fewer are drawn as dots too (a 3-step run is 3 dots)
SMOOTH_FROM = 10  # points: a smoothed series draws its moving average from this many
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
    (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
)  # fmt: skip
Color = tuple[int, int, int]


@dataclass(frozen=True)
class Series:
    """One line: `band` is a ± half-width per point (e.g. the std of a mean); `smooth`
    draws the raw values faintly under a moving average over ~5% of the run."""

    name: str
    steps: Sequence[float]
    values: Sequence[float]
    band: Sequence[float] | None = None
    smooth: bool = False


def font(size: float) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=round(size * SCALE))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def trend(values: Sequence[float]) -> list[float]:
    """A moving average over ~5% of the points (from SMOOTH_FROM points; fewer: as-is)."""
    if len(values) < SMOOTH_FROM:
        return list(values)
    return moving_average(values, max(2, len(values) // 20))


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    power = 10 ** math.floor(math.log10((hi - lo) / max(count, 1)))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda s: abs((hi - lo) / s - count))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def format_value(value: float, unit: str = "") -> str:
    """A tick or table value: bytes in KB/MB/GB, everything else to 4 significant digits."""
    if unit == "bytes" and abs(value) >= 1000:
        exponent = min(int(math.log10(abs(value)) // 3), 4)
        return f"{value / 1000**exponent:.3g} {' KMGT'[exponent]}B"
    text = f"{value:.4g}"
    return text + (f" {unit}" if unit and unit != "bytes" else "")


def _finite(series: Series) -> list[tuple[float, float, float]]:
    """(step, value, band) of the points whose value is finite."""
    band = series.band or [0.0] * len(series.values)
    return [
        (s, v, b if math.isfinite(b) else 0.0)
        for s, v, b in zip(series.steps, series.values, band, strict=True)
        if math.isfinite(v)
    ]


class Canvas:
    """A white image with axes over the data range [x_lo, x_hi] × [y_lo, y_hi]."""

    def __init__(self, title: str, x: tuple[float, float], y: tuple[float, float]) -> None:
        self.image = Image.new("RGB", (WIDTH * SCALE, HEIGHT * SCALE), "white")
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        self.x_lo, self.x_hi = x if x[1] > x[0] else (x[0] - 0.5, x[0] + 0.5)
        pad = (y[1] - y[0]) * 0.06 or max(abs(y[0]) * 0.1, 1e-3)
        self.y_lo, self.y_hi = y[0] - pad, y[1] + pad
        self.draw.text((LEFT * SCALE, 6 * SCALE), title, fill=(20, 20, 20), font=font(14))

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Data coordinates to pixels of the (scaled) image."""
        fx = (x - self.x_lo) / (self.x_hi - self.x_lo)
        fy = (y - self.y_lo) / (self.y_hi - self.y_lo)
        return (
            SCALE * (LEFT + fx * (WIDTH - LEFT - RIGHT)),
            SCALE * (HEIGHT - BOTTOM - fy * (HEIGHT - TOP - BOTTOM)),
        )

    def axes(self, unit: str) -> None:
        """Frame, grid lines and tick labels (whole steps on x)."""
        small, grey = font(11.5), (90, 90, 90)
        left, top = self.px(self.x_lo, self.y_hi)
        right, bottom = self.px(self.x_hi, self.y_lo)
        for value in nice_ticks(self.y_lo, self.y_hi):
            _, y = self.px(self.x_lo, value)
            self.draw.line([(left, y), (right, y)], fill=(232, 232, 232), width=SCALE)
            label = format_value(value, unit)
            w = self.draw.textlength(label, font=small)
            self.draw.text((left - w - 5 * SCALE, y - 7 * SCALE), label, fill=grey, font=small)
        x_ticks = [t for t in nice_ticks(self.x_lo, self.x_hi, 6) if t == int(t)]
        for value in x_ticks:
            x, _ = self.px(value, self.y_lo)
            label = f"{int(value)}"
            w = self.draw.textlength(label, font=small)
            self.draw.line([(x, bottom), (x, bottom + 4 * SCALE)], fill=grey, width=SCALE)
            self.draw.text((x - w / 2, bottom + 6 * SCALE), label, fill=grey, font=small)
        w = self.draw.textlength("step", font=small)
        self.draw.text((left - w - 5 * SCALE, bottom + 6 * SCALE), "step", fill=grey, font=small)
        self.draw.rectangle([left, top, right, bottom], outline=(170, 170, 170), width=SCALE)

    def legend(self, entries: Sequence[tuple[str, Color]]) -> None:
        """Coloured swatches and names in a row under the title."""
        x, y, small = LEFT * SCALE, 25 * SCALE, font(11.5)
        for name, color in entries:
            width = 28 * SCALE + self.draw.textlength(name, font=small)
            if x + width > (WIDTH - RIGHT) * SCALE:  # wrap onto a second row
                x, y = LEFT * SCALE, y + 13 * SCALE
            self.draw.rectangle([x, y + 3 * SCALE, x + 10 * SCALE, y + 11 * SCALE], fill=color)
            self.draw.text((x + 14 * SCALE, y), name, fill=(60, 60, 60), font=small)
            x += width

    def line(self, points: Sequence[tuple[float, float]], color: Color, width: float) -> None:
        pixels = [self.px(x, y) for x, y in points]
        if len(pixels) > 1:
            self.draw.line(pixels, fill=color, width=round(width * SCALE), joint="curve")
        if len(pixels) <= MARKERS_UP_TO:
            r = (width + 1.5) * SCALE
            for x, y in pixels:
                self.draw.ellipse([x - r, y - r, x + r, y + r], fill=color)

    def area(
        self, xs: Sequence[float], lower: Sequence[float], upper: Sequence[float], fill: tuple
    ) -> None:
        """The region between two curves (one point: a bar a step wide)."""
        if len(xs) == 1:
            xs, lower, upper = [xs[0] - 0.4, xs[0] + 0.4], [lower[0]] * 2, [upper[0]] * 2
        outline = [self.px(x, y) for x, y in zip(xs, upper, strict=True)]
        outline += [self.px(x, y) for x, y in reversed(list(zip(xs, lower, strict=True)))]
        self.draw.polygon(outline, fill=fill)


def _faint(color: Color) -> Color:
    return tuple(round(c + (255 - c) * 0.6) for c in color)  # type: ignore[return-value]


def line_chart(title: str, series: Sequence[Series], unit: str = "") -> Image.Image:
    """Each series against the step; a ±band shaded, a smoothed series over its raw
    values. Non-finite values are left out; no finite value at all: an empty frame."""
    points = [_finite(s) for s in series]
    flat = [p for ps in points for p in ps]
    if not flat:
        canvas = Canvas(title + " (no finite values)", (0, 1), (0, 1))
        canvas.axes(unit)
        return canvas.image
    canvas = Canvas(
        title,
        (min(p[0] for p in flat), max(p[0] for p in flat)),
        (min(p[1] - p[2] for p in flat), max(p[1] + p[2] for p in flat)),
    )
    canvas.axes(unit)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    for s, ps, color in zip(series, points, colors, strict=True):
        if not ps:
            continue
        xs, ys, band = zip(*ps, strict=True)
        smooth = s.smooth and len(ys) >= SMOOTH_FROM
        if s.band is not None:  # around the trend when smoothed: raw bands are a thicket
            centre, half = (trend(ys), trend(band)) if smooth else (ys, band)
            lower = [y - b for y, b in zip(centre, half, strict=True)]
            upper = [y + b for y, b in zip(centre, half, strict=True)]
            canvas.area(xs, lower, upper, (*color, 45))
        if smooth:
            canvas.line(list(zip(xs, ys, strict=True)), _faint(color), 1)
            canvas.line(list(zip(xs, trend(ys), strict=True)), color, 2.5)
        else:
            canvas.line(list(zip(xs, ys, strict=True)), color, 2)
    if len(series) > 1 or series[0].band is not None:
        entries = [(s.name, c) for s, c in zip(series, colors, strict=True)]
        if series[0].band is not None:
            entries.append(("± std", _faint(colors[0])))
        canvas.legend(entries)
    return canvas.image


def stacked_chart(
    title: str,
    steps: Sequence[float],
    layers: dict[str, Sequence[float]],
    total: Series | None = None,
    unit: str = "",
) -> Image.Image:
    """`layers` stacked on each other per step (non-finite values count 0) and, as a
    black line over them, `total`: where the layers overlap in time (async sampling
    during the update) they add up to more than it. Long runs show moving averages."""
    stacked, lower = [], [0.0] * len(steps)
    for values in layers.values():
        finite = trend([v if math.isfinite(v) else 0.0 for v in values])
        upper = [lo + v for lo, v in zip(lower, finite, strict=True)]
        stacked.append((lower, upper))
        lower = upper
    totals = _finite(total) if total else []
    if totals:
        xs, ys, _ = zip(*totals, strict=True)
        totals = [(x, y, 0.0) for x, y in zip(xs, trend(ys), strict=True)]
    top = max([*lower, *(v for _, v, _ in totals), 1e-9])
    canvas = Canvas(title, (min(steps), max(steps)), (0.0, top))
    canvas.axes(unit)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(layers))]
    for (lo, up), color in zip(stacked, colors, strict=True):
        canvas.area(steps, lo, up, (*color, 200))
    entries = list(zip(layers, colors, strict=True))
    if total and totals:
        canvas.line([(s, v) for s, v, _ in totals], (20, 20, 20), 1.5)
        entries.append((total.name, (20, 20, 20)))
    canvas.legend(entries)
    return canvas.image
