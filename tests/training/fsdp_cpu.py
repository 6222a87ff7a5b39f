"""``python -m vrpo.train`` under accelerate's FSDP2 on CPU processes (gloo): the tests' launcher shim.

accelerate selects ``DistributedType.FSDP`` only for GPU backends; on the CPU it falls back to ``MULTI_CPU``
(DDP over gloo) even when launched with an FSDP config. torch's FSDP2 (``fully_shard``) itself runs on the CPU
over gloo, so this shim switches accelerate's state to FSDP as soon as it is created, with the plugin that
``accelerate launch --config_file examples/accelerate_fsdp.yaml`` built from the ``FSDP_*`` environment. Everything
after that is accelerate's and vrpo's own FSDP code: ``prepare`` (``fsdp2_prepare_model``), gradient clipping,
sharded ``save_state``/``load_state`` and the gathered final model.

Run as ``accelerate launch --config_file <fsdp.yaml> --cpu tests/training/fsdp_cpu.py <vrpo.train flags>``.
"""

from __future__ import annotations

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from vrpo.train import main

    sys.exit(main(sys.argv[1:]))
