"""Figure builders and the small aggregations behind them (pure functions, no Streamlit).

Used by the app's pages, and usable from a notebook. Conventions:

* relevance colours are diverging and centred at zero: **red = positive** (evidence for the explained class),
  **blue = negative** (evidence against it), white = zero; the colour limit is symmetric, by default the 99th
  percentile of ``|R|`` so that a few extreme weights do not wash out the rest (values beyond are clipped);
* a conv layer's weight relevance ``R[o, i, kh, kw]`` is shown as an output x input channel map of the summed
  kernel relevance; a linear layer's as its weight matrix (output x input);
* matrices with more cells than ``max_cells`` are colourised to an image (``px.imshow(..., binary_string=True)``)
  so that the browser stays fast.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from xaicomp_core.viz.style import (  # noqa: F401  (re-exported: figures' public names)
    NEGATIVE_COLOUR,
    POSITIVE_COLOUR,
    RELEVANCE_SCALE,
    ZERO_COLOUR,
    criterion_colour,
    fmt_bytes,
    fmt_pct,
    fmt_pp,
)

FONT = {"size": 15}
#: Horizontal legend above the plot area (never over the axes or a title).
TOP_LEGEND = {"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom"}


# ----------------------------------------------------------------------------------------------------------------
# Aggregation (numpy)
# ----------------------------------------------------------------------------------------------------------------
def to_numpy(t: Any) -> np.ndarray:
    """A tensor or array as a float64 numpy array (detached, on CPU)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def weight_matrix(rel: Any) -> np.ndarray:
    """A layer's weight relevance as a 2-D matrix (output x input).

    Parameters
    ----------
    rel : array-like
        Relevance with the weight's shape: ``(out, in)`` for linear layers, ``(out, in, *kernel)`` for convs.

    Returns
    -------
    numpy.ndarray
        For convs, the relevance of each kernel summed over its spatial positions (output x input channel map);
        for linear layers the matrix itself.
    """
    a = to_numpy(rel)
    if a.ndim < 2:
        raise ValueError(f"weight relevance must have at least 2 dimensions, got shape {a.shape}")
    if a.ndim == 2:
        return a
    return a.reshape(a.shape[0], a.shape[1], -1).sum(-1)


def block_reduce(mat: np.ndarray, max_rows: int, max_cols: int) -> tuple[np.ndarray, int, int]:
    """Sum non-overlapping blocks so that the result has at most ``max_rows`` x ``max_cols`` cells.

    Parameters
    ----------
    mat : numpy.ndarray
        2-D matrix.
    max_rows, max_cols : int
        Size limits.

    Returns
    -------
    reduced : numpy.ndarray
        Block sums (edge blocks may be smaller).
    row_block, col_block : int
        Rows and columns of ``mat`` per block.
    """
    m = np.asarray(mat, dtype=np.float64)
    rb = max(1, math.ceil(m.shape[0] / max(max_rows, 1)))
    cb = max(1, math.ceil(m.shape[1] / max(max_cols, 1)))
    if rb == 1 and cb == 1:
        return m, 1, 1
    rows = math.ceil(m.shape[0] / rb)
    cols = math.ceil(m.shape[1] / cb)
    padded = np.zeros((rows * rb, cols * cb))
    padded[:m.shape[0], :m.shape[1]] = m
    return padded.reshape(rows, rb, cols, cb).sum(axis=(1, 3)), rb, cb


def symmetric_limit(values: Any, percentile: float = 99.0) -> float:
    """Symmetric colour limit for a diverging scale: the given percentile of ``|values|`` (ignoring NaN).

    Returns 1.0 when all values are zero (so a scale can still be drawn).
    """
    a = np.abs(to_numpy(values)).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 1.0
    lim = float(np.percentile(a, percentile)) if percentile < 100 else float(a.max())
    if lim <= 0:
        lim = float(a.max())
    return lim if lim > 0 else 1.0


