"""Matplotlib figures shared by the notebooks and the app. Each function returns a Figure and draws nothing
else; colours are colour-blind safe (Okabe-Ito for categories, viridis / cividis for values) and every
figure carries a legend or a colour bar.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")                       # figures are rendered to files / the browser, never a window
import matplotlib.pyplot as plt             # noqa: E402
import numpy as np                          # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

KIND_COLORS = {"text": "#56B4E9", "image": "#E69F00", "video": "#009E73", "special": "#999999"}   # Okabe-Ito
ROWS = ("t", "h", "w")


def _image_array(image):
    """PIL image, (H, W, 3) array or (3, H, W) tensor -> (H, W, 3) uint8 array."""
    arr = np.asarray(image.permute(1, 2, 0) if hasattr(image, "permute") else image)
    return arr.astype(np.uint8)


def token_strip(labels, kinds, position_ids, max_tokens=160):
    """The prompt as a strip: one column per token, coloured by modality, under it the t / h / w ids.
    labels: token texts; kinds: one of KIND_COLORS per token; position_ids (3, L)."""
    pos = np.asarray(position_ids)[:, :max_tokens]
    n = pos.shape[1]
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * n + 1.5), 2.4), constrained_layout=True)
    for i in range(n):
        ax.add_patch(Rectangle((i, 3), 1, 1, color=KIND_COLORS[kinds[i]]))
    im = ax.imshow(pos, aspect="auto", cmap="viridis", extent=(0, n, 3, 0))
    ax.set(xlim=(0, n), ylim=(4, 0), yticks=[0.5, 1.5, 2.5, 3.5], yticklabels=[*ROWS, "kind"],
           xlabel="token index" + (f" (first {n} of more)" if n == max_tokens else ""))
    if n <= 48:                                 # few tokens: write the ids and the token texts
        for r in range(3):
            for i in range(n):
                ax.text(i + 0.5, r + 0.5, str(pos[r, i]), ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(np.arange(n) + 0.5, [str(t)[:6] for t in labels[:n]], rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, label="position id", pad=0.01)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLORS.items()], ncol=4, fontsize=7,
              loc="upper left", bbox_to_anchor=(0, 1.35), frameon=False)
    return fig


def position_maps(position_ids, span, title=""):
    """The M-RoPE ids of one image / video laid out on its merged grid: h and w maps (and t per temporal
    patch for a video). position_ids (3, L) of the whole prompt; span from lab.attention.visual_spans."""
    T, h, w = span.grid
    ids = np.asarray(position_ids)[:, span.start:span.end].reshape(3, T, h, w)
    panels = [("h", ids[1, 0]), ("w", ids[2, 0])] + ([("t", ids[0, :, 0, 0][None])] if T > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), constrained_layout=True)
    for ax, (name, grid) in zip(np.atleast_1d(axes), panels):
        im = ax.imshow(grid, cmap="viridis")
        if grid.size <= 150:
            for (r, c), v in np.ndenumerate(grid):
                ax.text(c, r, str(v), ha="center", va="center", fontsize=7, color="white")
        ax.set(title=f"{name} ids" + (" per temporal patch" if name == "t" else f" ({h}x{w} merged grid)"),
               xticks=[], yticks=[])
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return fig


def patch_grid(image, patch=14, merge=2, title=""):
    """The resized image with its patch x patch grid (thin) and the merge x merge groups (thick)."""
    arr = _image_array(image)
    H, W = arr.shape[:2]
    fig, ax = plt.subplots(figsize=(4, 4 * H / W + 0.4), constrained_layout=True)
    ax.imshow(arr)
    for x in range(0, W + 1, patch):
        ax.axvline(x - 0.5, color="white" if x % (patch * merge) else "#D55E00", lw=0.5 if x % (patch * merge) else 1.4)
    for y in range(0, H + 1, patch):
        ax.axhline(y - 0.5, color="white" if y % (patch * merge) else "#D55E00", lw=0.5 if y % (patch * merge) else 1.4)
    ax.set(xticks=[], yticks=[], title=title or f"{W}x{H} px: {H // patch}x{W // patch} patches, "
           f"{H // patch // merge}x{W // patch // merge} merged tokens")
    ax.legend(handles=[Patch(color="white", ec="k", label=f"{patch} px patch"),
                       Patch(color="#D55E00", label=f"{merge}x{merge} merge group")],
              fontsize=7, loc="upper right", bbox_to_anchor=(1, -0.02), ncol=2, frameon=False)
    return fig


def attention_overlay(frames, maps, title="", vmax=None):
    """Attention maps (T, h, w) over their pictures: one panel per frame (a video: per temporal patch).
    frames: a list of T images at the resized size."""
    maps = np.asarray(maps, dtype=np.float32)
    vmax = vmax or float(maps.max()) or 1.0
    T = maps.shape[0]
    fig, axes = plt.subplots(1, T, figsize=(max(5.5, 3.2 * T + 0.6), 3.6), constrained_layout=True, squeeze=False)
    for t, ax in enumerate(axes[0]):
        arr = _image_array(frames[t])
        ax.imshow(arr)
        im = ax.imshow(maps[t], cmap="cividis", alpha=0.65, vmin=0, vmax=vmax,
                       extent=(-0.5, arr.shape[1] - 0.5, arr.shape[0] - 0.5, -0.5), interpolation="nearest")
        ax.set(xticks=[], yticks=[], title=f"temporal patch {t}" if T > 1 else "")
    fig.colorbar(im, ax=axes[0].tolist(), label="attention weight", shrink=0.85)
    fig.suptitle(title, fontsize=8)
    return fig


def modality_shares(shares, labels, kinds=("text", "image", "video", "special")):
    """Stacked bars: for every generated token, the share of its attention on each kind of token.
    shares (N, len(kinds)); labels: the N generated token texts."""
    shares = np.asarray(shares)
    n = shares.shape[0]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * n + 1.5), 2.6), constrained_layout=True)
    bottom = np.zeros(n)
    for k, kind in enumerate(kinds):
        ax.bar(np.arange(n), shares[:, k], bottom=bottom, color=KIND_COLORS[kind], label=kind, width=0.85)
        bottom += shares[:, k]
    ax.set_xticks(np.arange(n), [repr(t)[1:-1][:8] for t in labels], rotation=90, fontsize=7)
    # the title takes two lines: one is wider than the figure of a short answer
    ax.set(ylim=(0, 1), ylabel="share of attention", xlabel="generated token",
           title="where each generated token's attention went\n(mean of layers and heads)")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


# ================================================================ figures of the notebook chapters
# (appended; the functions above are the app's.) Same rules: return a Figure, Okabe-Ito for categories,
# viridis / cividis for values, a legend or a colour bar on every figure.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000")
ROW_COLORS = {"t": "#0072B2", "h": "#E69F00", "w": "#009E73"}


def _grid_lines(ax, H, W, step, color="white", lw=0.5):
    for x in range(0, W + 1, step):
        ax.axvline(x - 0.5, color=color, lw=lw)
    for y in range(0, H + 1, step):
        ax.axhline(y - 0.5, color=color, lw=lw)


def frame_strip(frames, labels=None, temporal=2, title=""):
    """Frames side by side, framed in one colour per temporal patch (each `temporal` frames = one 3D tube)."""
    n = len(frames)
    fig, axes = plt.subplots(1, n, figsize=(min(1.7 * n, 14) + 0.4, 2.2), constrained_layout=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(_image_array(frames[i]))
        color = OKABE_ITO[(i // temporal) % len(OKABE_ITO)]
        for side in ax.spines.values():
            side.set(color=color, lw=3)
        ax.set(xticks=[], yticks=[])
        ax.set_title(labels[i] if labels else f"frame {i}", fontsize=7)
    patches = sorted({i // temporal for i in range(n)})
    fig.legend(handles=[Patch(color=OKABE_ITO[p % len(OKABE_ITO)], label=f"temporal patch {p}") for p in patches[:8]],
               loc="outside lower center", ncol=min(8, len(patches)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    return fig


def resize_boxes(original_wh, resized_wh, factor=28, title=""):
    """The original canvas and the smart_resize result drawn to scale, with the result's factor-px grid."""
    (W0, H0), (W1, H1) = original_wh, resized_wh
    fig, ax = plt.subplots(figsize=(4.2, 4.2 * max(H0, H1) / max(W0, W1) + 0.6), constrained_layout=True)
    for x in range(0, W1 + 1, factor):
        ax.plot([x, x], [0, H1], color="#56B4E9", lw=0.4)
    for y in range(0, H1 + 1, factor):
        ax.plot([0, W1], [y, y], color="#56B4E9", lw=0.4)
    ax.add_patch(Rectangle((0, 0), W0, H0, fill=False, ec="#D55E00", lw=2, ls="--", label=f"input {W0}x{H0}"))
    ax.add_patch(Rectangle((0, 0), W1, H1, fill=False, ec="#0072B2", lw=2, label=f"resized {W1}x{H1}"))
    ax.plot([], [], color="#56B4E9", lw=0.8, label=f"{factor} px = one merged token")
    ax.set(xlim=(-2, max(W0, W1) * 1.02), ylim=(max(H0, H1) * 1.02, -2), aspect="equal", xlabel="px", ylabel="px",
           title=title or f"{W0}x{H0} -> {W1}x{H1}: {(W1 // factor) * (H1 // factor)} tokens")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    return fig


