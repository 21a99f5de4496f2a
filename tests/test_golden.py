"""Golden blobs: blobs written by earlier releases must decode to exactly what they held.

The files in tests/golden change only on purpose. ``python tests/test_golden.py`` adds blobs for
volumes not recorded yet (it never rewrites existing ones);
when a model is retired, move its weights to models/weights/archive/<model id>.npz so these
blobs keep decoding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import models

GOLDEN = Path(__file__).parent / "golden"
RECORD = GOLDEN / "golden.json"


def _phantom(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    info = np.iinfo(dtype)
    span = min(int(info.max) - int(info.min), 3000)
    vol = info.min + span * (0.3 + 0.4 * (x ** 2 + y ** 2 + 0.3 * z ** 2 < 0.5))
    vol = vol + rng.normal(0, span * 0.01, shape)
    return np.clip(np.round(vol), info.min, info.max).astype(dtype)


VOLUMES = {
    "ct_int16_v1": lambda: (_phantom((12, 48, 40), "int16", 1), {"slab": 4, "tile": (16, 24)}),
    "mr_uint16_v1": lambda: (_phantom((9, 33, 47), "uint16", 2), {}),
    "u8_noise_v1": lambda: (np.random.default_rng(3).integers(0, 256, (3, 7, 11), dtype=np.uint8),
                            {"slab": 2}),
    "int8_extremes_v1": lambda: (np.random.default_rng(4).choice(
        np.array([-128, 127], np.int8), (2, 5, 6)), {}),
    "ct_int16_adapted_v1": lambda: (_phantom((10, 40, 48), "int16", 5), {"adapt": True}),
    # the default model with the wide neighbourhood (model 7125ed7a, 2026-11-29)
    "ct_int16_wide_v2": lambda: (_phantom((12, 48, 40), "int16", 6), {"slab": 4, "tile": (16, 24)}),
    # written with adapt.pays_off forced True, so that it carries an embedded wide network
    "mr_uint16_wide_adapted_v2": lambda: (_phantom((10, 40, 48), "uint16", 7), {"adapt": True}),
    # the default model with a table row for flat contexts (model ee88a045, 2026-11-30)
    "ct_int16_flat_v3": lambda: (_padded(_phantom((12, 48, 40), "int16", 8)),
                                 {"slab": 4, "tile": (16, 24)}),
    # written with adapt.pays_off forced True: an embedded network and tables with the flat row
    "ct_int16_flat_adapted_v3": lambda: (_padded(_phantom((10, 40, 48), "int16", 9)),
                                         {"adapt": True}),
    # four table rows per scale, one per quarter of the mean's fraction (model a96a0bc8,
    # 2026-11-30); adapted: an embedded network with the shipped token tables, and (written
    # with adapt._with_shipped_tokens disabled too) one whose token tables travel as a
    # difference to the shipped ones
    "ct_int16_frac_v4": lambda: (_padded(_phantom((12, 48, 40), "int16", 10)),
                                 {"slab": 4, "tile": (16, 24)}),
    "mr_uint16_frac_adapted_v4": lambda: (_phantom((16, 64, 64), "uint16", 11), {"adapt": True}),
    "mr_uint16_frac_delta_v4": lambda: (_phantom((16, 64, 64), "uint16", 12), {"adapt": True}),
    # adapted, its token tables carried rounded to steps of the shipped ones (token_steps,
    # 2026-11-30): written with adapt.pays_off forced True and adapt._table_variants yielding
    # only the variants at COARSE_SHIFTS
    "mr_uint16_frac_steps_v6": lambda: (_phantom((16, 64, 64), "uint16", 15), {"adapt": True}),
    # blob format 2: residuals coded within the dtype's range (a background just above 0)
    "mr_uint16_range_v5": lambda: (_near_floor((9, 40, 36), 13), {"slab": 4, "tile": (16, 24)}),
    "u8_range_v5": lambda: (_near_floor((3, 17, 19), 14).astype(np.uint8), {}),
    # blob format 3: a payload per column band of a slab (three bands, the last narrower; two
    # bands of the default tile)
    "mr_uint16_bands_v7": lambda: (_near_floor((9, 40, 60), 16), {"slab": 4, "tile": (16, 24)}),
    "u8_bands_v7": lambda: (_near_floor((3, 17, 300), 17).astype(np.uint8), {}),
    # blob format 4: coded within the volume's own range, CT padding standing just below the
    # air's floor (models.value_range); plain, adapted, and a uint16 without padding
    "ct_int16_pad_v8": lambda: (_ct_with_padding((9, 40, 60), 18), {"slab": 4, "tile": (16, 24)}),
    "ct_int16_pad_adapted_v8": lambda: (_ct_with_padding((10, 40, 48), 19), {"adapt": True}),
    "mr_uint16_range_v8": lambda: (_near_floor((9, 40, 60), 20), {"slab": 4, "tile": (16, 24)}),
    # the shipped network with 10-bit weights (model c529efcb, 2026-12-03: the float twin of
    # a96a0bc8 quantised afresh); adapted: written with adapt.pays_off forced True, so that it
    # carries an embedded network with 10-bit weights
    "ct_int16_pad_w10_v9": lambda: (_ct_with_padding((9, 40, 60), 21),
                                    {"slab": 4, "tile": (16, 24)}),
    "mr_uint16_range_w10_v9": lambda: (_near_floor((9, 40, 60), 22), {"slab": 4, "tile": (16, 24)}),
    "ct_int16_pad_w10_adapted_v9": lambda: (_ct_with_padding((10, 40, 48), 23), {"adapt": True}),
    # the embedded model packed in one LZMA stream instead of an npz (models.array_pack,
    # 2026-12-03); written with adapt.pays_off forced True
    "mr_uint16_packed_adapted_v10": lambda: (_phantom((16, 64, 64), "uint16", 24), {"adapt": True}),
    # blob format 5: tokens in two stages, a tail stream per slice (models.entropy,
    # 2026-12-03); adapted: written with adapt.pays_off forced True
    "ct_int16_pad_two_stage_v11": lambda: (_ct_with_padding((9, 40, 60), 25),
                                           {"slab": 4, "tile": (16, 24)}),
    "mr_uint16_range_two_stage_v11": lambda: (_near_floor((9, 40, 60), 26),
                                              {"slab": 4, "tile": (16, 24)}),
    "ct_int16_pad_two_stage_adapted_v11": lambda: (_ct_with_padding((10, 40, 48), 27),
                                                   {"adapt": True}),
    # blob format 6: small slices share their streams in groups (models.codec, 2026-12-04):
    # groups of 4 over two tile rows (ghost rows, phantoms); groups of 6 over one tile, the
    # second slab's group shorter; large slices, one slice a group
    "ct_int16_pad_groups_v12": lambda: (_ct_with_padding((9, 40, 60), 28),
                                        {"slab": 4, "tile": (16, 24)}),
    "mr_uint16_groups_v12": lambda: (_near_floor((10, 32, 40), 29), {"slab": 6}),
    "u8_bands_groups_v12": lambda: (_near_floor((3, 140, 300), 30).astype(np.uint8), {}),
}


def _padded(vol: np.ndarray) -> np.ndarray:
    """``vol`` with a constant frame outside a circle (CT padding: flat contexts)."""
    y, x = np.meshgrid(np.linspace(-1, 1, vol.shape[1]), np.linspace(-1, 1, vol.shape[2]),
                       indexing="ij")
    vol[:, x ** 2 + y ** 2 > 0.8] = np.iinfo(vol.dtype).min
    return vol


def _near_floor(shape, seed) -> np.ndarray:
    """uint16 values a few units above 0, and a brighter block: residuals meet the dtype's floor."""
    rng = np.random.default_rng(seed)
    vol = np.abs(rng.normal(0, 3, shape))
    vol[:, shape[1] // 3:2 * shape[1] // 3, shape[2] // 4:3 * shape[2] // 4] += 200
    return np.round(vol).astype(np.uint16)


def _ct_with_padding(shape, seed) -> np.ndarray:
    """int16 air clipped at 0 with a brighter disc, -2000 outside a circle."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    vol = np.maximum(np.round(np.where(x ** 2 + y ** 2 < 0.3, 900.0, 3.0)
                              + rng.normal(0, 10, shape)), 0)
    vol[x ** 2 + y ** 2 > 0.85] = -2000
    return vol.astype(np.int16)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _record() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


def write_missing_golden_blobs() -> None:
    record = _record()
    for name, build in VOLUMES.items():
        if name in record:
            continue
        vol, options = build()
        (GOLDEN / f"{name}.vxa").write_bytes(models.encode_volume(vol, **options))
        record[name] = {"sha256": _sha(vol), "dtype": vol.dtype.name, "shape": list(vol.shape)}
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("name", sorted(_record()))
def test_golden_blob_decodes_to_its_recorded_volume(name):
    want = _record()[name]
    blob = (GOLDEN / f"{name}.vxa").read_bytes()
    vol = models.decode_volume(blob)
    assert vol.dtype.name == want["dtype"] and list(vol.shape) == want["shape"]
    assert _sha(vol) == want["sha256"]
    mid = vol.shape[0] // 2
    np.testing.assert_array_equal(models.decode_slices(blob, mid, mid + 1), vol[mid:mid + 1])


def test_a_golden_blob_carries_its_token_tables_in_steps():
    """Keeps the ``token_steps`` way of carrying refitted tables readable."""
    import io

    from models.container import unpack_header
    header, _ = unpack_header((GOLDEN / "mr_uint16_frac_steps_v6.vxa").read_bytes())
    with np.load(io.BytesIO(header.embedded)) as npz:
        assert {"token_steps", "token_shift"} <= set(npz.files) and npz["token_steps"].any()


def test_golden_blobs_keep_networks_of_both_weight_widths():
    """Blobs of the 8-bit shipped models and of the 10-bit ones (shipped and embedded) are
    pinned: both kinds must keep decoding."""
    from models import adapt
    from models.container import unpack_header
    from models.registry import model_by_id
    widths = {}
    for name in ("ct_int16_pad_v8", "ct_int16_pad_w10_v9", "ct_int16_pad_w10_adapted_v9"):
        header, _ = unpack_header((GOLDEN / f"{name}.vxa").read_bytes())
        model = model_by_id(header.model_id, header.model_name)
        if header.embedded:
            model = adapt.with_embedded(model, header.embedded)
        widths[name] = max(int(np.abs(layer.weight).max()) for layer in model.net.layers)
    assert widths == {"ct_int16_pad_v8": 127, "ct_int16_pad_w10_v9": 511,
                      "ct_int16_pad_w10_adapted_v9": 511}


def test_golden_blobs_keep_both_forms_of_embedded_models():
    """Embedded models as an npz (until 2026-12-03) and packed (models.array_pack)."""
    from models import array_pack
    from models.container import unpack_header
    forms = {name: array_pack.is_packed(unpack_header((GOLDEN / f"{name}.vxa").read_bytes())[0]
                                        .embedded)
             for name in ("ct_int16_pad_w10_adapted_v9", "mr_uint16_packed_adapted_v10")}
    assert forms == {"ct_int16_pad_w10_adapted_v9": False, "mr_uint16_packed_adapted_v10": True}


def test_golden_blobs_of_format_6_hold_stream_groups_of_several_sizes():
    groups = {name: models.blob_info((GOLDEN / f"{name}.vxa").read_bytes())["stream_group"]
              for name in ("ct_int16_pad_groups_v12", "mr_uint16_groups_v12",
                           "u8_bands_groups_v12")}
    assert groups == {"ct_int16_pad_groups_v12": 4, "mr_uint16_groups_v12": 6,
                      "u8_bands_groups_v12": 1}


def test_every_golden_volume_is_recorded():
    assert set(VOLUMES) <= set(_record()), "run python tests/test_golden.py and commit the blobs"


@pytest.mark.parametrize("name", ["ct_int16_pad_groups_v12", "mr_uint16_groups_v12",
                                  "u8_bands_groups_v12"])
def test_current_encoder_writes_the_golden_blob_again(name):
    """Blobs of the shipped model and the current format: the encoder's output is pinned
    byte for byte (a change to it is a format change and needs a new golden blob)."""
    vol, options = VOLUMES[name]()
    assert models.encode_volume(vol, **options) == (GOLDEN / f"{name}.vxa").read_bytes()


if __name__ == "__main__":
    write_missing_golden_blobs()
