"""The one place a run's trainer is chosen: :func:`trainer_for` builds the trainer of a config's algorithm.

Each trainer names its config class (``CONFIG``), and each config class names its algorithms (its
``algorithm`` field's choices), so adding an algorithm is a config, a trainer and one entry in
:data:`TRAINERS`. A variant of an algorithm (another advantage estimator, say) is an option of its config and
of the function it changes, not a trainer.
"""

from __future__ import annotations

from .config import TrainingConfig
from .grpo import GRPOTrainer
from .preference import VRPOTrainer
from .trainer import ELBOTrainer

TRAINERS: tuple[type[ELBOTrainer], ...] = (VRPOTrainer, GRPOTrainer)


def trainer_for(config: TrainingConfig, **kwargs) -> ELBOTrainer:
    """The trainer of ``config`` (a :class:`~vrpo.training.config.VRPOConfig`: ``VRPOTrainer``; a
    :class:`~vrpo.training.config.GRPOConfig`: ``GRPOTrainer``), built with ``kwargs`` (``task=``,
    ``model=``, ``callbacks=``, ... as :class:`~vrpo.training.trainer.ELBOTrainer` takes them)."""
    for cls in TRAINERS:
        if isinstance(config, cls.CONFIG):
            return cls(config, **kwargs)
    raise TypeError(
        f"trainer_for: no trainer takes a {type(config).__name__} (trainers: {', '.join(c.__name__ for c in TRAINERS)})"
    )