def curves(series, xlabel, ylabel, hlines=None, logx=True, logy=True, title=""):
    """Lines y(x) per series {label: (xs, ys)}; optional labelled horizontal lines {label: y}."""
    fig, ax = plt.subplots(figsize=(6, 3.4), constrained_layout=True)
    for i, (label, (xs, ys)) in enumerate(series.items()):     # thinner each time: overlapping lines stay visible
        ax.plot(xs, ys, color=OKABE_ITO[i % len(OKABE_ITO)], lw=max(0.8, 2.6 - 0.4 * i), label=label)
    for j, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color="#555555", ls=(":", "--", "-.")[j % 3], lw=1, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xscale="log" if logx else "linear",
           yscale="log" if logy else "linear")
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def bars(data, ylabel, log=False, targets=None, title="", horizontal=False, annotate=True):
    """Grouped bars {series: {label: value}}; `targets` {label: value} are drawn as black ticks."""
    series = list(data)
    labels = list(dict.fromkeys(label for s in series for label in data[s]))
    n, width = len(series), 0.8 / max(1, len(series))
    size = (8, 0.32 * len(labels) * max(1, n) ** 0.5 + 1.2) if horizontal else (max(5, 0.55 * len(labels) * n + 2), 3.2)
    fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    for i, s in enumerate(series):
        pos = np.arange(len(labels)) + (i - (n - 1) / 2) * width
        vals = [data[s].get(label, np.nan) for label in labels]
        draw = ax.barh if horizontal else ax.bar
        rects = draw(pos, vals, width * 0.95, color=OKABE_ITO[i % len(OKABE_ITO)], label=s)
        if annotate and len(labels) * n <= 24:
            ax.bar_label(rects, labels=[_short(v) for v in vals], fontsize=6, padding=1)
    if targets:
        for j, label in enumerate(labels):
            if label in targets:
                if horizontal:
                    ax.plot([targets[label]] * 2, [j - 0.45, j + 0.45], color="black", lw=2)
                else:
                    ax.plot([j - 0.45, j + 0.45], [targets[label]] * 2, color="black", lw=2)
        ax.plot([], [], color="black", lw=2, label="target")
    if horizontal:
        ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel=ylabel, xscale="log" if log else "linear", title=title)
    else:
        ax.set_xticks(np.arange(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0,
                      ha="right" if max(map(len, labels)) > 6 else "center", fontsize=8)
        ax.set(ylabel=ylabel, yscale="log" if log else "linear", title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def _short(v):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, float) and abs(v) < 10:
        return f"{v:.2g}"
    return f"{v:,.0f}" if abs(v) < 1e6 else f"{v / 1e6:.1f}M" if abs(v) < 1e9 else f"{v / 1e9:.1f}B"


def patch_row(row, channels=3, temporal=2, patch=14):
    """One pixel_values row (1176 values) unfolded: its (C, T, 14, 14) order as small images, then as a line."""
    row = np.asarray(row, dtype=np.float32)
    cube = row.reshape(channels, temporal, patch, patch)
    fig = plt.figure(figsize=(7.5, 3.6), constrained_layout=True)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.5, 1])
    axes = top.subplots(1, channels * temporal)
    vmin, vmax = float(row.min()), float(row.max())
    for k, ax in enumerate(axes):
        c, t = divmod(k, temporal)
        im = ax.imshow(cube[c, t], cmap="cividis", vmin=vmin, vmax=vmax)
        ax.set(xticks=[], yticks=[], title=f"{'RGB'[c] if channels == 3 else c}, frame {t}\nvalues {k * patch * patch}"
               f"-{(k + 1) * patch * patch - 1}")
        ax.title.set_fontsize(7)
    top.colorbar(im, ax=list(axes), shrink=0.8, label="normalised value")
    ax = bottom.subplots()
    for k in range(channels * temporal):
        seg = slice(k * patch * patch, (k + 1) * patch * patch)
        ax.plot(np.arange(row.size)[seg], row[seg], lw=0.6, color=OKABE_ITO[k // temporal],
                label=f"channel {'RGB'[k // temporal] if channels == 3 else k // temporal}" if k % temporal == 0 else None)
    ax.set(xlim=(0, row.size), xlabel=f"index in the row (of {row.size})", ylabel="value")
    ax.legend(fontsize=7, ncol=3, loc="upper right", frameon=False)
    return fig


def patch_order(image, patch=14, merge=2):
    """Numbers on the image: the row of every 14 px patch in pixel_values (what the ViT sees, 2x2-window-major)
    and the index of every merged token in the LLM's sequence (raster order)."""
    arr = _image_array(image)
    H, W = arr.shape[:2]
    gh, gw = H // patch, W // patch
    r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    vit = ((r // merge) * (gw // merge) + c // merge) * merge * merge + (r % merge) * merge + (c % merge)
    llm = np.arange((gh // merge) * (gw // merge)).reshape(gh // merge, gw // merge)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5 * H / W + 0.8), constrained_layout=True)
    for ax, order, step, name in ((axes[0], vit, patch, "ViT: patch row in pixel_values"),
                                  (axes[1], llm, patch * merge, "LLM: merged token index")):
        ax.imshow(arr, alpha=0.55)
        im = ax.imshow(order, cmap="viridis", alpha=0.55, extent=(-0.5, W - 0.5, H - 0.5, -0.5),
                       interpolation="nearest")
        _grid_lines(ax, H, W, step, color="white", lw=0.6)
        for (i, j), v in np.ndenumerate(order):
            ax.text((j + 0.5) * step - 0.5, (i + 0.5) * step - 0.5, str(v), ha="center", va="center",
                    fontsize=6 if step == patch else 8, color="black")
        ax.set(xticks=[], yticks=[], title=name)
        fig.colorbar(im, ax=ax, shrink=0.7, label="order")
    return fig


def merge_window(four, merged_in, merged_out):
    """The merger on one 2x2 window: four patch vectors (after ln_q), concatenated, and the token it becomes."""
    four, merged_in, merged_out = (np.asarray(x, dtype=np.float32) for x in (four, merged_in, merged_out))
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 3.4), constrained_layout=True,
                             gridspec_kw={"height_ratios": [4, 1, 1]})
    panels = ((four, "4 neighbouring patches after ln_q  (4, E)"), (merged_in[None], "concatenated  (1, 4E)"),
              (merged_out[None], "merger.mlp output = one LLM token  (1, C)"))
    for ax, (x, name) in zip(axes, panels):     # one colour scale per panel: the MLP output is much smaller
        lim = float(np.abs(x).max()) or 1.0
        im = ax.imshow(x, aspect="auto", cmap="cividis", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set(yticks=[], title=name)
        ax.title.set_fontsize(8)
        fig.colorbar(im, ax=ax, label="value", pad=0.01)
    axes[0].set_yticks(range(4), ["top-left", "top-right", "bottom-left", "bottom-right"], fontsize=7)
    axes[-1].set_xlabel("feature")
    return fig


def conv_filters(weight, n=16):
    """The first n Conv3d kernels (E, 3, 2, 14, 14), summed over colour, frame 0 next to frame 1."""
    w = np.asarray(weight, dtype=np.float32)[:n].sum(1)                 # (n, 2, 14, 14)
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.8, 0.75 * rows + 0.4), constrained_layout=True,
                             squeeze=False)
    lim = float(np.abs(w).max())
    for k, ax in enumerate(axes.flat):
        ax.set(xticks=[], yticks=[])
        if k < n:
            im = ax.imshow(np.concatenate([w[k, 0], w[k, 1]], axis=1), cmap="cividis", vmin=-lim, vmax=lim)
            ax.set_title(f"kernel {k}", fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="weight (frame 0 | frame 1)", shrink=0.9)
    return fig


def rope2d_maps(pos_ids, grid_hw, freqs, pair=1):
    """Vision 2D RoPE on the patch grid: the h and w id of each patch, and cos(angle) of one rotary pair of the
    h half and of the w half (the same frequency, turned by h or by w)."""
    h, w = grid_hw
    pos = np.asarray(pos_ids)
    hmap, wmap = np.zeros((h, w), int), np.zeros((h, w), int)
    hmap[pos[:, 0], pos[:, 1]], wmap[pos[:, 0], pos[:, 1]] = pos[:, 0], pos[:, 1]
    f = float(np.asarray(freqs)[pair])
    panels = [("h id", hmap, "viridis", None), ("w id", wmap, "viridis", None),
              (f"cos(h x f[{pair}]), f = {f:.3g}", np.cos(hmap * f), "cividis", (-1, 1)),
              (f"cos(w x f[{pair}]), f = {f:.3g}", np.cos(wmap * f), "cividis", (-1, 1))]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.6 * h / w + 0.6), constrained_layout=True)
    for ax, (name, grid, cmap, lim) in zip(axes, panels):
        im = ax.imshow(grid, cmap=cmap, vmin=lim and lim[0], vmax=lim and lim[1])
        ax.set(xticks=[], yticks=[], title=name)
        ax.title.set_fontsize(8)
        fig.colorbar(im, ax=ax, shrink=0.7)
    return fig