def diverging_rgb(mat: np.ndarray, limit: float | None = None) -> np.ndarray:
    """Colourise a matrix with the relevance scale (red positive, blue negative, white zero; NaN light grey).

    Parameters
    ----------
    mat : numpy.ndarray
        2-D values.
    limit : float, optional
        Values are clipped to ``[-limit, limit]``; default :func:`symmetric_limit`.

    Returns
    -------
    numpy.ndarray
        uint8 RGB image of shape ``mat.shape + (3,)``.
    """
    import matplotlib

    m = np.asarray(mat, dtype=np.float64)
    lim = symmetric_limit(m) if limit is None else float(limit)
    lim = lim if lim > 0 else 1.0
    norm = np.clip((m / lim + 1.0) / 2.0, 0.0, 1.0)
    cmap = matplotlib.colormaps["RdBu_r"]
    rgb = cmap(np.nan_to_num(norm, nan=0.5))[..., :3]
    rgb[~np.isfinite(m)] = 0.93
    return (rgb * 255).round().astype(np.uint8)


def sign_shares(relevance: Mapping[str, Any], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per layer: the fractions of weights with positive, exactly zero and negative relevance.

    Parameters
    ----------
    relevance : mapping of str to array-like
        Weight relevance by parameter name.
    names : sequence of str, optional
        Which parameters, in order (default: all keys ending in ``weight``).

    Returns
    -------
    list of dict
        ``{"layer", "weights", "positive", "zero", "negative"}`` (fractions sum to 1), plus a last row
        ``layer="all"`` over every listed weight.
    """
    names = list(names) if names is not None else [k for k in relevance if k.endswith("weight")]
    rows = []
    tot = np.zeros(3)
    for name in names:
        a = to_numpy(relevance[name]).ravel()
        counts = np.array([(a > 0).sum(), (a == 0).sum(), (a < 0).sum()], dtype=np.float64)
        tot += counts
        n = max(a.size, 1)
        rows.append({"layer": name.removesuffix(".weight"), "weights": int(a.size), "positive": counts[0] / n,
                     "zero": counts[1] / n, "negative": counts[2] / n})
    n = max(tot.sum(), 1)
    rows.append({"layer": "all", "weights": int(tot.sum()), "positive": tot[0] / n, "zero": tot[1] / n,
                 "negative": tot[2] / n})
    return rows


def mass_vs_count(relevance: Mapping[str, Any], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per layer: its share of all weights and its share of the total absolute relevance.

    A layer whose relevance share is far below its weight share holds many weights that matter little: an LRP
    criterion with global scope prunes it hardest.

    Returns
    -------
    list of dict
        ``{"layer", "weights", "weight_share", "abs_relevance", "relevance_share", "signed_relevance"}``.
    """
    names = list(names) if names is not None else [k for k in relevance if k.endswith("weight")]
    arrays = [to_numpy(relevance[n]) for n in names]
    counts = np.array([a.size for a in arrays], dtype=np.float64)
    mass = np.array([np.abs(a).sum() for a in arrays])
    signed = [float(a.sum()) for a in arrays]
    cs, ms = max(counts.sum(), 1.0), mass.sum()
    ms = ms if ms > 0 else 1.0
    return [{"layer": n.removesuffix(".weight"), "weights": int(c), "weight_share": c / cs,
             "abs_relevance": float(m), "relevance_share": m / ms, "signed_relevance": s}
            for n, c, m, s in zip(names, counts, mass, signed)]


def kernel_mosaic(kernels: Any, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile a filter's kernels (one per input channel) into one 2-D image, NaN between tiles.

    Parameters
    ----------
    kernels : array-like
        Shape ``(in_channels, kh, kw)``.
    cols : int, optional
        Tiles per row (default about ``sqrt(in_channels)``).
    pad : int
        NaN pixels between tiles.
    """
    k = to_numpy(kernels)
    if k.ndim == 2:
        k = k[None]
    if k.ndim != 3:
        raise ValueError(f"kernels must have shape (in, kh, kw), got {k.shape}")
    n, kh, kw = k.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.full((rows * (kh + pad) - pad, cols * (kw + pad) - pad), np.nan)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (kh + pad):r * (kh + pad) + kh, c * (kw + pad):c * (kw + pad) + kw] = k[i]
    return out


def denormalize(x: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Model inputs ``(N, C, H, W)`` back to displayable pixels in [0, 1]: ``(N, H, W)`` or ``(N, H, W, 3)``."""
    a = to_numpy(x)
    m = np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1)
    a = np.clip(a * s + m, 0.0, 1.0)
    return a[:, 0] if a.shape[1] == 1 else a[:, :3].transpose(0, 2, 3, 1)


def flow_rows(flows: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Relevance bookkeeping per layer (from ``RelevanceResult.flows``): what enters from above, what reaches the
    layer's inputs, weights and biases, and the conservation gap ``weights - inputs`` (zero up to rounding)."""
    rows = []
    for name, f in flows.items():
        rows.append({"layer": name, "rule": f.rule, "relevance from above": f.output, "to inputs": f.input,
                     "to weights": f.weight, "to biases": f.bias, "weights - inputs": f.weight - f.input})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------
def _layout(fig: go.Figure, title: str | None = None, height: int | None = None, **kw: Any) -> go.Figure:
    fig.update_layout(font=FONT, margin={"l": 10, "r": 10, "t": 100 if title else 40, "b": 10},
                      title={"text": title} if title else None, template="plotly_white", **kw)
    if height:
        fig.update_layout(height=height)
    return fig


def relevance_heatmap(mat: Any, title: str = "", x_title: str = "input", y_title: str = "output",
                      limit: float | None = None, max_cells: int = 40_000, height: int = 480,
                      hover_label: str = "relevance") -> go.Figure:
    """Heatmap of a relevance matrix on the diverging red/blue scale, centred at zero.

    Parameters
    ----------
    mat : array-like
        2-D values (NaN is drawn light grey).
    title, x_title, y_title : str
        Labels.
    limit : float, optional
        Symmetric colour limit (default: 99th percentile of ``|mat|``).
    max_cells : int
        Above this many cells the matrix is colourised to an image (no per-cell hover, fast in the browser).
    height : int
        Figure height in pixels.
    hover_label : str
        Name of the value in the hover text.
    """
    m = to_numpy(mat)
    if m.ndim != 2:
        raise ValueError(f"need a 2-D matrix, got shape {m.shape}")
    lim = symmetric_limit(m) if limit is None else float(limit)
    if m.size <= max_cells:
        fig = go.Figure(go.Heatmap(
            z=m, colorscale=RELEVANCE_SCALE, zmid=0, zmin=-lim, zmax=lim,
            colorbar={"title": {"text": hover_label}},
            hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>{hover_label} %{{z:.4g}}<extra></extra>"))
        fig.update_yaxes(autorange="reversed")
    else:
        fig = px.imshow(diverging_rgb(m, lim), binary_string=True)
        fig.update_traces(hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<extra></extra>")
        # A one-point invisible trace carries the colour bar of the image.
        fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers", hoverinfo="skip", showlegend=False,
                                 marker={"size": 0.1, "color": [0], "colorscale": RELEVANCE_SCALE, "cmin": -lim,
                                         "cmax": lim, "showscale": True,
                                         "colorbar": {"title": {"text": hover_label}}}))
    fig.update_xaxes(title_text=x_title, showgrid=False)
    fig.update_yaxes(title_text=y_title, showgrid=False)
    return _layout(fig, title, height)


def kernel_figure(rel_kernels: Any, weight_kernels: Any | None = None, title: str = "") -> go.Figure:
    """One conv filter's kernels: relevance (left) and, if given, the weights themselves (right).

    Parameters
    ----------
    rel_kernels : array-like
        Relevance of the filter, shape ``(in_channels, kh, kw)``.
    weight_kernels : array-like, optional
        The filter's weights, same shape (drawn on the same diverging scale with their own limit).
    title : str
        Figure title.
    """
    rel = kernel_mosaic(rel_kernels)
    panels = [("relevance", rel, symmetric_limit(rel, 100))]
    if weight_kernels is not None:
        w = kernel_mosaic(weight_kernels)
        panels.append(("weight", w, symmetric_limit(w, 100)))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], horizontal_spacing=0.12)
    for j, (name, m, lim) in enumerate(panels, start=1):
        fig.add_trace(go.Heatmap(z=m, colorscale=RELEVANCE_SCALE, zmid=0, zmin=-lim, zmax=lim, name=name,
                                 colorbar={"x": (0.44 if j == 1 and len(panels) == 2 else 1.0), "len": 0.9},
                                 hovertemplate=f"{name} %{{z:.4g}}<extra></extra>"), row=1, col=j)
        fig.update_yaxes(autorange="reversed", showticklabels=False, showgrid=False, scaleanchor=f"x{j}",
                         row=1, col=j)
        fig.update_xaxes(showticklabels=False, showgrid=False, row=1, col=j)
    return _layout(fig, title, 420)


def sign_share_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> go.Figure:
    """Stacked horizontal bars: share of positive / zero / negative weight relevance per layer (see
    :func:`sign_shares`)."""
    layers = [r["layer"] for r in rows]
    fig = go.Figure()
    for key, colour in (("positive", POSITIVE_COLOUR), ("zero", ZERO_COLOUR), ("negative", NEGATIVE_COLOUR)):
        vals = [100 * r[key] for r in rows]
        fig.add_trace(go.Bar(y=layers, x=vals, name=key, orientation="h", marker_color=colour,
                             text=[f"{v:.0f}%" if v >= 4 else "" for v in vals], textposition="inside",
                             hovertemplate=f"%{{y}}: %{{x:.1f}}% {key}<extra></extra>"))
    fig.update_layout(barmode="stack", legend=TOP_LEGEND)
    fig.update_xaxes(title_text="share of weights (%)", range=[0, 100])
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, 120 + 38 * len(rows))


