"""Plots (PNG) and HTML pages: learning curves, confusion matrix, sample-prediction grid.

Uses matplotlib's object API (`Figure`) so no global pyplot state or GUI backend is touched.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def learning_curves(
    history: dict[str, list[float]], path: str | Path, best_epoch: int | None = None,
    initial_epoch: int = 0, title: str = "Learning curves",
) -> Path:
    """Loss and accuracy per epoch, train vs validation, with the kept (best) epoch marked."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 4)
    axes = fig.subplots(1, 2)
    epochs = np.arange(initial_epoch + 1, initial_epoch + 1 + len(history.get("loss", [])))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, label, style in ((metric, "train", "-"), (f"val_{metric}", "validation", "--")):
            if key in history:
                ax.plot(epochs, history[key], style, marker="o", markersize=3, label=label)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept epoch {best_epoch}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path)
    return Path(path)


def confusion_matrix(cm: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """Counts with true class on rows, predicted on columns; diagonal = correct."""
    n = len(class_names)
    size = max(4.0, 0.6 * n + 2)
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"Confusion matrix (accuracy {accuracy:.4f})")
    fig.savefig(path)
    return Path(path)


def sample_grid(
    x: np.ndarray, y: np.ndarray, probs: np.ndarray, class_names: list[str], path: str | Path,
    count: int = 24, seed: int = 0,
) -> Path:
    """Random test images with predicted label and confidence: green when right, red when wrong."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(x), size=min(count, len(x)), replace=False)
    cols = 6
    rows = max(1, int(np.ceil(len(picks) / cols)))
    fig = _figure(cols * 1.9, rows * 2.1)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, picks, strict=False):
        image = x[i]
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        pred = int(probs[i].argmax())
        right = pred == int(y[i])
        ax.set_title(f"{class_names[pred]} {probs[i, pred]:.0%}\n(true: {class_names[y[i]]})",
                     fontsize=7, color="green" if right else "red")
    fig.suptitle("Sample test predictions (green: right, red: wrong)")
    fig.savefig(path)
    return Path(path)


def html_page(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """A plain HTML page; each section is (heading, html body)."""
    Path(path).write_text(html_text(title, sections))
    return Path(path)


def html_text(title: str, sections: list[tuple[str, str]]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
             "img{max-width:100%}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline_png(fig) -> str:
    """An <img> holding the figure itself, so a page on object storage needs no other file."""
    import base64
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return f"<img src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _inline_pixels(pixels: np.ndarray) -> str:
    """An <img> holding uint8 pixels (H, W, 3) as a PNG."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png")
    return (f"<img width='120' src='data:image/png;base64,"
            f"{base64.b64encode(buffer.getvalue()).decode()}'>")


SHEET_SIZE = 24
"""The label report shows this many of the least confident images."""


def label_report(summary: dict, rows, thumbnail, class_names: list[str],
                 sheet_size: int = SHEET_SIZE) -> str:
    """The labelling run's HTML page: counts per class, errors by kind, a confidence histogram
    and a contact sheet of the least confident images (`thumbnail(path)` -> uint8 RGB or None).
    `rows`: a DataFrame with path, label, confidence, error."""
    labelled = rows[rows["error"].isna() & rows["label"].notna()]
    counts = labelled["label"].value_counts()
    fig = _figure(10, 0.35 * len(class_names) + 1.5)
    ax = fig.subplots()
    values = [int(counts.get(name, 0)) for name in class_names][::-1]
    bars = ax.barh(class_names[::-1], values, color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value}", va="center",
                fontsize=8)
    ax.set_xlabel("files")
    ax.set_title(f"{len(labelled)} files labelled, per class")
    per_class = _inline_png(fig)

    fig = _figure(10, 3.5)
    ax = fig.subplots()
    ax.hist(labelled["confidence"].astype(float), bins=np.linspace(0, 1, 41), color="tab:green")
    ax.set_xlabel("confidence of the top label")
    ax.set_ylabel("files")
    ax.set_title("Confidence")
    histogram = _inline_png(fig)

    errors = rows["error"].dropna().map(lambda e: str(e).split(":")[0]).value_counts()
    error_table = ("<p>No bad files.</p>" if errors.empty else "<table><tr><th>error</th>"
                   "<th>files</th></tr>" + "".join(
                       f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
                       for k, v in errors.items()) + "</table>")
    lowest = labelled.nsmallest(sheet_size, "confidence")
    shown = [(r.path, r.label, r.confidence, thumbnail(r.path)) for r in lowest.itertuples()]
    shown = [s for s in shown if s[3] is not None]
    sheet = "<p>No labelled images.</p>"
    if shown:  # HTML, not one figure: laying out 24 titled axes took matplotlib ~1 s
        sheet = "<div style='display:flex;flex-wrap:wrap;gap:8px'>" + "".join(
            f"<figure style='margin:0;width:120px;font-size:11px'>{_inline_pixels(pixels)}"
            f"<figcaption>{html.escape(str(label))} {confidence:.0%}<br>"
            f"{html.escape(Path(path).name)}</figcaption></figure>"
            for path, label, confidence, pixels in shown) + "</div>"
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(summary.get(k)))}</td>"
                    "</tr>" for k in ("output", "model_id", "files", "labelled", "errors",
                                      "unread", "missing", "duplicates", "needs_review",
                                      "files_per_s", "wall_s"))
    return html_text("clfsys labelling report", [
        ("Summary", f"<table>{facts}</table>"),
        ("Labels per class", per_class),
        ("Bad files, by kind", error_table),
        ("Confidence of the top label", histogram),
        (f"The {len(shown)} least confident images", sheet),
    ])