def block_mask(blocks):
    """Which patch may attend to which in the ViT: blocks [(label, size)] on the diagonal, the rest masked."""
    sizes = [s for _, s in blocks]
    N = sum(sizes)
    fig, ax = plt.subplots(figsize=(4.8, 4.4), constrained_layout=True)
    ax.add_patch(Rectangle((0, 0), N, N, color="#EEEEEE", label="masked (never attends)"))
    start, colors = 0, {}
    for label, size in blocks:                  # "video #t1": colour by "video", write "t1" in the block
        name, _, tag = label.partition(" #")
        first = name not in colors
        color = colors.setdefault(name, OKABE_ITO[len(colors) % len(OKABE_ITO)])
        ax.add_patch(Rectangle((start, start), size, size, color=color, ec="white", lw=0.8,
                               label=name if first else None))
        ax.text(start + size / 2, start + size / 2, tag, ha="center", va="center", fontsize=6)
        start += size
    ax.set(xlim=(0, N), ylim=(N, 0), xlabel="key patch", ylabel="query patch", aspect="equal",
           title=f"{N} patches, {len(blocks)} attention blocks")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def shape_ledger(rows):
    """Bars of the number of values at each stage, labelled with the tensor's shape."""
    names = [n for n, _ in rows]
    sizes = [int(np.prod(s)) for _, s in rows]
    fig, ax = plt.subplots(figsize=(7, 0.36 * len(rows) + 1), constrained_layout=True)
    colors = ["#E69F00" if n.startswith(("pixel", "Patch", "ViT", "merger")) else "#56B4E9" for n in names]
    ax.barh(range(len(rows)), sizes, color=colors)
    for i, (_, s) in enumerate(rows):
        ax.text(sizes[i] * 1.1, i, str(tuple(s)), va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="number of values", xlim=(min(sizes) / 2, max(sizes) * 20))
    ax.legend(handles=[Patch(color="#E69F00", label="vision tower"), Patch(color="#56B4E9", label="language side")],
              fontsize=7, loc="lower right", frameon=False)
    return fig