def mass_vs_count_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> go.Figure:
    """Grouped bars per layer: share of all weights vs share of the total |relevance| (see :func:`mass_vs_count`)."""
    layers = [r["layer"] for r in rows]
    fig = go.Figure([
        go.Bar(x=layers, y=[100 * r["weight_share"] for r in rows], name="share of weights", marker_color="#607d8b",
               hovertemplate="%{x}: %{y:.1f}% of the weights<extra></extra>"),
        go.Bar(x=layers, y=[100 * r["relevance_share"] for r in rows], name="share of |relevance|",
               marker_color=POSITIVE_COLOUR, hovertemplate="%{x}: %{y:.1f}% of the |relevance|<extra></extra>"),
    ])
    fig.update_layout(barmode="group", legend=TOP_LEGEND)
    fig.update_yaxes(title_text="%")
    return _layout(fig, title, 380)


def sample_grid(images: Any, titles: Sequence[str], cols: int = 8, height_per_row: int = 150,
                colours: Sequence[str] | None = None) -> go.Figure:
    """A grid of images with a title above each (e.g. true and predicted class).

    Parameters
    ----------
    images : array-like
        ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB, values in [0, 1].
    titles : sequence of str
        One per image.
    cols : int
        Images per row.
    colours : sequence of str, optional
        Colour of each title (e.g. green for right, red for wrong predictions).
    """
    a = np.clip(to_numpy(images), 0, 1)
    n = len(a)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    gray = a.ndim == 3
    pix = (a * 255).round().astype(np.uint8)
    if gray:
        pix = np.repeat(pix[..., None], 3, axis=-1)
    fig = px.imshow(pix, facet_col=0, facet_col_wrap=cols, binary_string=True,
                    facet_col_spacing=0.01, facet_row_spacing=0.12 / max(rows, 1))
    # Plotly orders facets bottom-up by row; map annotations back to the images by their facet index.
    for ann in fig.layout.annotations:
        i = int(ann.text.split("=")[-1])
        ann.text = titles[i]
        ann.font = {"size": 13, "color": (colours[i] if colours else "#222")}
    fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
    fig.update_traces(hovertemplate="%{x}, %{y}<extra></extra>")
    return _layout(fig, None, 40 + rows * height_per_row)


