r"""``python -m vrpo.tasks.sort_long``: rebuild the long-sorting task's model and pairs, bit for bit.

    python -m vrpo.tasks.sort_long sft --output_dir vrpo/tasks/sort_long/data/sft_model --overwrite
    python -m vrpo.tasks.sort_long pairs --model vrpo/tasks/sort_long/data/sft_model \
        --output vrpo/tasks/sort_long/data/pairs.jsonl --overwrite

The sorting demo's builders (:mod:`vrpo.tasks.sort.build`: fixed seed, one CPU thread, deterministic
algorithms) with this task's lengths, settings and pairing rule. None overwrites a file without
``--overwrite``.
"""

from __future__ import annotations

import sys

from ..sort.__main__ import run
from .task import LENGTHS, PAIRING, PairSettings, SFTSettings


def main(argv: list[str] | None = None) -> int:
    return run(
        argv,
        prog="python -m vrpo.tasks.sort_long",
        description=__doc__.split("\n\n")[0],
        sft_settings=SFTSettings,
        pair_settings=PairSettings,
        lengths=LENGTHS,
        pairing=PAIRING,
        synthetic=False,
    )


if __name__ == "__main__":
    sys.exit(main())
