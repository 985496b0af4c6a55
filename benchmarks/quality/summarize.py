"""Average the quality benchmark over seeds and draw its figure.

    PYTHONPATH=src python benchmarks/quality/summarize.py      # reads benchmarks/quality/results/results_*.json

Writes ``benchmarks/quality/results/summary.md`` (mean ± std over the seeds found) and
``docs/img/quality-ring.png`` (sliced Wasserstein at 1 NFE per method, with the multi-step
reference and the data's own noise floor as lines).
"""

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "quality" / "results"
COLUMNS = {
    "ring": ["nfe", "sw", "mmd", "diversity", "off_mode", "class_acc", "train_s"],
    "shapes": ["nfe", "fd", "sw", "diversity", "train_s"],
}


def load() -> dict[str, list[dict]]:
    """One run per (part, seed) from every ``results_*.json`` (quick runs left out)."""
    by_seed: dict[str, dict[int, dict]] = {"ring": {}, "shapes": {}}
    for path in sorted(RESULTS.glob("results_*.json")):
        if path.stem.endswith("_quick"):
            continue
        report = json.loads(path.read_text())
        for part in by_seed:
            if part in report:
                by_seed[part][report["config"]["seed"]] = report[part]
    return {part: [runs[seed] for seed in sorted(runs)] for part, runs in by_seed.items()}


def aggregate(runs: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name in runs[0]:
        table[name] = {}
        for column in runs[0][name]:
            values = [run[name][column] for run in runs if name in run and column in run[name]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            table[name][column] = (statistics.fmean(values), spread, len(values))
    return table


def markdown(table, columns) -> str:
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in table.items():
        cells = []
        for column in columns:
            if column not in row:
                cells.append("")
            elif column in ("nfe",):
                cells.append(f"{row[column][0]:.0f}")
            elif column == "train_s":
                cells.append(f"{row[column][0]:.0f}")
            else:
                mean, spread, count = row[column]
                cells.append(f"{mean:.3f} ± {spread:.3f}" if count > 1 else f"{mean:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(table, path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:
            return ImageFont.load_default()

    rows = [(name.replace(", 1 NFE", ""), row["sw"]) for name, row in table.items()
            if name.endswith("1 NFE") or name == "FM start, 1 Euler"]
    reference = table.get("FM start, 50 Euler", {}).get("sw")
    floor = table.get("data (second draw)", {}).get("sw")
    left, right, top, bar, gap = 430, 40, 50, 22, 8
    scale_max = max(mean + spread for _, (mean, spread, _) in rows) * 1.05
    width, height = 1100, top + len(rows) * (bar + gap) + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "Ring mixture: sliced Wasserstein to held-out data at 1 NFE (lower is better; mean ± std over seeds)",
              fill="black", font=font(16))
    span = width - left - right

    def x_of(value):
        return left + span * value / scale_max

    for k, (name, (mean, spread, _)) in enumerate(rows):
        y = top + k * (bar + gap)
        colour = (200, 90, 60) if name.startswith("FM") else (50, 100, 170)
        draw.rectangle([left, y, x_of(mean), y + bar], fill=colour)
        draw.line([x_of(mean - spread), y + bar // 2, x_of(mean + spread), y + bar // 2], fill="black", width=2)
        draw.text((8, y + 3), name[:58], fill="black", font=font(13))
        draw.text((x_of(mean + spread) + 6, y + 3), f"{mean:.3f}", fill="black", font=font(13))
    bottom = top + len(rows) * (bar + gap)
    for value, label, colour in ((reference, "FM start, 50 Euler steps", (30, 150, 60)),
                                 (floor, "data vs data (noise floor)", (120, 120, 120))):
        if value is not None:
            x = x_of(value[0])
            draw.line([x, top - 6, x, bottom], fill=colour, width=2)
            draw.text((x + 4, bottom + 6 + (0 if colour[1] == 150 else 18)), f"{label}: {value[0]:.3f}", fill=colour,
                      font=font(13))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    runs = load()
    text = ""
    for part, columns in COLUMNS.items():
        if runs[part]:
            table = aggregate(runs[part])
            text += f"### {part} ({len(runs[part])} seed{'s' if len(runs[part]) > 1 else ''})\n\n"
            text += markdown(table, columns) + "\n"
            if part == "ring":
                figure(table, ROOT / "docs" / "img" / "quality-ring.png")
    (RESULTS / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
