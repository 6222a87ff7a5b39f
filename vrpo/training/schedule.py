"""The data order of a run and the keys of its mask draws: pure functions of the seed and the step.

A step's global batch is a slice of a seeded permutation of the training pairs (one per epoch); each process
takes its share, in micro-batches. Every sequence's masks are drawn from a key of ``(seed, stream, epoch,
pair, side)``, so a draw never depends on batching, padding, process count or resumption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..estimator import draw_key

CHOSEN, REJECTED = 0, 1
Item = tuple[int, int]  # (epoch, pair index)


@dataclass(frozen=True)
class Schedule:
    """Which pairs each step trains on, on this process.

    Attributes:
        seed: the run's seed.
        num_pairs: training pairs.
        micro_batch: pairs per micro-batch (``--per_device_train_batch_size``).
        accumulation: micro-batches per optimizer step.
        rank, world: this process and the process count.
    """

    seed: int
    num_pairs: int
    micro_batch: int
    accumulation: int
    rank: int = 0
    world: int = 1

    @classmethod
    def for_run(cls, cfg, num_pairs: int, accelerator) -> Schedule:
        """The schedule of a run's config (a :class:`~vrpo.training.config.TrainingConfig`) on this process of
        ``accelerator``, checked (:meth:`check`)."""
        schedule = cls(
            cfg.seed,
            num_pairs,
            cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps,
            accelerator.process_index,
            accelerator.num_processes,
        )
        schedule.check()
        return schedule

    @property
    def local_batch(self) -> int:
        return self.micro_batch * self.accumulation

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // self.global_batch

    def check(self):
        """``ValueError`` naming the flag when the data does not fill one global batch."""
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_pairs} training pairs do not fill one global batch of {self.global_batch} "
                f"(per-device batch x processes x accumulation); lower --per_device_train_batch_size"
            )

    def step_pairs(self, step: int) -> list[Item]:
        """``(epoch, pair index)`` of this process's share of ``step``'s global batch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(draw_key(self.seed, "order", epoch))
        perm = torch.randperm(self.num_pairs, generator=g)
        batch = perm[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()
        return [(epoch, i) for i in batch[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]]

    def micro_batches(self, step: int) -> list[list[Item]]:
        share = self.step_pairs(step)
        return [share[i : i + self.micro_batch] for i in range(0, len(share), self.micro_batch)]


def draw_keys(seed: int, stream: str, items: list[Item]) -> list[int]:
    """The draw keys of ``items``' sequences, chosen rows first then rejected (the batch's order)."""
    return [draw_key(seed, stream, e, i, side) for side in (CHOSEN, REJECTED) for e, i in items]
