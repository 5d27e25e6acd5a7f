"""``detailfusion tracking replay``: send what stages logged offline once MLflow is back."""

from __future__ import annotations

import argparse
import json


def cmd_replay(args: argparse.Namespace) -> int:
    from detailfusion.tracking.replay import replay_offline_record

    # the top-level CLI has checked all of --params (the checkout's params.yaml outside a checkout)
    done = replay_offline_record(args.record, args.config.tracking)
    print(json.dumps({"replayed": done}, indent=2))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``tracking`` and its subcommands to the top-level subparsers object."""
    tracking = subparsers.add_parser("tracking", help="MLflow tracking utilities")
    tsub = tracking.add_subparsers(dest="tracking_command", required=True)
    p = tsub.add_parser("replay", help="log what stages recorded while the tracking server was down")
    p.add_argument("--record", help="offline record (default: params tracking.offline_record)")
    p.set_defaults(func=cmd_replay)
    return tracking
