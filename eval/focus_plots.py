"""Figures for the over-focus diagnostics (:mod:`defocus_vlm.eval.focus`), laid out like the
paper's: one row per model, columns per layer, every map divided by its maximum.

Per image: ``attention`` (A as an L x L matrix), ``receptive_field`` and ``gradient`` (per
layer, the map on the patch grid and the same map over the image); for all images together:
``summary`` (each metric against the layer, one line per model). matplotlib (Agg) is imported
only here."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .focus import METRICS, FocusImage, ModelFocus, image_tag

TOKEN_MAPS = {"receptive_field": "receptive field r", "gradient": "gradient map g"}
_PANEL = 1.9  # inches per panel
_TITLE = 0.3  # inches above each row of panels for their titles (else they overlap the row above)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scaled(values: np.ndarray) -> np.ndarray:
    peak = float(values.max()) if values.size else 0.0
    return values / peak if peak > 0 else values


def _show_image(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image)


def _wrapped(name: str) -> str:
    return "\n".join(textwrap.wrap(name, 24))


def _row_label(ax, name: str) -> None:
    ax.set_ylabel(_wrapped(name), fontsize=8)


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(results: Sequence[ModelFocus], columns_per_layer: int, lead_columns: int = 0):
    plt = _pyplot()
    cols = lead_columns + columns_per_layer * max(len(r.layers) for r in results)
    width = _PANEL * max(cols, 3)  # room for the title and the row labels
    height = (_PANEL + _TITLE) * len(results) + 0.4
    fig, axes = plt.subplots(len(results), cols, figsize=(width, height), squeeze=False)
    for ax in axes.flat:
        _bare(ax)
        ax.set_frame_on(False)
    return plt, fig, axes


def _save(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_attention(results: Sequence[ModelFocus], index: int, path: Path) -> Path:
    """A (rows: outputs i, columns: inputs j, sequence order) of image ``index`` per model and layer."""
    plt, fig, axes = _grid(results, 1)
    for row, result in zip(axes, results, strict=True):
        for ax, layer in zip(row, result.layers, strict=False):
            ax.set_frame_on(True)
            ax.imshow(_scaled(result.maps[layer].attention[index].numpy()), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}", fontsize=9)
        _row_label(row[0], result.name)
    return _save(plt, fig, path, "approximate attention map A (diagonal removed)")


def plot_token_map(results: Sequence[ModelFocus], kind: str, index: int, path: Path) -> Path:
    """``kind`` ("receptive_field" or "gradient") of image ``index``: per layer the map on the
    patch grid, then over the image."""
    if kind not in TOKEN_MAPS:
        raise ValueError(f"kind must be one of {sorted(TOKEN_MAPS)}, got {kind!r}")
    plt, fig, axes = _grid(results, 2, lead_columns=1)
    for row, result in zip(axes, results, strict=True):
        image = result.display[index]
        height, width = image.shape[:2]
        _show_image(row[0], image)
        row[0].set_frame_on(True)
        label = result.labels[index]
        row[0].set_title(f"input: {result.config.id2label.get(label, label)}", fontsize=9)
        _row_label(row[0], result.name)
        for k, layer in enumerate(result.layers):
            grid_ax, overlay_ax = row[1 + 2 * k], row[2 + 2 * k]
            values = _scaled(result.token_map(getattr(result.maps[layer], kind)[index]))
            grid_ax.imshow(values, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            grid_ax.set_title(f"layer {layer}", fontsize=9)
            _show_image(overlay_ax, image)
            overlay_ax.imshow(values, cmap="jet", vmin=0, vmax=1, alpha=0.5, interpolation="nearest",
                              extent=(-0.5, width - 0.5, height - 0.5, -0.5))  # imshow's pixel-centre extent
            overlay_ax.set_title(f"layer {layer} on image", fontsize=9)
            for ax in (grid_ax, overlay_ax):
                ax.set_frame_on(True)
    return _save(plt, fig, path, TOKEN_MAPS[kind])


def plot_summary(results: Sequence[ModelFocus], path: Path) -> Path:
    """Each metric (mean over images) against the layer index, one line per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.6))
    for result in results:
        summary = result.summary()
        layers = [int(layer) for layer in summary]
        for ax, metric in zip(axes, METRICS, strict=True):
            ax.plot(layers, [summary[str(layer)][metric] for layer in layers], marker="o",
                    label=_wrapped(result.name))
    for ax, metric in zip(axes, METRICS, strict=True):
        ax.set(title=metric, xlabel="layer")
        ax.set_xticks(sorted({layer for r in results for layer in r.layers}))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle("over-focus summaries (mean over images)")
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_figures(results: Sequence[ModelFocus], images: Sequence[FocusImage], out_dir: str | Path) -> list[Path]:
    """Every figure for every image, plus the summary; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images):
        tag = image_tag(index, image.spec)
        written.append(plot_attention(results, index, out_dir / f"{tag}_attention.png"))
        for kind in TOKEN_MAPS:
            written.append(plot_token_map(results, kind, index, out_dir / f"{tag}_{kind}.png"))
    written.append(plot_summary(results, out_dir / "summary.png"))
    return written
