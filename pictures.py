"""Pictures drawn with pillow alone (no plotting dependency): overlays of masks on photos, a run's curves and a
confusion matrix. Each function returns a PIL image; outputs.py writes them.

    curves_picture(records, class_names)     # train loss, learning rate, val mIoU and per-class IoU per epoch
    confusion_picture(confusion, class_names) # rows = ground truth, normalised by row, percentages in the cells
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from coco import palette

FONT = ImageFont.load_default()
INK, GRID, WHITE = (0, 0, 0), (225, 225, 225), (255, 255, 255)
# one colour per run when several runs share a chart (tab10)
DISTINCT_RUN_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                       (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def overlay(image, mask, class_names, alpha=0.5, title=None, legend=True):
    """PIL image: the photo blended with the palette-coloured mask, and a legend of the classes present."""
    colors = np.array(palette(class_names), np.uint8)
    image = np.asarray(image, np.uint8)
    safe = np.where(mask < len(class_names), mask, 0)
    blend = (image * (1 - alpha) + colors[safe] * alpha).astype(np.uint8)
    blend[mask == 0] = image[mask == 0]  # keep Background as the photo itself
    present = [int(c) for c in np.unique(mask) if c < len(class_names)] if legend else []
    row = 14
    legend_h = row * (len(present) + (1 if title else 0)) + 4
    canvas = Image.new("RGB", (blend.shape[1], blend.shape[0] + legend_h), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = blend.shape[0] + 2
    if title:
        draw.text((4, y), title, fill=(0, 0, 0))
        y += row
    for c in present:
        draw.rectangle([4, y + 1, 14, y + 11], fill=tuple(int(v) for v in colors[c]), outline=(0, 0, 0))
        draw.text((20, y), f"{c} {class_names[c]}", fill=(0, 0, 0))
        y += row
    return canvas


def outline(pixels):
    """The boundary pixels of a bool mask, two pixels wide."""
    p = np.pad(pixels, 2)
    inner = np.ones_like(pixels)
    h, w = pixels.shape
    for dy in range(5):
        for dx in range(5):
            inner &= p[dy:dy + h, dx:dx + w]
    return pixels & ~inner


def suspect_picture(photo, pixels, label, pred, class_names, name, title):
    """review.py's gallery: photo | label | out-of-fold prediction, the suspect (a bool mask) outlined in white on
    each, the title above."""
    edge = outline(pixels)
    panels = [overlay(photo, np.zeros_like(label), class_names, title=name, legend=False),
              overlay(photo, label, class_names, title="label"), overlay(photo, pred, class_names, title="out of fold")]
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels) + 16), WHITE)
    x = 0
    for panel in panels:
        picture = np.array(panel)
        picture[:edge.shape[0]][edge] = WHITE
        canvas.paste(Image.fromarray(picture), (x, 16))
        x += panel.width
    ImageDraw.Draw(canvas).text((4, 2), title, fill=INK)
    return canvas


# ----------------------------------------------------------------------------- line charts

def nice_ticks(low, high, count=5):
    """About `count` round tick values covering low..high."""
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    return [step * i for i in range(math.floor(low / step), math.ceil(high / step) + 1)]


def text_width(draw, text):
    return draw.textlength(text, font=FONT)


def line_chart(series, title, x_label, y_label, size=(720, 300), log_y=False, y_range=None):
    """series: [(label, rgb, xs, ys)]; a framed chart with ticks, grid, axis labels and a legend on the right."""
    width, height = size
    legend_w = 20 + max([text_width(ImageDraw.Draw(Image.new("RGB", (1, 1))), s[0]) for s in series] + [0])
    left, right, top, bottom = 60, width - legend_w - 10, 24, height - 36
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    points = [(x, y) for s in series for x, y in zip(s[2], s[3]) if y is not None and math.isfinite(y)
              and (y > 0 or not log_y)]
    draw.text((left, 6), title, fill=INK, font=FONT)
    if not points:
        draw.text((left, top + 20), "nothing to draw yet", fill=INK, font=FONT)
        return image
    scale = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [p[0] for p in points], [scale(p[1]) for p in points]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(*(y_range or (min(ys), max(ys))))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left), bottom - (scale(y) - y0) / (y1 - y0) * (bottom - top))
    for t in y_ticks:
        y = bottom - (t - y0) / (y1 - y0) * (bottom - top)
        draw.line([(left, y), (right, y)], fill=GRID)
        label = f"{10 ** t:.0e}" if log_y else f"{t:g}"
        draw.text((left - 6 - text_width(draw, label), y - 5), label, fill=INK, font=FONT)
    for t in x_ticks:
        x = left + (t - x0) / (x1 - x0) * (right - left)
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        draw.text((x - text_width(draw, f"{t:g}") / 2, bottom + 6), f"{t:g}", fill=INK, font=FONT)
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) / 2 - text_width(draw, x_label) / 2, bottom + 20), x_label, fill=INK, font=FONT)
    draw.text((4, top - 14), y_label, fill=INK, font=FONT)
    for i, (label, color, sx, sy) in enumerate(series):
        line = [to_px(x, y) for x, y in zip(sx, sy) if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            draw.line(line, fill=tuple(color), width=2)
        for px, py in line if len(line) < 40 else []:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=tuple(color))
        ly = top + 4 + 14 * i
        draw.rectangle([right + 10, ly + 2, right + 20, ly + 10], fill=tuple(color), outline=INK)
        draw.text((right + 24, ly), label, fill=INK, font=FONT)
    return image


def stack(images):
    """Pictures one below the other."""
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), WHITE)
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height
    return canvas


def last_of_each(records, key):
    """The records that have key(record), the last one for each key (a resumed run logs its stopped epoch again),
    in key order."""
    latest = {key(r): r for r in records if key(r) is not None}
    return [latest[k] for k in sorted(latest)]


def curves_picture(records, class_names, title=""):
    """A run's log.jsonl records as three charts: training loss and learning rate per step (x = epochs done), and
    validation mIoU with each class's IoU per epoch, in the class palette."""
    steps = last_of_each(records, lambda r: (r["epoch"], r["step"]) if "step" in r and "loss" in r else None)
    done = [r["epoch"] + r["step"] / r["steps"] for r in steps]
    vals = last_of_each(records, lambda r: r["epoch"] if "val" in r else None)
    epochs = [r["epoch"] + 1 for r in vals]
    colors = palette(class_names)
    lines = [(name, colors[c], epochs, [percent(r["val"]["per_class"].get(name, {}).get("IoU")) for r in vals])
             for c, name in enumerate(class_names)]
    per_class = [line for line in lines if any(y is not None for y in line[3])]  # classes with an IoU somewhere
    # mIoU takes the black; Background (black in the palette) is drawn in tan
    iou = [("mIoU", (0, 0, 0), epochs, [100 * r["val"]["mIoU"] for r in vals])] + \
        [(n, c if c != (0, 0, 0) else (190, 150, 100), x, y) for n, c, x, y in per_class]
    return stack([
        line_chart([("train loss", (31, 119, 180), done, [r["loss"] for r in steps])],
                   f"{title}  training loss".strip(), "epochs", "loss"),
        line_chart([("lr", (214, 39, 40), done, [r["lr"] for r in steps])], "learning rate", "epochs", "lr",
                   log_y=True),
        line_chart(iou, "validation IoU (%)", "epochs", "IoU %", size=(720, 360), y_range=(0, 100)),
    ])


