"""Benchmark results: same-run ratios, the voxel-weighted overall rows, and the printed table.

A result row is a plain dict (see :func:`service.bench.bench_volume`). Ratios compare a row with
the JPEG-XL e7 and JPEG-LS rows of the same volume coded on the same slices, so a model measured
on a subset of slices is compared with the anchors on that same subset.
"""

from __future__ import annotations

from collections import defaultdict

REFERENCES = {"ratio_vs_jpegxl_e7": "jpegxl-e7", "ratio_vs_jpegls": "jpegls"}


def _key(row: dict) -> tuple:
    return row["volume"], tuple(row["slice_indices"])


def _ok(row: dict) -> bool:
    return row["status"] == "ok"


def add_ratios(rows: list[dict]) -> None:
    """Set ``ratio_vs_jpegxl_e7`` and ``ratio_vs_jpegls`` on every row (None without a reference).

    Parameters
    ----------
    rows : list of dict
        Result rows; modified in place.
    """
    refs = {(_key(r), r["codec"]): r for r in rows if _ok(r)}
    for row in rows:
        for field, ref_codec in REFERENCES.items():
            ref = refs.get((_key(row), ref_codec))
            row[field] = row["bytes"] / ref["bytes"] if _ok(row) and ref and ref["bytes"] else None


def overall_rows(rows: list[dict]) -> list[dict]:
    """Voxel-weighted totals per codec over its main (non-reference) rows.

    Bits per voxel is total bits over total voxels (the voxel-weighted mean of the rows' bpv);
    speeds are total voxels over total time; ratios are total bytes over the reference codec's
    total bytes on the same volumes and slices.

    Parameters
    ----------
    rows : list of dict
        Result rows, with ratios already added.

    Returns
    -------
    list of dict
        One row per codec, in first-seen order; ``volumes`` counts the volumes it covers.
    """
    refs = {(_key(r), r["codec"]): r for r in rows if _ok(r)}
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["role"] == "main":
            groups[row["codec"]].append(row)
    return [_overall(codec, members, refs) for codec, members in groups.items()]


def _overall(codec: str, members: list[dict], refs: dict) -> dict:
    ok = [r for r in members if _ok(r)]
    voxels = sum(r["voxels"] for r in ok)
    nbytes = sum(r["bytes"] for r in ok)
    out = {
        "volume": "OVERALL", "codec": codec, "role": "overall",
        "status": "ok" if len(ok) == len(members) else "failed",
        "volumes": len(ok), "failed_volumes": len(members) - len(ok),
        "subset": any(r["subset"] for r in ok),
        "voxels": voxels, "bytes": nbytes,
        "bpv": 8 * nbytes / voxels if voxels else None,
    }
    for phase in ("encode", "decode"):
        for clock in ("wall", "cpu"):
            seconds = sum(r[f"{phase}_{clock}_s"] for r in ok)
            out[f"{phase}_{clock}_s"] = seconds
            out[f"{phase}_{clock}_mvox_s"] = voxels / seconds / 1e6 if seconds > 0 else None
    for field, ref_codec in REFERENCES.items():
        pairs = [(r, refs.get((_key(r), ref_codec))) for r in ok]
        if ok and all(ref is not None for _, ref in pairs):
            out[field] = nbytes / sum(ref["bytes"] for _, ref in pairs)
        else:
            out[field] = None
    return out


_MODES = {"even": "evenly spaced", "block": "consecutive central"}


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _slices(row: dict) -> str:
    if row["role"] == "overall":
        return "subset" if row["subset"] else ""
    text = f"{row['slices']}/{row['total_slices']}"
    return text + " \\*" if row["subset"] else text


def format_table(rows: list[dict], overall: list[dict]) -> str:
    """Render the result rows and overall rows as a Markdown table.

    Parameters
    ----------
    rows : list of dict
        Result rows (reference rows included, marked ``ref``).
    overall : list of dict
        Output of :func:`overall_rows`.

    Returns
    -------
    str
        The table, with a legend line when a row used a subset of slices.
    """
    head = ("| volume | codec | slices | bpv | x JPEG-XL e7 | x JPEG-LS | encode M vox/s wall (cpu) "
            "| decode M vox/s wall (cpu) | 1-slice decode s |")
    lines = [head, "|" + "---|" * 9]
    for row in [*rows, *overall]:
        lines.append(_table_line(row))
    modes = sorted({_MODES[r["subset_mode"]] for r in rows if r.get("subset")})
    if modes:
        lines.append("")
        lines.append(f"\\* coded on a subset of {' / '.join(modes)} slices; ratios compare with "
                     "the anchors on the same slices (the `ref` rows, kept out of OVERALL).")
    return "\n".join(lines)


def _table_line(row: dict) -> str:
    codec = row["codec"] + (" (ref)" if row["role"] == "reference" else "")
    if row["status"] != "ok" and row["role"] != "overall":
        return f"| {row['volume']} | {codec} | {_slices(row)} | ROUND TRIP FAILED: {row['error']} ||||||"
    speeds = [
        f"{_num(row[f'{p}_wall_mvox_s'], '.2f')} ({_num(row[f'{p}_cpu_mvox_s'], '.2f')})"
        for p in ("encode", "decode")
    ]
    volume = f"**{row['volume']}**" if row["role"] == "overall" else row["volume"]
    failed = f" ({row['failed_volumes']} failed)" if row.get("failed_volumes") else ""
    return (f"| {volume}{failed} | {codec} | {_slices(row)} | {_num(row['bpv'], '.3f')} "
            f"| {_num(row['ratio_vs_jpegxl_e7'], '.3f')} | {_num(row['ratio_vs_jpegls'], '.3f')} "
            f"| {speeds[0]} | {speeds[1]} | {_num(row.get('slice_decode_s'), '.3f')} |")
