"""Line charts of benchmark curves with PIL (matplotlib is not a dependency of the project)."""

from pathlib import Path

PALETTE = [(50, 100, 170), (200, 90, 60), (30, 150, 60), (150, 60, 170), (120, 120, 120), (200, 160, 20),
           (20, 160, 170), (0, 0, 0), (170, 40, 90), (90, 60, 20)]
LEVEL_COLOUR = (110, 110, 110)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def line_chart(
    lines: list[tuple[str, list[tuple[float, float]]]],
    path: Path,
    title: str,
    *,
    levels: list[tuple[str, float]] = (),
    around_zero: bool = False,
    x_label: str = "fine-tune steps",
    x_fitted: bool = False,
) -> None:
    """Draw ``lines`` (label, [(x, y), ...]) and horizontal ``levels`` (label, y) into a PNG at ``path``.

    The y axis starts at 0.9 x the smallest value (or a margin below it when
    ``around_zero`` or a value is negative, with the zero line drawn). The x
    axis runs from 0 to the largest x with a tick at every x, or, with
    ``x_fitted``, over the range of the xs with five even ticks (a scatter of
    one figure against another). Nothing is written when there is no line.
    """
    from PIL import Image, ImageDraw

    lines = [(label, points) for label, points in lines if points]
    if not lines:
        return
    width, height, left, right, top, bottom = 1100, 560, 70, 380, 50, 50
    xs = [x for _, pts in lines for x, _ in pts]
    ys = [y for _, pts in lines for _, y in pts] + [y for _, y in levels]
    if x_fitted:
        margin = 0.05 * (max(xs) - min(xs)) or 1.0
        x_low, x_high = min(xs) - margin, max(xs) + margin
        x_ticks = [x_low + (x_high - x_low) * k / 4 for k in range(5)]
    else:
        x_low, x_high = 0, max(xs)
        x_ticks = sorted(set(xs))
    y_low = min(ys) - 0.05 * abs(min(ys)) if min(ys) < 0 or around_zero else 0.9 * min(ys)
    y_high = max(ys) + 0.05 * abs(max(ys)) if max(ys) != y_low else y_low + 1.0
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=_font(16))

    def at(x, y):
        return (left + (width - left - right) * (x - x_low) / (x_high - x_low),
                height - bottom - (height - top - bottom) * (y - y_low) / (y_high - y_low))

    draw.line([at(x_low, y_low), at(x_high, y_low)], fill="black")
    draw.line([at(x_low, y_low), at(x_low, y_high)], fill="black")
    for k in range(5):
        y = y_low + (y_high - y_low) * k / 4
        draw.text((5, at(0, y)[1] - 7), f"{y:.3g}", fill="black", font=_font(12))
        draw.line([at(x_low, y), at(x_high, y)], fill=(225, 225, 225))
    for x in x_ticks:
        draw.text((at(x, y_low)[0] - 12, height - bottom + 6), f"{x:.3g}" if x_fitted else f"{x:g}", fill="black",
                  font=_font(12))
    if y_low < 0 < y_high:
        draw.line([at(x_low, 0), at(x_high, 0)], fill=(150, 150, 150), width=2)
    for index, (label, points) in enumerate(lines):
        colour = PALETTE[index % len(PALETTE)]
        draw.line([at(x, y) for x, y in points], fill=colour, width=3)
        for x, y in points:
            cx, cy = at(x, y)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        draw.text((width - right + 10, top + 20 * index), label[:52], fill=colour, font=_font(13))
    for index, (label, y) in enumerate(levels):
        draw.line([at(x_low, y), at(x_high, y)], fill=LEVEL_COLOUR, width=2)
        draw.text((width - right + 10, top + 20 * (len(lines) + index)), f"--- {label}"[:52], fill=LEVEL_COLOUR,
                  font=_font(13))
    draw.text((left, height - 20), x_label, fill="black", font=_font(12))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
