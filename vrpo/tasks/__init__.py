"""Tasks with verifiers, as plug-ins of the training layer (:class:`vrpo.training.GradedTask`). Only the entry
points choose one: ``python -m vrpo.train`` runs the sorting demo (:mod:`vrpo.tasks.sort`)."""