def position_lines(mrope_ids, oned_ids, kinds):
    """M-RoPE's three rows and plain 1D positions over the same prompt, visual tokens shaded."""
    mrope_ids, oned_ids = np.asarray(mrope_ids), np.asarray(oned_ids)
    L = mrope_ids.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), constrained_layout=True, sharey=True)
    for ax, title in zip(axes, ("M-RoPE (t, h, w)", "1D RoPE")):
        for i, k in enumerate(kinds):
            if k in ("image", "video"):
                ax.axvspan(i - 0.5, i + 0.5, color=KIND_COLORS[k], alpha=0.25, lw=0)
        ax.set(xlabel="token index", title=title, xlim=(-1, L))
    for r, name in enumerate(ROWS):
        axes[0].plot(mrope_ids[r], ".", ms=2.5, color=ROW_COLORS[name], label=f"{name} row")
    axes[1].plot(oned_ids, ".", ms=2.5, color="#000000", label="position (= token index)")
    axes[0].set_ylabel("position id")
    spans = [Patch(color=KIND_COLORS[k], alpha=0.4, label=f"{k} tokens") for k in ("image", "video") if k in kinds]
    for ax in axes:
        ax.legend(handles=ax.get_legend_handles_labels()[0] + spans, fontsize=7, loc="upper left", frameon=False)
    return fig