def input_heatmap_grid(images: Any, relevances: Sequence[Any], titles: Sequence[Sequence[str]],
                       percentile: float = 99.5) -> go.Figure:
    """Rows of samples: the image, then one pixel-relevance heatmap per entry of ``relevances``.

    All heatmaps of a row share one symmetric colour limit so that, e.g., original and compressed model compare.

    Parameters
    ----------
    images : array-like
        ``(N, H, W)`` or ``(N, H, W, 3)`` in [0, 1].
    relevances : sequence of array-like
        One pixel relevance array of shape ``(N, H, W)`` per heatmap column.
    titles : sequence of sequence of str
        Per sample, one title per cell (``1 + len(relevances)`` of them).
    percentile : float
        Percentile of ``|R|`` over the row used as colour limit.
    """
    imgs = np.clip(to_numpy(images), 0, 1)
    n = len(imgs)
    rels = [to_numpy(r) for r in relevances]
    ncols = 1 + len(rels)
    flat_titles = []
    for i in range(n):
        row = list(titles[i])
        if len(row) != ncols:
            raise ValueError(f"row {i} needs {ncols} titles, got {len(row)}")
        flat_titles.extend(row)
    fig = make_subplots(rows=n, cols=ncols, subplot_titles=flat_titles, horizontal_spacing=0.03,
                        vertical_spacing=min(0.08, 0.4 / max(n, 1)))
    for i in range(n):
        img = imgs[i]
        rgb = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img
        fig.add_trace(go.Image(z=(rgb * 255).round().astype(np.uint8), hoverinfo="skip"), row=i + 1, col=1)
        lim = symmetric_limit(np.stack([r[i] for r in rels]), percentile) if rels else 1.0
        for j, r in enumerate(rels, start=2):
            fig.add_trace(go.Heatmap(z=r[i], colorscale=RELEVANCE_SCALE, zmid=0, zmin=-lim, zmax=lim,
                                     showscale=False, hovertemplate="pixel relevance %{z:.3g}<extra></extra>"),
                          row=i + 1, col=j)
            fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i * ncols + j}", row=i + 1, col=j)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    for ann in fig.layout.annotations:
        ann.font = {"size": 14}
    return _layout(fig, None, 40 + 250 * n)


