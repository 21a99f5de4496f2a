"""A picture of a benchmark report: bits per voxel per series and codec, lower is better."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.bench_codecs import ANCHOR_LABELS, VOXARC_PREFIX


def plot_bpv(report: dict, out: str | Path) -> None:
    """Draw grouped horizontal bars of bits per voxel and save them as a PNG.

    One group per volume plus the voxel-weighted overall, one bar per codec (reference rows left
    out), each labelled with its value; bars coded on a subset of slices are hatched.

    Parameters
    ----------
    report : dict
        Output of :func:`service.bench.run_bench`.
    out : str or pathlib.Path
        PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["role"] == "main"] + report["overall"]
    volumes = list(dict.fromkeys(r["volume"] for r in rows))
    codecs = _codec_order(r["codec"] for r in rows)
    cell = {(r["volume"], r["codec"]): r for r in rows}
    height = 0.8 / len(codecs)
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.24 * len(codecs) * len(volumes)))
    for k, codec in enumerate(codecs):
        for v, volume in enumerate(volumes):
            row = cell.get((volume, codec))
            if row is not None:
                y = v + (k - (len(codecs) - 1) / 2) * height
                _bar(ax, y, height, row, _colour(plt, codec, k),
                     label=_codec_label(codec) if v == 0 else None)
    ax.set_yticks(np.arange(len(volumes)), [_volume_label(v) for v in volumes])
    ax.invert_yaxis()
    ax.set_xlabel("bits per voxel (lower is better)")
    ax.set_title(_title(report), fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax.margins(x=0.1)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _bar(ax, y: float, height: float, row: dict, colour, label) -> None:
    if row["status"] != "ok" and row["volume"] != "OVERALL":
        ax.text(0, y, " ROUND TRIP FAILED", va="center", color="red", fontsize="small")
        return
    hatch = "//" if row.get("subset") else None
    ax.barh(y, row["bpv"], height * 0.92, color=colour, hatch=hatch, label=label,
            edgecolor="white" if hatch else None)
    ax.text(row["bpv"], y, f" {row['bpv']:.2f}", va="center", fontsize=7)


def _codec_order(names) -> list[str]:
    """voxarc models first (on top of each group), then the anchors in table order."""
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: not n.startswith(VOXARC_PREFIX))


def _codec_label(codec: str) -> str:
    return ANCHOR_LABELS.get(codec, codec)


def _colour(plt, codec: str, k: int):
    """Strong colours for voxarc models, muted ones for the anchors."""
    if codec.startswith(VOXARC_PREFIX):
        return plt.get_cmap("Set1")(k % 9)
    return plt.get_cmap("tab20c")(4 + k % 16)


def _volume_label(name: str) -> str:
    return "voxel-weighted\noverall" if name == "OVERALL" else name


def _title(report: dict) -> str:
    models = report["environment"].get("voxarc_models") or {}
    names = ", ".join(
        f"{m} (id {str(info.get('model_id', info.get('model', '?')))[:8]})"
        if isinstance(info, dict) else f"{m} (unavailable)"
        for m, info in models.items()
    )
    title = "Lossless compression of DICOM stored values"
    if names:
        title += f"\nvoxarc model: {names}"
    if any(r.get("subset") for r in report["rows"]):
        title += "\n(hatched: coded on a subset of slices)"
    return title