def rope_bands(configs, marks=None):
    """Wavelength (tokens per full turn) of every rotary pair, coloured by the t / h / w band it serves.
    configs {title: (wavelengths (D/2,), mrope_section)}; marks {label: tokens} as horizontal lines."""
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.2), constrained_layout=True,
                             squeeze=False)
    for ax, (title, (lam, section)) in zip(axes[0], configs.items()):
        lam = np.asarray(lam)
        start = 0
        for name, n in zip(ROWS, section):
            ax.bar(np.arange(start, start + n), lam[start:start + n], width=0.9, color=ROW_COLORS[name],
                   label=f"{name}: {n} pairs")
            start += n
        for j, (label, y) in enumerate((marks or {}).items()):
            ax.axhline(y, color="#555555", ls=(":", "--")[j % 2], lw=1, label=label)
        ax.set(yscale="log", xlabel="rotary pair (frequency index)", ylabel="wavelength (positions per turn)",
               title=title)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6, loc="upper left", frameon=False)
    return fig


def rotation_angles(positions, freqs, section):
    """cos(position x frequency) for every rotary pair (rows) and position (columns), band borders marked."""
    angles = np.outer(np.asarray(freqs), np.asarray(positions))           # (D/2, P)
    fig, ax = plt.subplots(figsize=(6.5, 3.4), constrained_layout=True)
    im = ax.imshow(np.cos(angles), aspect="auto", cmap="cividis", vmin=-1, vmax=1, interpolation="nearest",
                   extent=(positions[0] - 0.5, positions[-1] + 0.5, len(freqs) - 0.5, -0.5))
    start = 0
    for name, n in zip(ROWS, section):
        ax.axhline(start - 0.5, color="white", lw=1)
        ax.text(positions[-1] + 1, start + n / 2 - 0.5, f"{name}", color=ROW_COLORS[name], va="center", fontsize=9,
                fontweight="bold")
        start += n
    ax.set(xlabel="position id", ylabel="rotary pair")
    fig.colorbar(im, ax=ax, label="cos(angle)", pad=0.06)
    return fig