def layer_stats_figure(layers: Sequence[Any], title: str = "") -> go.Figure:
    """Per layer: pruned share (bars, left) and mean bit width of the kept weights (markers, right axis).

    Parameters
    ----------
    layers : sequence of LayerStats
        From ``EvaluationResult.layers`` (uses ``name``, ``sparsity``, ``mean_bits``, ``params``, ``protected``).
    """
    names = [layer.name for layer in layers]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=names, y=[100 * layer.sparsity for layer in layers], name="pruned (%)",
                         marker_color="#78909c", customdata=[[layer.params, layer.kept] for layer in layers],
                         hovertemplate="%{x}<br>pruned %{y:.1f}%<br>kept %{customdata[1]:,} of %{customdata[0]:,}"
                                       "<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=names, y=[layer.mean_bits for layer in layers], name="mean bits of kept weights",
                             mode="markers+lines", marker={"size": 12, "color": "#c2185b"}, line={"dash": "dot"},
                             hovertemplate="%{x}<br>mean %{y:.2f} bits<extra></extra>"), secondary_y=True)
    fig.update_yaxes(title_text="pruned (%)", range=[0, 100], secondary_y=False)
    top = max([8.0] + [layer.mean_bits for layer in layers])
    fig.update_yaxes(title_text="mean bits", range=[0, 9 if top <= 8 else 34], dtick=2 if top <= 8 else 8,
                     secondary_y=True, showgrid=False)
    fig.update_layout(legend=TOP_LEGEND)
    return _layout(fig, title, 380)


def per_class_figure(class_names: Sequence[str], series: Sequence[tuple[str, Sequence[float]]],
                     title: str = "") -> go.Figure:
    """Grouped bars of per-class accuracy (%), one series per model (e.g. original, compressed, magnitude)."""
    palette = ["#90a4ae", "#c2185b", "#1f77b4", "#ff7f0e"]
    fig = go.Figure([go.Bar(x=list(class_names), y=[100 * v for v in vals], name=name,
                            marker_color=palette[i % len(palette)],
                            hovertemplate="%{x}: %{y:.1f}%<extra>" + name + "</extra>")
                     for i, (name, vals) in enumerate(series)])
    fig.update_layout(barmode="group", legend=TOP_LEGEND)
    fig.update_yaxes(title_text="accuracy (%)", range=[0, 100])
    return _layout(fig, title, 380)


SECTION_LABELS = {"value": "kept values", "keep": "which weights are kept", "class": "bit width of each weight",
                  "scale": "quantization scales", "raw": "biases, norms, protected layers (fp32)"}