_END_MARKERS = {"asha": ("x", "stopped by ASHA"), "early_stopping": ("o", "Keras early stopping"),
                "max_epochs": ("s", "ran max epochs"), "error": ("X", "errored"),
                "time_budget": ("v", "time budget")}


def trial_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], stopped_by: dict[str, str],
                 best: str, path: str | Path) -> Path:
    """Validation accuracy per epoch of every trial; the end marker says why each one stopped."""
    fig = _figure(11, 6)
    ax = fig.subplots()
    for trial_id, (epochs, values) in curves.items():
        is_best = trial_id == best
        label = f"{trial_id} (best)" if is_best else None
        line, = ax.plot(epochs, values, linewidth=2.5 if is_best else 1,
                        alpha=1 if is_best else 0.6, label=label)
        marker = _END_MARKERS.get(stopped_by.get(trial_id, ""), ("", ""))[0]
        if marker and len(epochs):
            ax.plot(epochs[-1], values[-1], marker=marker, color=line.get_color(), markersize=8)
    for marker, label in _END_MARKERS.values():
        ax.plot([], [], marker=marker, linestyle="", color="grey", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{len(curves)} trials: where each one stopped")
    fig.savefig(path)
    return Path(path)


def leaderboard(rows: list[dict], path: str | Path, top: int = 15) -> Path:
    """Horizontal bars of the best validation accuracy of the top trials."""
    rows = rows[:top]
    fig = _figure(10, 0.45 * len(rows) + 1.5)
    ax = fig.subplots()
    labels = [f"{r['trial_id']} {r.get('param.model.arch') or ''}" for r in rows][::-1]
    values = [r["best_val_accuracy"] for r in rows][::-1]
    bars = ax.barh(labels, values, color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.4f}",
                va="center", fontsize=8)
    low = min(values)
    ax.set_xlim(max(0.0, low - (1 - low) * 0.5), 1.0)
    ax.set_xlabel("best validation accuracy")
    ax.set_title("Leaderboard")
    fig.savefig(path)
    return Path(path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indexes of the points (cost, accuracy) that no other point beats on both: cheaper or as
    cheap and more accurate. Sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def accuracy_vs_latency(rows: list[dict], column: str, path: str | Path, chosen: str,
                        limit: float | None = None) -> Path:
    """Best validation accuracy against measured latency (`column`, ms per image) for every
    trial that measured it; the Pareto front drawn, the chosen trial and the latency limit
    marked."""
    rows = [r for r in rows if r.get(column) is not None]
    fig = _figure(9, 5.5)
    ax = fig.subplots()
    points = [(float(r[column]), float(r["best_val_accuracy"])) for r in rows]
    front = pareto_front(points)
    xs, ys = zip(*points, strict=True) if points else ((), ())
    ax.scatter(xs, ys, color="tab:gray", alpha=0.7, label="trial")
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-o",
            color="tab:blue", label="Pareto front")
    for r, (x, y) in zip(rows, points, strict=True):
        if r["trial_id"] == chosen:
            ax.scatter([x], [y], s=180, facecolors="none", edgecolors="tab:red", linewidths=2,
                       label=f"best bundle ({chosen})")
        ax.annotate(str(r.get("param.model.arch") or ""), (x, y), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if limit is not None:
        ax.axvline(limit, color="tab:red", linestyle="--", label=f"limit {limit:g} ms")
    if points and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(f"{column.replace('_', ' ')} (ms, measured in the trial)")
    ax.set_ylabel("best validation accuracy")
    ax.set_title("Accuracy against serving latency")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path)
    return Path(path)