def similarity_maps(maps, query, floor=1e-9):
    """How far position alone moves a query-key score: 1 - cos similarity {title: (h, w)} on one log colour scale,
    so that fast bands (large values) and slow ones (tiny values) compare directly; the query is marked."""
    from matplotlib.colors import LogNorm
    fig, axes = plt.subplots(1, len(maps), figsize=(2.8 * len(maps) + 0.8, 3.0), constrained_layout=True,
                             squeeze=False)
    norm = LogNorm(vmin=floor, vmax=1.0)
    for ax, (title, m) in zip(axes[0], maps.items()):
        d = np.clip(1.0 - np.asarray(m, dtype=np.float64), floor, None)
        im = ax.imshow(d, cmap="viridis", norm=norm)
        ax.plot(query[1], query[0], marker="*", ms=12, color="#D55E00", ls="", label="query patch")
        ax.set(xticks=[], yticks=[], title=f"{title}\nlargest 1 - cos: {d.max():.1e}")
        ax.title.set_fontsize(7)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.02), frameon=False)
    fig.colorbar(im, ax=axes[0].tolist(), label="1 - cos similarity (log)", shrink=0.85)
    return fig


def position_ranges(rules):
    """Per rule {name: {row label: (first, last)}}: horizontal bars of the ids a block and the text after it use."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * sum(len(r) for r in rules.values()) + 1), constrained_layout=True)
    y, ticks = 0, []
    for i, (rule, rows) in enumerate(rules.items()):
        for label, (a, b) in rows.items():
            ax.barh(y, b - a + 1, left=a - 0.5, color=OKABE_ITO[i], height=0.7)
            ax.text(b + 1, y, f"{a}..{b}" if a != b else f"{a}", va="center", fontsize=7)
            ticks.append(label)
            y += 1
    ax.set_yticks(range(len(ticks)), ticks, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="position id")
    ax.legend(handles=[Patch(color=OKABE_ITO[i], label=rule) for i, rule in enumerate(rules)], fontsize=7,
              loc="lower right", frameon=False)
    return fig


def frame_sampling(total_frames, video_fps, indices, title=""):
    """The source's frames on a time line, the sampled ones coloured by the temporal patch they join."""
    t_all = np.arange(total_frames) / video_fps
    fig, ax = plt.subplots(figsize=(8, 1.9), constrained_layout=True)
    ax.vlines(t_all, 0, 0.4, color="#BBBBBB", lw=0.5, label=f"source frames ({total_frames} at {video_fps:g} fps)")
    for k, i in enumerate(indices):
        ax.vlines(i / video_fps, 0, 1, color=OKABE_ITO[(k // 2) % 2 * 3], lw=1.8,
                  label=("sampled frame, temporal patch " + ("even", "odd")[(k // 2) % 2]) if k in (0, 2) else None)
    ax.set(yticks=[], xlabel="time (s)", xlim=(-0.05 * t_all[-1] - 0.1, t_all[-1] * 1.05 + 0.1),
           title=title or f"{len(indices)} frames sampled -> {len(indices) // 2} temporal patches")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, frameon=False)
    return fig


def kind_values(values, kinds, ylabel, labels=None, title="", log=False):
    """One bar per token, coloured by its kind (text / image / video / special)."""
    values = np.asarray(values)
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.08 * len(values) + 2)), 2.8), constrained_layout=True)
    ax.bar(np.arange(len(values)), values, width=1.0, color=[KIND_COLORS[k] for k in kinds])
    if labels is not None and len(labels) <= 40:
        ax.set_xticks(np.arange(len(values)), [str(t)[:8] for t in labels], rotation=90, fontsize=6)
    ax.set(xlabel="token index" if labels is None else "", ylabel=ylabel, title=title, xlim=(-1, len(values)),
           yscale="log" if log else "linear")
    ax.legend(handles=[Patch(color=KIND_COLORS[k], label=k) for k in KIND_COLORS if k in kinds], fontsize=7,
              ncol=4, loc="upper left", bbox_to_anchor=(0, 1.2), frameon=False)
    return fig


def layer_lines(values, kinds_order, xlabel, ylabel, title=""):
    """Lines over layers per token kind: values {kind: [per layer]}."""
    fig, ax = plt.subplots(figsize=(5.5, 3), constrained_layout=True)
    for k in kinds_order:
        if k in values:
            ax.plot(values[k], marker="o", ms=3, color=KIND_COLORS.get(k, "#000000"), label=k)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, lw=0.4)
    ax.legend(fontsize=7, frameon=False)
    return fig