def size_sections_figure(sections: Mapping[str, int], fp32_bytes: int, title: str = "") -> go.Figure:
    """Horizontal stacked bar: where the bytes of the packed model go, next to the fp32 reference.

    Parameters
    ----------
    sections : mapping of str to int
        ``SizeBreakdown.section_totals()`` (value, keep, class, scale, raw).
    fp32_bytes : int
        fp32 dense size.
    """
    colours = {"value": "#c2185b", "keep": "#7b1fa2", "class": "#ff9800", "scale": "#4caf50", "raw": "#607d8b"}
    fig = go.Figure()
    for key, val in sections.items():
        fig.add_trace(go.Bar(y=["compressed"], x=[val], name=SECTION_LABELS.get(key, key), orientation="h",
                             marker_color=colours.get(key, "#999"),
                             hovertemplate=f"{SECTION_LABELS.get(key, key)}: %{{x:,}} bytes<extra></extra>"))
    fig.add_trace(go.Bar(y=["fp32 dense"], x=[fp32_bytes], name="fp32 dense", orientation="h",
                         marker_color="#cfd8dc", hovertemplate="fp32 dense: %{x:,} bytes<extra></extra>"))
    fig.update_layout(barmode="stack", legend=TOP_LEGEND)
    fig.update_xaxes(title_text="bytes")
    return _layout(fig, title, 270)


def pareto_figure(rows: Sequence[Mapping[str, Any]], current: Mapping[str, Any] | None = None,
                  title: str = "", log_x: bool = False) -> go.Figure:
    """Size-vs-accuracy curves per criterion (from :func:`xaicomp_core.evaluate.sweep.run_sweep`), Pareto points filled.

    Parameters
    ----------
    rows : sequence of dict
        Sweep rows with ``criterion``, ``estimated_bytes``, ``accuracy``, ``pareto``, ``prune_ratio``, ``bits``.
    current : dict, optional
        ``{"estimated_bytes", "accuracy", "label"}`` of the current plan, drawn as a star.
    log_x : bool
        Logarithmic size axis.
    """
    fig = go.Figure()
    if rows:
        base = rows[0]["baseline_accuracy"]
        fig.add_hline(y=100 * base, line_dash="dash", line_color="#777",
                      annotation_text=f"original {100 * base:.2f}%", annotation_position="bottom left")
    for crit in dict.fromkeys(r["criterion"] for r in rows):
        pts = sorted((r for r in rows if r["criterion"] == crit), key=lambda r: r["estimated_bytes"])
        colour = criterion_colour(crit)
        fig.add_trace(go.Scatter(
            x=[r["estimated_bytes"] for r in pts], y=[100 * r["accuracy"] for r in pts], name=crit,
            mode="lines+markers", line={"color": colour, "width": 2.5},
            marker={"size": [12 if r.get("pareto") else 8 for r in pts], "color": colour,
                    "symbol": ["circle" if r.get("pareto") else "circle-open" for r in pts]},
            customdata=[[r["prune_ratio"], r["bits"], "yes" if r.get("pareto") else "no"] for r in pts],
            hovertemplate=(f"<b>{crit}</b><br>size %{{x:,}} bytes<br>accuracy %{{y:.2f}}%<br>"
                           "prune %{customdata[0]:.0%} · bits %{customdata[1]}<br>Pareto: %{customdata[2]}"
                           "<extra></extra>")))
    if current is not None:
        fig.add_trace(go.Scatter(x=[current["estimated_bytes"]], y=[100 * current["accuracy"]], mode="markers",
                                 name=str(current.get("label", "current plan")),
                                 marker={"symbol": "star", "size": 22, "color": "#ffd600",
                                         "line": {"color": "#222", "width": 1.5}},
                                 hovertemplate="current plan<br>size %{x:,} bytes<br>accuracy %{y:.2f}%"
                                               "<extra></extra>"))
    fig.update_xaxes(title_text="estimated size (bytes" + (", log scale)" if log_x else ")"),
                     type="log" if log_x else "linear")
    fig.update_yaxes(title_text="top-1 accuracy (%)")
    fig.update_layout(legend=TOP_LEGEND)
    return _layout(fig, title, 520)


