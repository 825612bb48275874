"""sdft's DDP wrapper: no per-forward buffer broadcast, and no deprecation warning printed on every rank."""
import warnings

import torch
import torch.distributed as dist

from sdft.runtime.parallel import replicate


def test_ddp_wraps_without_a_deprecation_warning_or_a_buffer_broadcast(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        model.register_buffer("table", torch.arange(4.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            root = replicate(model)
        assert root.broadcast_buffers is False  # the property torch 2.13 keeps for forward_sync_buffers
        assert root.module.model is model
    finally:
        dist.destroy_process_group()
