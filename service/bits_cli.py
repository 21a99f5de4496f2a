"""`voxarc bits SERIES [--slice Z] [--adapt] [--out map.png] [--json]`: where the codec's bits
go in a series.

Prints, for the series' volume, the ideal bits per voxel of every slice as the codec codes them
(``models.bit_map``: the encoder's own predictor, tables, slabs and tiles, summed to within the
range coder's overhead of the payload), the cost of a slab's first slice (no previous slice to
lean on) against the others, and for one slice how unevenly its bits fall (share of them in its
costliest tenth of voxels). ``--out`` draws the slice, its map of bits per voxel and the
per-slice profile. ``--adapt`` fine-tunes the model on the volume first, as compaction does.
``--anchor jpegxl-e7`` (or another classical codec of the benchmark) codes every slice with it
too and compares slice by slice (voxarc's side is the ideal code length, headers left out, as
the anchors' few bytes of side information are).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from models import bit_map
from models.api import SLAB_SLICES
from service.bench_codecs import ANCHOR_LABELS, ANCHORS
from service.series_reader import read_path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``bits`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("bits", help="where the codec's bits go in a series (map, profile)")
    p.add_argument("series", help="folder of one DICOM series, or a .npy volume")
    p.add_argument("--slice", type=int, help="slice to map (default: the middle one)")
    p.add_argument("--adapt", action="store_true",
                   help="fine-tune the model on the volume first, as compaction does")
    p.add_argument("--model", default="default", help="codec model (default: default)")
    p.add_argument("--out", help="PNG of the slice, its bit map and the per-slice profile")
    p.add_argument("--anchor", choices=sorted(ANCHORS),
                   help="also code every slice with this classical codec and compare per slice")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=bits)


def analyse(volume: np.ndarray, z: int, model: str = "default", adapt: bool = False,
            slab: int = SLAB_SLICES) -> dict:
    """The bit map of slice ``z`` and the per-slice profile of ``volume``."""
    predictor, values = bit_map.predictor_for(volume, model, adapt, slab)
    per_voxel = bit_map.volume_bits(volume, predictor, values, slab)
    profile = per_voxel.mean(axis=(1, 2))
    firsts = np.arange(volume.shape[0]) % slab == 0
    chosen = per_voxel[z]
    ranked = np.sort(chosen.ravel())[::-1]
    top = ranked[:max(1, ranked.size // 10)].sum() / max(ranked.sum(), 1e-12)
    return {
        "shape": list(volume.shape), "dtype": volume.dtype.name, "model": predictor.name,
        "adapted": predictor is not bit_map.load_model(model), "slab": slab,
        "bits_per_voxel": float(per_voxel.mean()),
        "slab_first_slices_bpv": float(per_voxel[firsts].mean()),
        "other_slices_bpv": float(per_voxel[~firsts].mean()) if (~firsts).any() else None,
        "slice": z, "slice_bpv": float(chosen.mean()), "slice_top_tenth_share": float(top),
        "profile": [round(float(v), 4) for v in profile], "map": chosen,
    }


def compare(volume: np.ndarray, result: dict, anchor: str) -> dict:
    """Per-slice bits per voxel of a classical codec beside voxarc's (``result``'s profile):
    its profile, the per-slice ratios, and on how many slices voxarc spends more."""
    encoded = ANCHORS[anchor]().encode(volume)
    per_slice = volume.shape[1] * volume.shape[2]
    theirs = np.array([8 * len(c) / per_slice for c in encoded.chunks])
    ours = np.asarray(result["profile"])
    ratio = ours / theirs
    return {"anchor": anchor, "anchor_profile": [round(float(v), 4) for v in theirs],
            "anchor_bits_per_voxel": float(theirs.mean()),
            "ratio": float(ours.mean() / theirs.mean()),
            "slices_above_anchor": int((ratio > 1).sum()),
            "worst_slice": int(ratio.argmax()), "worst_slice_ratio": float(ratio.max()),
            "best_slice_ratio": float(ratio.min())}


def _plot(volume: np.ndarray, result: dict, title: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z, chosen = result["slice"], result["map"]
    fig = plt.figure(figsize=(13, 4.6), constrained_layout=True)
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1.15, 1.3])
    image = volume[z].astype(np.float64)
    lo, hi = np.percentile(image, [1, 99])
    ax = fig.add_subplot(grid[0])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    ax.set_title(f"slice {z}")
    ax.axis("off")
    ax = fig.add_subplot(grid[1])
    shown = ax.imshow(chosen, cmap="magma", vmin=0, vmax=max(1.0, np.percentile(chosen, 99.5)))
    ax.set_title(f"bits per voxel, mean {result['slice_bpv']:.2f}")
    ax.axis("off")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="bits")
    ax = fig.add_subplot(grid[2])
    profile = np.asarray(result["profile"])
    ax.plot(profile, color="#0f7b6c", lw=1.2, label="voxarc (ideal)")
    if "anchor_profile" in result:
        ax.plot(result["anchor_profile"], color="#5b6b8c", lw=1.0, ls=":",
                label=ANCHOR_LABELS.get(result["anchor"], result["anchor"]))
    starts = np.arange(0, len(profile), result["slab"])
    ax.scatter(starts, profile[starts], s=12, color="#b4451f", zorder=3,
               label="first slice of a slab")
    ax.axvline(z, color="#888", lw=0.8, ls="--")
    ax.set_xlabel("slice")
    ax.set_ylabel("bits per voxel")
    ax.set_title(f"per slice, volume {result['bits_per_voxel']:.3f} bpv")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def bits(args) -> int:
    """Analyse the (largest) volume of a series folder; exit 1 when it holds none."""
    try:
        volumes = read_path(args.series)
    except (ValueError, OSError) as exc:
        log.error("bits: %s", exc)
        return 2
    if not volumes:
        log.error("no image stack in %s", args.series)
        return 1
    vol = max(volumes, key=lambda v: v.voxels.size)
    volume = vol.voxels
    z = volume.shape[0] // 2 if args.slice is None else args.slice
    if not 0 <= z < volume.shape[0]:
        log.error("slice %d is outside 0..%d", z, volume.shape[0] - 1)
        return 1
    log.info("%s: %s %s, mapping slice %d%s", vol.name, "x".join(map(str, volume.shape)),
             volume.dtype, z, " after fine-tuning on the volume" if args.adapt else "")
    result = analyse(volume, z, args.model, args.adapt)
    if args.anchor:
        result |= compare(volume, result, args.anchor)
    if args.out:
        _plot(volume, result, f"{vol.name} ({vol.modality}), model {result['model']}"
              + (" adapted" if result["adapted"] else ""), args.out)
    out = {k: v for k, v in result.items() if k != "map"} | {"series": vol.name}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    other = out["other_slices_bpv"]
    print(f"{vol.name}: {out['bits_per_voxel']:.3f} bits per voxel "
          f"({'adapted' if out['adapted'] else 'shipped'} model {out['model']})")
    print(f"  first slice of each {out['slab']}-slice slab: {out['slab_first_slices_bpv']:.3f}"
          + (f", other slices {other:.3f} ({out['slab_first_slices_bpv'] / other - 1:+.1%})"
             if other else ""))
    print(f"  slice {z}: {out['slice_bpv']:.3f} bits per voxel; its costliest tenth of voxels "
          f"carries {out['slice_top_tenth_share']:.0%} of its bits")
    if args.anchor:
        label = ANCHOR_LABELS.get(args.anchor, args.anchor)
        print(f"  {label}: {out['anchor_bits_per_voxel']:.3f} bits per voxel, ratio "
              f"{out['ratio']:.3f}; voxarc spends more on {out['slices_above_anchor']} of "
              f"{volume.shape[0]} slices (worst slice {out['worst_slice']}: "
              f"{out['worst_slice_ratio']:.3f}, best {out['best_slice_ratio']:.3f})")
    if args.out:
        print(f"  map written to {args.out}")
    return 0
