"""``python -m rlhf_fast <subcommand> ...``: a small dispatcher.

A subcommand is a module with ``add_arguments(parser)`` and ``main(args) -> int | None``;
it is imported only when chosen (so ``--help`` stays fast). To add one, add one line
to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

SUBCOMMANDS: Dict[str, Tuple[str, str]] = {
    # name: (module, one-line help)
    "demo": ("rlhf_fast.loss.demo", "the fused loss on random data, every available backend vs the reference"),
    "ppo": ("rlhf_fast.training.cli", "PPO on a saved policy, reward model and a JSONL prompt file"),
    "calibrate": ("rlhf_fast.training.cli_calibrate",
                  "store a saved reward model's score mean/std on its reference policy's replies (--reward-normalize)"),
    "casestudy": ("rlhf_fast.casestudy.cli", "reproduce and fix the reward-hacking case study"),
    "monitor": ("rlhf_fast.monitor.cli",
                "early warning of reward hacking over a finished run (rlhf_fast, TRL or verl metrics)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m rlhf_fast", description="rlhf_fast command line")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (_, help_text) in SUBCOMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    # parse only the subcommand name first, then import just that module
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help or the error for an unknown subcommand
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"python -m rlhf_fast {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    code = module.main(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
