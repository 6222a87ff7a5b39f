"""``python -m vrpo.tasks.sort``: rebuild the sorting demo's model and pairs (:mod:`vrpo.tasks.sort.build`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .build import pairs_command, sft_command, synthetic_command
from .task import LENGTHS, PairSettings, SFTSettings


def _add_settings(parser: argparse.ArgumentParser, cls):
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"default {f.default}")


def _settings(cls, args) -> object:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def main(argv: list[str] | None = None) -> int:
    return run(argv, prog="python -m vrpo.tasks.sort", description=__doc__.split("\n\n")[0])


def run(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    sft_settings: type = SFTSettings,
    pair_settings: type = PairSettings,
    lengths: tuple[int, int] = LENGTHS,
    pairing: str = "right_vs_nearest",
    synthetic: bool = True,
) -> int:
    """A sorting task's build commands: ``sft`` and ``pairs`` with the task's settings classes (their
    defaults are the shipped files'), its list ``lengths`` and pairing rule (:func:`.build.rank_pair`'s
    ``pairing``); ``synthetic`` for the demo's synthetic pairs."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="train the SFT starting policy")
    sft.add_argument("--output_dir", required=True)
    sft.add_argument("--overwrite", action="store_true")
    _add_settings(sft, sft_settings)
    pairs = sub.add_parser("pairs", help="sample, grade and pair the SFT model's answers")
    pairs.add_argument("--model", required=True, help=f"an SFT model directory ({prog} sft)")
    pairs.add_argument("--output", required=True, help="the JSONL to write (and X.meta.json beside it)")
    pairs.add_argument("--overwrite", action="store_true")
    _add_settings(pairs, pair_settings)
    if synthetic:
        syn = sub.add_parser("synthetic", help="the synthetic pairs of synthetic_pairs.jsonl")
        syn.add_argument("output")
        syn.add_argument("--n", type=int, default=2000)
        syn.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "sft":
            record = sft_command(args.output_dir, _settings(sft_settings, args), args.overwrite, lengths)
            print(
                f"wrote {args.output_dir}: {record['parameters']} parameters, dev exact-sort accuracy "
                f"{record['dev_accuracy']:.1%} (credit {record['dev_credit']:.3f})"
            )
        elif args.command == "pairs":
            record = pairs_command(
                args.model, args.output, _settings(pair_settings, args), args.overwrite, lengths, pairing
            )
            print(f"wrote {args.output}: {json.dumps(record['stats'])}")
        else:
            synthetic_command(args.output, args.n, args.overwrite)
            print(f"wrote {args.n} pairs to {args.output}")
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
