"""sdft's DDP wrapper: no per-forward buffer broadcast, no deprecation warning printed on every rank, and
gradients that are views into DDP's buckets rather than a second copy beside them."""
import warnings

import torch
import torch.distributed as dist

from sdft.runtime.parallel import replicate


def test_ddp_wraps_without_a_deprecation_warning_a_buffer_broadcast_or_a_second_gradient_copy(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        model.register_buffer("table", torch.arange(4.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            root = replicate(model)
        assert root.broadcast_buffers is False  # the property torch 2.13 keeps for forward_sync_buffers
        assert root.module.model is model
        assert root.gradient_as_bucket_view
        root(lambda m, x: m(x).sum(), torch.ones(2, 4)).backward()
        bucket = model.weight.grad.untyped_storage()
        assert bucket.data_ptr() == model.bias.grad.untyped_storage().data_ptr()  # both live in one bucket
        assert bucket.nbytes() >= (model.weight.numel() + model.bias.numel()) * 4
    finally:
        dist.destroy_process_group()


def test_a_process_that_does_not_write_keeps_nothing_of_a_gathered_state():
    """Under FSDP2 every process takes part in the gathers of a checkpoint, but only the writer keeps the
    full tensors: the others would each hold the whole state in the machine's memory."""
    from sdft.runtime.parallel import full_tensors

    state = {"w": torch.ones(2, 3), "groups": [{"lr": 0.1, "params": [0]}], "step": torch.tensor(3.0)}
    kept = full_tensors(state)
    assert torch.equal(kept["w"], state["w"]) and kept["groups"] == state["groups"]
    assert full_tensors(state, keep=False) is None
