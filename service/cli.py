"""The `voxarc` command line: one sub-command module per concern, registered here."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# torch's OpenMP threads spin on a busy 2-core machine (50-100x slower) unless told to sleep;
# this must be set before any sub-command module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Each module exposes ``register(subparsers)``; its sub-commands set ``func(args) -> int``.
_COMMAND_MODULES = ("service.node_cli", "service.export_cli", "service.bench", "service.train_cli",
                    "service.node_bench", "service.verify_cli", "service.delete_cli",
                    "service.correct_cli", "service.accesses_cli",
                    "service.backup_cli", "service.bits_cli", "service.query_bench",
                    "service.conformance", "service.pull_cli", "service.web_bench",
                    "service.web_user_cli", "service.deleted_cli", "service.retention_cli",
                    "service.hold_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxarc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from service.config import SettingsError
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:    # any command's --config, named once, without a traceback
        logging.getLogger("voxarc").error("settings%s: %s", f" of {args.config}"
                                          if getattr(args, "config", None) else "", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
