"""The training layer: a run's config (:mod:`.config`: the shared settings and each algorithm's), the loop
(:mod:`.trainer`: ``ELBOTrainer``, build, step, loop) and the algorithms beside each other on it
(:mod:`.preference`: ``VRPOTrainer``; :mod:`.grpo`: ``GRPOTrainer``, with :mod:`.rollouts`), chosen by
:func:`trainer_for` (:mod:`.registry`); and the pieces the loop calls down into: data order and draw keys
(:mod:`.schedule`), batches (:mod:`.batches`), the reference (:mod:`.reference`), evaluation
(:mod:`.evaluation`), resume checks (:mod:`.resume`), checkpoints (:mod:`.checkpoints`), the output directory
(:mod:`.run_dir`), logs (:mod:`.logs`), signals (:mod:`.signals`), outputs (:mod:`.outputs`, :mod:`.plots`),
data (:mod:`.data`), loading (:mod:`.loading`), distributed runs (:mod:`.distributed`), the budget advisor's tally
(:mod:`.advisor_tally`, :mod:`.probe`) and the task protocol
(:mod:`.task`)."""

from .config import GRPOConfig, TrainingConfig, VRPOConfig, parse_config
from .data import TokenizedPairs, read_preference_rows, tokenize_pairs
from .grpo import GRPOTrainer
from .preference import VRPOTrainer
from .registry import trainer_for
from .task import GenerationReport, GradedTask
from .trainer import ELBOTrainer

__all__ = [
    "ELBOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "GenerationReport",
    "GradedTask",
    "TokenizedPairs",
    "TrainingConfig",
    "VRPOConfig",
    "VRPOTrainer",
    "parse_config",
    "read_preference_rows",
    "tokenize_pairs",
    "trainer_for",
]