def cache_check(diffs, times):
    """Cached decoding vs a full forward: max |logit difference| per step, and the time each step took."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.9), constrained_layout=True)
    axes[0].semilogy(np.maximum(np.asarray(diffs), 1e-12), marker="o", ms=3, color="#0072B2",
                     label="max |cached - full| logits")
    axes[0].axhline(1e-4, color="#D55E00", ls="--", lw=1, label="parity tolerance 1e-4")
    axes[0].set(xlabel="generated token", ylabel="difference", ylim=(1e-9, 1e-2))
    axes[0].legend(fontsize=7, frameon=False)
    ms = 1000 * np.asarray(times)
    axes[1].bar(0, ms[0], color="#E69F00", label="prefill (whole prompt)")
    axes[1].bar(np.arange(1, len(ms)), ms[1:], color="#56B4E9", label="decode step (one token)")
    axes[1].set(xlabel="step", ylabel="ms")
    axes[1].legend(fontsize=7, frameon=False)
    return fig


def next_token_probs(labels, dists):
    """The most likely next tokens (labels) and their probabilities under several temperatures {name: probs}."""
    fig, ax = plt.subplots(figsize=(6.5, 3), constrained_layout=True)
    width = 0.8 / len(dists)
    for k, (name, p) in enumerate(dists.items()):
        ax.bar(np.arange(len(labels)) + (k - (len(dists) - 1) / 2) * width, p, width,
               color=OKABE_ITO[k % len(OKABE_ITO)], label=name)
    ax.set_xticks(np.arange(len(labels)), [repr(t)[1:-1][:10] for t in labels], rotation=30, fontsize=8)
    ax.set(ylabel="probability", ylim=(0, 1), title="most likely next tokens")
    ax.legend(fontsize=7, frameon=False)
    return fig


def cache_vs_position(positions, prompt_len, kinds=None):
    """x: where each token sits in the KV cache; y: its M-RoPE position (max of t, h, w). The visual block
    spends fewer positions than tokens, so generated tokens run at cache index + rope_delta."""
    pos = np.asarray(positions)
    top = pos.max(0)
    fig, ax = plt.subplots(figsize=(6.5, 3.2), constrained_layout=True)
    idx = np.arange(pos.shape[1])
    ax.plot(idx, idx, color="#999999", ls="--", lw=1, label="1D: position = cache index")
    ax.plot(idx[:prompt_len], top[:prompt_len], ".", ms=3, color="#0072B2", label="prompt: max(t, h, w)")
    ax.plot(idx[prompt_len:], top[prompt_len:], "o", ms=4, color="#D55E00", label="generated: index + rope_delta")
    if kinds is not None:
        for i, k in enumerate(kinds[:prompt_len]):
            if k in ("image", "video"):
                ax.axvspan(i - 0.5, i + 0.5, color=KIND_COLORS[k], alpha=0.15, lw=0)
    delta = int(top[-1] - idx[-1])
    ax.annotate(f"rope_delta = {delta}", (idx[-1], top[-1]), xytext=(0.55, 0.3), textcoords="axes fraction",
                arrowprops={"arrowstyle": "->"}, fontsize=8)
    ax.set(xlabel="cache index", ylabel="position id")
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    return fig


def attention_small_multiples(maps, labels, image=None, cols=6, title=""):
    """Small attention maps (n, h, w) in rows of `cols`, over the picture if given, one shared colour bar."""
    maps = np.asarray(maps, dtype=np.float32)
    n, h, w = maps.shape
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 1, 1.3 * rows * h / w + 0.7), constrained_layout=True,
                             squeeze=False)
    vmax = float(maps.max()) or 1.0
    arr = _image_array(image) if image is not None else None
    for k, ax in enumerate(axes.flat):
        ax.set(xticks=[], yticks=[])
        if k >= n:
            ax.axis("off")
            continue
        extent = None
        if arr is not None:
            ax.imshow(arr)
            extent = (-0.5, arr.shape[1] - 0.5, arr.shape[0] - 0.5, -0.5)
        im = ax.imshow(maps[k], cmap="cividis", alpha=0.75 if arr is not None else 1.0, vmin=0, vmax=vmax,
                       interpolation="nearest", extent=extent)
        ax.set_title(repr(labels[k])[1:-1][:12] if isinstance(labels[k], str) else str(labels[k]), fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="attention weight", shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return fig


def heatmap(values, row_labels, col_labels, label, title="", fmt="{:.2f}", cmap="cividis", notes=None):
    """A labelled matrix with its numbers written in (small matrices) and a colour bar; `notes` (same shape)
    adds a second line of text to each cell."""
    values = np.asarray(values, dtype=np.float32)
    per_row = 0.36 if notes is None else 0.5
    fig, ax = plt.subplots(figsize=(0.55 * len(col_labels) + 2.2, per_row * len(row_labels) + 1.2),
                           constrained_layout=True)
    im = ax.imshow(values, cmap=cmap, aspect="auto")
    if values.size <= 200:
        mid = (np.nanmax(values) + np.nanmin(values)) / 2
        for (i, j), v in np.ndenumerate(values):
            text = fmt.format(v) + (f"\n{notes[i][j]}" if notes is not None else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if v < mid else "black")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    return fig


def stage_plan(stages, scale=1.0):
    """The recipe as a time line: one bar per stage, its length the steps, its colour what trains."""
    colors = {("model",): "#56B4E9", ("visual",): "#E69F00", ("visual", "model"): "#009E73"}
    names = {("model",): "LLM trains (ViT frozen)", ("visual",): "ViT + merger train (LLM frozen)",
             ("visual", "model"): "everything trains"}
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(stages) + 1.1), constrained_layout=True)
    start = 0
    for i, st in enumerate(stages):
        steps = max(1, round(st.steps * scale))
        ax.barh(i, steps, left=start, color=colors[tuple(st.train)], height=0.6)
        cells = " + cells" if st.cells and st.loss_on != "cells" else ""
        ax.text(start + steps / 2, i, f"{steps} steps, lr {st.lr:g}, loss on {st.loss_on}{cells}", ha="center",
                va="center", fontsize=7)
        start += steps
    ax.set_yticks(range(len(stages)), [st.name for st in stages], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="training step")
    ax.legend(handles=[Patch(color=c, label=names[k]) for k, c in colors.items()], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def loss_mask_strip(tokens, trained, per_row=24):
    """The training sequence as text cells; cells whose next-token loss counts are coloured."""
    n = len(tokens)
    rows = -(-n // per_row)
    fig, ax = plt.subplots(figsize=(10, 0.32 * rows + 0.8), constrained_layout=True)
    for i, (tok, on) in enumerate(zip(tokens, trained)):
        r, c = divmod(i, per_row)
        ax.add_patch(Rectangle((c, r), 0.96, 0.9, color="#E69F00" if on else "#DDDDDD"))
        ax.text(c + 0.48, r + 0.45, repr(tok)[1:-1][:7], ha="center", va="center", fontsize=5.5)
    ax.set(xlim=(0, per_row), ylim=(rows, 0), xticks=[], yticks=[])
    ax.legend(handles=[Patch(color="#E69F00", label="label = this token (loss)"),
                       Patch(color="#DDDDDD", label="ignored (-100)")], fontsize=7, ncol=2, loc="upper left",
              bbox_to_anchor=(0, 1.0 + 0.9 / (rows + 1)), frameon=False)
    return fig


def loss_curves(log, smooth=20):
    """Training loss per stage {stage: [loss per step]}, raw and smoothed, on a log axis."""
    import textwrap
    fig, axes = plt.subplots(1, len(log), figsize=(3.2 * len(log), 2.6), constrained_layout=True, squeeze=False)
    for ax, (name, losses) in zip(axes[0], log.items()):
        losses = np.asarray(losses, dtype=np.float32)
        k = max(1, min(smooth, len(losses) // 3))
        mean = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(losses, color="#56B4E9", alpha=0.5, lw=0.7, label="step")
        ax.plot(np.arange(k - 1, len(losses)), mean, color="#0072B2", lw=1.5, label=f"mean of {k}")
        # log scale only when the loss spans a factor > 3, ticks at 1-2-5 (a narrow log axis gets unreadable labels)
        if losses.max() > 3 * losses.min():
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="step", title="\n".join(textwrap.wrap(f"stage {name}", 30)))
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6, frameon=False)
    axes[0][0].set_ylabel("loss")
    return fig


def logit_parity(ours, theirs, max_points=20000):
    """Our logits against transformers' on the same weights: a scatter on y = x and the differences."""
    a, b = np.asarray(ours, dtype=np.float64).ravel(), np.asarray(theirs, dtype=np.float64).ravel()
    pick = np.random.default_rng(0).choice(a.size, min(a.size, max_points), replace=False)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), constrained_layout=True)
    axes[0].plot(b[pick], a[pick], ".", ms=1.5, color="#0072B2", alpha=0.5, label="one logit")
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    axes[0].plot([lo, hi], [lo, hi], color="#D55E00", lw=1, label="y = x")
    axes[0].set(xlabel="transformers logit", ylabel="qwen2vl_min logit")
    axes[0].legend(fontsize=7, frameon=False)
    d = np.abs(a - b)
    axes[1].hist(np.log10(np.maximum(d, 1e-12)), bins=60, color="#009E73",
                 label=f"|ours - theirs| ({int((d == 0).sum()):,} exactly 0, drawn at -12)")
    axes[1].axvline(-4, color="#D55E00", ls="--", lw=1, label="tolerance 1e-4")
    axes[1].set(xlabel="log10 |difference|", ylabel="logits", title=f"max {d.max():.2e}")
    axes[1].legend(fontsize=7, frameon=False)
    return fig