def pareto_png(rows: Sequence[Mapping[str, Any]], current: Mapping[str, Any] | None = None, title: str = "",
               dpi: int = 150, log_x: bool = False) -> bytes:
    """The Pareto chart of :func:`pareto_figure` as a PNG (drawn with matplotlib; no browser needed).

    Returns
    -------
    bytes
        PNG file contents.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=dpi)
    ax = fig.add_subplot()
    for crit in dict.fromkeys(r["criterion"] for r in rows):
        pts = sorted((r for r in rows if r["criterion"] == crit), key=lambda r: r["estimated_bytes"])
        colour = criterion_colour(crit)
        xs = [r["estimated_bytes"] for r in pts]
        ys = [100 * r["accuracy"] for r in pts]
        ax.plot(xs, ys, "-", color=colour, label=crit, lw=2)
        ax.scatter([x for x, r in zip(xs, pts) if r.get("pareto")], [y for y, r in zip(ys, pts) if r.get("pareto")],
                   color=colour, s=40, zorder=3)
        ax.scatter([x for x, r in zip(xs, pts) if not r.get("pareto")],
                   [y for y, r in zip(ys, pts) if not r.get("pareto")], facecolors="none", edgecolors=colour, s=30,
                   zorder=3)
    if rows:
        ax.axhline(100 * rows[0]["baseline_accuracy"], ls="--", color="#777", lw=1, label="original")
    if current is not None:
        ax.scatter([current["estimated_bytes"]], [100 * current["accuracy"]], marker="*", s=300, color="#ffd600",
                   edgecolors="#222", zorder=4, label=str(current.get("label", "current plan")))
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("estimated size (bytes" + (", log scale)" if log_x else ")"))
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=9)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def relevance_histogram(values: Any, title: str = "", bins: int = 80, percentile: float = 99.0) -> go.Figure:
    """Histogram of signed weight relevance (clipped to the ``percentile`` of ``|R|``), bars coloured by sign.

    Exact zeros get their own grey bar so that they are not hidden in the bin around zero.
    """
    a = to_numpy(values).ravel()
    lim = symmetric_limit(a, percentile)
    nz = np.clip(a[a != 0], -lim, lim)
    counts, edges = np.histogram(nz, bins=bins, range=(-lim, lim))
    centres = (edges[:-1] + edges[1:]) / 2
    colours = [POSITIVE_COLOUR if c > 0 else NEGATIVE_COLOUR for c in centres]
    fig = go.Figure(go.Bar(x=centres, y=counts, marker_color=colours, name="non-zero",
                           hovertemplate="relevance ≈ %{x:.3g}: %{y:,} weights<extra></extra>"))
    zeros = int((a == 0).sum())
    fig.add_trace(go.Bar(x=[0.0], y=[zeros], width=[(edges[1] - edges[0]) * 1.5], marker_color=ZERO_COLOUR,
                         name=f"exactly zero ({zeros:,})", hovertemplate="exactly zero: %{y:,} weights<extra></extra>"))
    fig.update_xaxes(title_text="weight relevance (clipped at the 99th percentile of |R|)")
    fig.update_yaxes(title_text="weights", type="log")
    fig.update_layout(bargap=0, legend=TOP_LEGEND)
    return _layout(fig, title, 360)


def quantization_figure(original: Any, compressed: Any, title: str = "", bins: int = 120) -> go.Figure:
    """Histograms of a layer's weights before and after compression (pruned weights are the spike at zero).

    Parameters
    ----------
    original, compressed : array-like
        The layer's weights, original and dequantized.
    """
    o, c = to_numpy(original).ravel(), to_numpy(compressed).ravel()
    lim = float(np.abs(o).max()) or 1.0
    fig = go.Figure([
        go.Histogram(x=o, name="original (fp32)", nbinsx=bins, marker_color="#90a4ae", opacity=0.75,
                     xbins={"start": -lim, "end": lim, "size": 2 * lim / bins}),
        go.Histogram(x=c, name="compressed (dequantized)", nbinsx=bins, marker_color="#c2185b", opacity=0.75,
                     xbins={"start": -lim, "end": lim, "size": 2 * lim / bins / 4}),
    ])
    fig.update_layout(barmode="overlay", legend=TOP_LEGEND)
    fig.update_xaxes(title_text="weight value")
    fig.update_yaxes(title_text="weights", type="log")
    return _layout(fig, title, 360)


def comparison_rows(results: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Table rows comparing evaluation results side by side.

    Parameters
    ----------
    results : sequence of (str, EvaluationResult)
        Label and result.
    """
    rows = []
    for label, r in results:
        rows.append({"plan": label, "accuracy": fmt_pct(r.accuracy), "change": fmt_pp(r.accuracy_change),
                     "size": fmt_bytes(r.size.estimated_bytes), "bytes": int(r.size.estimated_bytes),
                     "ratio": f"{r.compression_ratio:.1f}x", "pruned": fmt_pct(r.sparsity, 1),
                     "mean bits": f"{r.mean_bits:.2f}"})
    return rows
