"""Deprecated alias of :mod:`vrpo.models.tokenization` (moved in 0.2; this alias goes in 0.3)."""

import warnings

from .models.tokenization import *  # noqa: F403
from .models.tokenization import (  # noqa: F401
    collate,
    encode_example,
    encode_preference,
    get_mask_token_id,
    load_tokenizer,
)

warnings.warn(
    "vrpo.tokenization moved to vrpo.models.tokenization (load_tokenizer is also exported by vrpo.models); "
    "the alias goes in vrpo 0.3",
    DeprecationWarning,
    stacklevel=2,
)
