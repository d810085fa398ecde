"""Draw the example images in examples/images/ with PIL alone, so we own them (CC0) and can remake them.

Run from the repository root:  python examples/make_images.py
The drawings are deterministic; only a different Pillow version (its bundled font) changes pixels.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT_DIR = Path(__file__).resolve().parent / "images"

INK = (30, 30, 30)
GRID = (200, 200, 200)
WHITE = (255, 255, 255)


def font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled default font, scalable since Pillow 10.1: no font files to ship.
    return ImageFont.load_default(size=size)


def centered_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fill=INK) -> None:
    draw.text(xy, text, font=font(size), fill=fill, anchor="mm")


def wrap(text: str, size: int, width: int) -> list[str]:
    """Greedy word wrap to a pixel width."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if font(size).getlength(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def draw_table(
    draw: ImageDraw.ImageDraw, left: int, top: int, col_widths: list[int], row_height: int, rows: list[list[str]], size: int
) -> None:
    """Header row shaded and bold-ish (drawn twice, offset by a pixel), every cell outlined."""
    for row_idx, row in enumerate(rows):
        y0 = top + row_idx * row_height
        x0 = left
        for col_idx, cell in enumerate(row):
            x1 = x0 + col_widths[col_idx]
            fill = (222, 232, 245) if row_idx == 0 else WHITE
            draw.rectangle((x0, y0, x1, y0 + row_height), fill=fill, outline=INK, width=1)
            # Numbers right-aligned as in printed tables, text left-aligned.
            numeric = row_idx > 0 and cell.replace(",", "").replace(".", "").isdigit()
            anchor, x = ("rm", x1 - 10) if numeric else ("lm", x0 + 10)
            for dx in (0, 1) if row_idx == 0 else (0,):
                draw.text((x + dx, y0 + row_height / 2), cell, font=font(size), fill=INK, anchor=anchor)
            x0 = x1


