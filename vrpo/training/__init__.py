"""The training layer: a run's config (:mod:`.config`), the trainer (:mod:`.trainer`: build, step, loop; :mod:`.grpo`: online RL on it, with :mod:`.rollouts`) and
the pieces it calls down into: data order and draw keys (:mod:`.schedule`), batches (:mod:`.batches`), the
reference (:mod:`.reference`), evaluation (:mod:`.evaluation`), resume checks (:mod:`.resume`), checkpoints
(:mod:`.checkpoints`), the output directory (:mod:`.run_dir`), logs (:mod:`.logs`), signals (:mod:`.signals`),
outputs (:mod:`.outputs`, :mod:`.plots`), data (:mod:`.data`), loading (:mod:`.loading`), distributed runs
(:mod:`.distributed`), the budget advisor's tally (:mod:`.advisor_tally`, :mod:`.probe`) and the task protocol
(:mod:`.task`)."""

from .config import VRPOConfig, parse_config
from .data import TokenizedPairs, read_preference_rows, tokenize_pairs
from .grpo import GRPOTrainer
from .task import GenerationReport, GradedTask
from .trainer import VRPOTrainer

__all__ = [
    "GRPOTrainer",
    "GenerationReport",
    "GradedTask",
    "TokenizedPairs",
    "VRPOConfig",
    "VRPOTrainer",
    "parse_config",
    "read_preference_rows",
    "tokenize_pairs",
]
