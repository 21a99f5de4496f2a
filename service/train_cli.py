"""``voxarc train``: train a codec model from DICOM series folders; writes weights + model card.

    voxarc train --model paper-cube SERIES_DIR --out DIR [--minutes 5]
    voxarc train --model default SERIES_DIR... --out DIR [--epochs 3]

The paper models train on ONE volume (the first stack of the first folder), as the paper does;
the default model trains on every stack of every folder. Progress goes to stderr; the paper
models also write a resumable checkpoint (``DIR/NAME.ckpt.pt``) every minute.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from service.progress import Progress

log = logging.getLogger(__name__)
MODELS = ("paper-cube", "paper-pyramid", "default")


def _progress(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_volumes(folders) -> list[tuple[str, np.ndarray]]:
    """``(name, voxels)`` of every stack in the folders (stored values, sorted along the normal)
    and ``.npy`` volumes."""
    from service.series_reader import read_path
    out = []
    for folder in folders:
        for vol in read_path(folder):
            out.append((vol.name, vol.voxels))
    if not out:
        raise SystemExit(f"no image stacks found in {', '.join(map(str, folders))}")
    return out


def write_card(path: Path, name: str, model: str, data: list[tuple[str, tuple, str]],
               command: str, report: dict, model_id: bytes) -> None:
    """A markdown model card next to the weights."""
    lines = [f"# Model card: {name}", "",
             f"- kind: `{model}`", f"- model id: `{model_id.hex()}`",
             f"- command: `{command}`", f"- written: {time.strftime('%Y-%m-%d %H:%M:%S')}",
             "", "## Data", ""]
    lines += [f"- `{n}`: shape {shape}, {dtype}" for n, shape, dtype in data]
    lines += ["", "## Training and results", "", "```json", json.dumps(report, indent=2,
                                                                       default=str), "```", ""]
    if model.startswith("paper"):
        lines += [
            "Paper settings: MLP 1024-512-256-128-1, LeakyReLU slope 2**-7 (exact power of two "
            "for integer inference; the paper's slope is not stated, PyTorch's default is 0.01), "
            "loss MAE + (1 - |PCC|), SGD momentum 0.9 with the paper's batch and learning rate, "
            "samples = every voxel of ten whole slices taken with a fixed stride from one "
            "volume, shuffled, inputs normalised to [-1, 1] by that volume's minimum and maximum."
            + (" Initialisation (`init`: linear; the paper does not state one): the network "
               "starts as the least-squares linear predictor of the training samples, carried "
               "by two units per layer through the LeakyReLUs, every other unit random with "
               "output weight zero (see docs/paper-reproduction.md)." if report.get("init") ==
               "linear" else
               " Initialisation: PyTorch's default, with the output layer negated when the "
               "initial predictions correlate negatively with the targets (`sign_fix`; without "
               "it the |PCC| term traps the network at a tiny anticorrelated output, see "
               "docs/paper-reproduction.md).") +
            " Training is bounded in time (see `train_seconds`, "
            "summed over the runs a `--resume` continued, `samples_seen`, `epochs`): a few "
            "epochs on 2 shared CPU cores, so the network is not converged; the paper does not "
            "state its number of epochs. Each epoch is a fresh shuffle of the same samples. "
            "The coding table stored here is the training volume's; a blob carries one fitted "
            "to the volume it codes (models/paper_table.py).",
            "",
            "`train_bits_float` / `train_bits_int`: ideal bits per voxel of the float network's "
            "rounded prediction and of the exact integer network on the same training samples, "
            "each with one coding table fitted the same way; their difference is the cost of "
            "quantisation.", ""]
    path.write_text("\n".join(lines))


def _train_paper(args, volumes):
    from models.paper_train import train_paper
    name, vol = volumes[0]
    if len(volumes) > 1:
        _progress(f"paper models train on ONE volume: using {name} {vol.shape}, ignoring "
                  f"{len(volumes) - 1} other stack(s)")
    ckpt = Path(args.checkpoint_dir or args.out) / f"{args.name}.ckpt.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    predictor, report = train_paper(args.model, vol, minutes=args.minutes,
                                    max_epochs=args.max_epochs, seed=args.seed,
                                    checkpoint=ckpt, progress=_progress,
                                    resume=ckpt if args.resume else None, name=args.name,
                                    batch=args.batch, lr=args.lr, optimizer=args.optimizer,
                                    init=args.init)
    report["train_volume"] = name
    report["threads"] = args.threads
    report["quantisation_cost_bits"] = report["train_bits_int"] - report["train_bits_float"]
    return predictor, report, [(name, vol.shape, vol.dtype.name)]


def _train_default(args, volumes):
    from models import train as T
    from models.features import NEIGHBOURHOODS
    hidden = tuple(int(h) for h in args.hidden.split(","))
    bar = Progress("train default: epochs", args.epochs)

    def progress(msg: str) -> None:  # a bar over the epochs on a terminal, lines otherwise
        if msg.startswith("epoch ") and bar.tty:
            bar.advance(note=msg.split(": ", 1)[-1])
        else:
            _progress(msg)

    network_from = None
    if args.network_from:
        from models.registry import load_model
        network_from = load_model(args.network_from)
    predictor, report = T.train_default(
        [v for _, v in volumes], hidden=hidden, epochs=args.epochs,
        slabs_per_volume=args.slabs_per_volume, keep=args.keep, seed=args.seed,
        name=args.name, progress=progress, hood=NEIGHBOURHOODS[args.neighbourhood],
        flat=args.flat_contexts, network_from=network_from, fraction_bins=args.fraction_bins,
        weight_max=None if args.weight_bits is None else (1 << (args.weight_bits - 1)) - 1)
    if bar.tty:
        bar.finish()
    report["kind"] = "default"
    report["neighbourhood"] = args.neighbourhood if network_from is None else \
        f"that of {args.network_from} ({predictor.neighbourhood.size} neighbours)"
    if network_from is not None:
        report["network_from"] = network_from.model_id.hex()
    return predictor, report, [(n, v.shape, v.dtype.name) for n, v in volumes]


def main(args) -> int:
    import torch
    from models.registry import save_model
    torch.set_num_threads(args.threads)
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    args.name = args.name or args.model
    _progress(f"reading {len(args.series)} series folder(s)")
    volumes = read_volumes(args.series)
    t0 = time.time()
    if args.model == "default":
        predictor, report, data = _train_default(args, volumes)
    else:
        predictor, report, data = _train_paper(args, volumes)
    report["wall_seconds"] = round(time.time() - t0, 1)
    weights = args.out / f"{args.name}.npz"
    mid = save_model(predictor, weights, meta=report)
    command = "voxarc train " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 2 else "voxarc train (programmatic)"
    write_card(args.out / f"{args.name}.md", args.name, args.model, data, command, report, mid)
    _progress(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and its model card")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a codec model from DICOM series folders",
                              description=__doc__,
                              formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("series", nargs="+", type=Path, metavar="SERIES_DIR",
                   help="DICOM series folders, or .npy volumes (slices, rows, columns)")
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--out", required=True, type=Path, help="folder for weights and model card")
    p.add_argument("--name", help="model name (file stem; default: the --model value)")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="paper models: wall-clock training budget (default: %(default)s)")
    p.add_argument("--max-epochs", type=float, default=1.0,
                   help="paper models: stop after this many epochs (default: %(default)s)")
    p.add_argument("--checkpoint-dir", type=Path,
                   help="paper models: where the checkpoint goes (default: --out)")
    p.add_argument("--resume", action="store_true",
                   help="paper models: continue from the checkpoint in --out")
    p.add_argument("--batch", type=int, help="paper models: override the paper's batch size")
    p.add_argument("--lr", type=float, help="paper models: override the paper's learning rate")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="paper models: sgd (the paper's, momentum 0.9) or adam (a deviation)")
    p.add_argument("--init", choices=("linear", "random"), default="linear",
                   help="paper models: start at the least-squares linear predictor (default) or "
                        "at PyTorch's random initialisation")
    p.add_argument("--epochs", type=int, default=12, help="default model: epochs")
    p.add_argument("--hidden", default="64,32", help="default model: hidden layer sizes")
    p.add_argument("--neighbourhood", choices=("default", "wide"), default="default",
                   help="default model: its causal neighbourhood (wide: 7 more voxels of the "
                        "current slice, up to 3 rows up and 3 columns left)")
    p.add_argument("--slabs-per-volume", type=int, default=4, help="default model")
    p.add_argument("--keep", type=float, default=0.25,
                   help="default model: fraction of voxels of the chosen slabs")
    p.add_argument("--flat-contexts", action="store_true",
                   help="default model: code contexts whose neighbours are all equal with their "
                        "own table row (constant background)")
    p.add_argument("--fraction-bins", type=int, choices=(1, 4), default=1,
                   help="default model: coding-table rows per scale index, one per part of the "
                        "predicted mean's fraction")
    p.add_argument("--network-from", metavar="MODEL",
                   help="default model: keep this shipped model's network (and neighbourhood), "
                        "fit only the coding tables")
    p.add_argument("--weight-bits", type=int, choices=(8, 10),
                   help="default model: the integer network's weight width (default 10; with "
                        "--network-from, given: its float twin quantised afresh at this width, "
                        "else its network kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=main)