def percent(value):
    """100 x value, or None (a gap in the line) where a class has no IoU that epoch: absent from the ground truth and
    the prediction."""
    value = nan_none(value)
    return None if value is None else 100 * value


def nan_none(value):
    """None for a missing or NaN value (JSON writes NaN as null)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


# ----------------------------------------------------------------------------- confusion matrix

def confusion_picture(confusion, class_names, title="confusion (rows: ground truth, % of the row)"):
    """The confusion matrix normalised by row, each cell's percentage printed, shaded by it; rows of classes absent
    from the ground truth stay empty. Class names on both axes (predicted ones written upwards)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    n, cell = len(class_names), 44
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = int(max(text_width(probe, name) for name in class_names)) + 10
    left, top = name_w + 14, name_w + 30
    image = Image.new("RGB", (left + n * cell + 10, top + n * cell + 30), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill=INK, font=FONT)
    rows = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, rows, out=np.full_like(confusion, np.nan), where=rows > 0)
    for i in range(n):
        for j in range(n):
            x, y = left + j * cell, top + i * cell
            value = share[i, j]
            shade = WHITE if np.isnan(value) else tuple(int(255 - value * (255 - c)) for c in (8, 69, 148))
            draw.rectangle([x, y, x + cell, y + cell], fill=shade, outline=GRID)
            if not np.isnan(value) and confusion[i, j] > 0:
                text = f"{100 * value:.0f}" if value >= 0.005 else "<1"
                ink = WHITE if value > 0.5 else INK
                draw.text((x + cell / 2 - text_width(draw, text) / 2, y + cell / 2 - 5), text, fill=ink, font=FONT)
    colors = palette(class_names)
    for k, name in enumerate(class_names):
        y = top + k * cell + cell / 2 - 5
        draw.text((left - 8 - text_width(draw, name), y), name, fill=INK, font=FONT)
        draw.rectangle([left - 6, top + k * cell + 2, left - 2, top + (k + 1) * cell - 2], fill=colors[k])
        label = Image.new("RGB", (int(text_width(draw, name)) + 2, 12), WHITE)
        ImageDraw.Draw(label).text((0, 0), name, fill=INK, font=FONT)
        image.paste(label.rotate(90, expand=True), (left + k * cell + cell // 2 - 6, top - 8 - label.width))
    draw.text((left, top + n * cell + 8), "predicted (columns)", fill=INK, font=FONT)
    return image
