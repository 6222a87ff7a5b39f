"""Deprecated alias of :mod:`vrpo.tasks.sort` (the sorting demo moved there in 0.2; this alias goes in 0.3).

``python -m vrpo.toy sft|pairs|synthetic`` still runs ``python -m vrpo.tasks.sort``.
"""

import sys
import warnings

from .tasks.sort.__main__ import main
from .tasks.sort.build import *  # noqa: F403
from .tasks.sort.task import *  # noqa: F403
from .tasks.sort.task import SYNTHETIC_PAIRS_FILE as TOY_FILE  # noqa: F401  (0.1's name: toy_sort.jsonl)
from .tasks.sort.task import pairs_path as toy_pairs_path  # noqa: F401  (0.1's names)
from .tasks.sort.task import sft_path as toy_sft_path  # noqa: F401
from .tasks.sort.task import synthetic_pairs_path as toy_dataset_path  # noqa: F401
from .tasks.sort.task import task_tokenizer as toy_tokenizer  # noqa: F401

warnings.warn(
    "vrpo.toy moved to vrpo.tasks.sort (python -m vrpo.tasks.sort); the alias goes in vrpo 0.3",
    DeprecationWarning,
    stacklevel=2,
)

if __name__ == "__main__":
    sys.exit(main())