def make_chart() -> Image.Image:
    image = Image.new("RGB", (800, 600), WHITE)
    draw = ImageDraw.Draw(image)
    centered_text(draw, (400, 40), "Fruit boxes sold in June", 32)

    labels = ["Apples", "Pears", "Plums", "Grapes", "Lemons"]
    values = [42, 31, 18, 27, 12]
    colors = [(214, 69, 65), (120, 170, 60), (120, 80, 160), (60, 120, 200), (230, 190, 40)]
    left, right, top, bottom = 120, 760, 100, 500
    y_max = 50

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / y_max

    for tick in range(0, y_max + 1, 10):
        y = y_of(tick)
        draw.line((left, y, right, y), fill=GRID, width=1)
        draw.text((left - 10, y), str(tick), font=font(18), fill=INK, anchor="rm")
    draw.line((left, top, left, bottom), fill=INK, width=2)
    draw.line((left, bottom, right, bottom), fill=INK, width=2)

    slot = (right - left) / len(values)
    for i, (label, value, color) in enumerate(zip(labels, values, colors)):
        x0, x1 = left + i * slot + 22, left + (i + 1) * slot - 22
        draw.rectangle((x0, y_of(value), x1, bottom), fill=color, outline=INK)
        centered_text(draw, ((x0 + x1) / 2, y_of(value) - 16), str(value), 22)
        centered_text(draw, ((x0 + x1) / 2, bottom + 22), label, 20)

    centered_text(draw, ((left + right) / 2, 565), "Fruit", 22)
    # The y-axis label reads bottom to top, as on printed charts.
    label = Image.new("RGB", (200, 34), WHITE)
    ImageDraw.Draw(label).text((100, 17), "Boxes sold", font=font(22), fill=INK, anchor="mm")
    label = label.rotate(90, expand=True)
    image.paste(label, (22, (top + bottom) // 2 - label.height // 2))
    return image


def make_document() -> Image.Image:
    image = Image.new("RGB", (600, 800), WHITE)
    draw = ImageDraw.Draw(image)
    margin = 50
    draw.text((margin, 50), "Greenfield Library", font=font(34), fill=INK)
    draw.text((margin, 96), "Quarterly report, first quarter", font=font(20), fill=(90, 90, 90))
    draw.line((margin, 132, 600 - margin, 132), fill=INK, width=2)

    paragraph = (
        "Visits to the library grew every month this quarter, helped by the new evening opening hours "
        "and the children's reading club. Book loans rose more slowly than visits, because many "
        "visitors came to use the study rooms and the free internet access. The table below gives "
        "the monthly figures. Next quarter we plan to extend the opening hours on Saturdays."
    )
    y = 160
    for line in wrap(paragraph, 19, 600 - 2 * margin):
        draw.text((margin, y), line, font=font(19), fill=INK)
        y += 28

    y += 24
    draw.text((margin, y), "Table 1. Monthly figures", font=font(20), fill=INK)
    rows = [
        ["Month", "Visitors", "Books lent"],
        ["January", "1,240", "860"],
        ["February", "1,385", "902"],
        ["March", "1,530", "947"],
    ]
    draw_table(draw, margin, y + 36, [180, 160, 160], 40, rows, 19)

    y_note = y + 36 + 40 * len(rows) + 30
    for line in wrap("Figures are counted at the front desk and checked against the loan system.", 16, 500):
        draw.text((margin, y_note), line, font=font(16), fill=(90, 90, 90))
        y_note += 22
    centered_text(draw, (300, 760), "Page 1 of 1", 16, fill=(90, 90, 90))
    return image


def make_table() -> Image.Image:
    image = Image.new("RGB", (640, 260), WHITE)
    draw = ImageDraw.Draw(image)
    centered_text(draw, (320, 32), "Spring league standings", 26)
    rows = [
        ["Team", "Played", "Won", "Lost", "Points"],
        ["Comets", "10", "7", "3", "21"],
        ["Falcons", "10", "6", "4", "18"],
        ["Otters", "10", "4", "6", "12"],
    ]
    draw_table(draw, 40, 70, [160, 110, 100, 100, 100], 44, rows, 20)
    return image


def make_scene() -> Image.Image:
    image = Image.new("RGB", (640, 480), (135, 200, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 330, 640, 480), fill=(90, 170, 70))  # grass
    draw.ellipse((500, 40, 580, 120), fill=(250, 210, 40))  # sun
    for x0, y0 in ((90, 70), (260, 110)):  # clouds
        for dx, dy, r in ((0, 10, 28), (30, 0, 34), (65, 10, 28)):
            draw.ellipse((x0 + dx - r, y0 + dy - r, x0 + dx + r, y0 + dy + r), fill=WHITE)

    # House: walls, roof, door, two windows.
    draw.rectangle((150, 240, 350, 380), fill=(235, 220, 180), outline=INK, width=2)
    draw.polygon([(135, 240), (250, 160), (365, 240)], fill=(180, 50, 40), outline=INK)
    draw.rectangle((230, 300, 270, 380), fill=(120, 70, 30), outline=INK, width=2)
    for x0 in (170, 290):
        draw.rectangle((x0, 265, x0 + 40, 300), fill=(170, 215, 240), outline=INK, width=2)
        draw.line((x0 + 20, 265, x0 + 20, 300), fill=INK, width=2)

    # Tree: trunk and a round crown.
    draw.rectangle((470, 280, 495, 390), fill=(110, 70, 35))
    draw.ellipse((420, 190, 545, 310), fill=(40, 120, 50))
    return image


SLIDES = [
    ("Project Phoenix", ["Quarterly update", "Engineering team", "April"]),
    ("Goals", ["Faster start-up on every device", "Half the memory use", "No change to the results"]),
    ("Progress", ["Start-up time down by 40%", "Memory use down by 30%", "All reference tests pass"]),
    ("Next steps", ["Release a public preview", "Collect feedback for a month", "Plan the stable release"]),
]


def make_slide(title: str, bullets: list[str], number: int) -> Image.Image:
    image = Image.new("RGB", (640, 360), WHITE)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 640, 70), fill=(30, 60, 110))
    draw.text((30, 35), title, font=font(32), fill=WHITE, anchor="lm")
    for i, bullet in enumerate(bullets):
        y = 115 + i * 55
        draw.ellipse((40, y - 6, 52, y + 6), fill=(30, 60, 110))
        draw.text((68, y), bullet, font=font(24), fill=INK, anchor="lm")
    draw.text((610, 340), str(number), font=font(16), fill=(120, 120, 120), anchor="rm")
    return image


def main() -> None:
    (OUT_DIR / "slides").mkdir(parents=True, exist_ok=True)
    outputs = {
        "chart.png": make_chart(),
        "document.png": make_document(),
        "table.png": make_table(),
        "scene.png": make_scene(),
    }
    for number, (title, bullets) in enumerate(SLIDES, start=1):
        outputs[f"slides/slide{number}.png"] = make_slide(title, bullets, number)
    for name, image in outputs.items():
        path = OUT_DIR / name
        # optimize=True: smaller files, same pixels.
        image.save(path, optimize=True)
        print(f"{path.relative_to(OUT_DIR.parent.parent)}  {image.width}x{image.height}  {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
