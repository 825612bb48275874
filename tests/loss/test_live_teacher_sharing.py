"""A live teacher shares the student's forward pass (one tree over prompts and teacher
contexts): loss and gradients equal the separate student and teacher passes (float64), with LoRA too."""
import pytest
import torch
from tiny_model import tiny_llama

import sdft.loss.batch as batch_loss
from sdft import SDFTConfig
from sdft.loss.teacher import Teacher
from sdft.models.lora import LoraSettings, apply_lora
from sdft.prefix.packed import joint_pass_pays
from sdft.rollout.engine import RolloutBatch

ROTARY_TOL = 16 * 2.0 ** -24  # float32 rotary tables (see test_batch_prefix)


def _batch(system_len=40, group=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 97, (system_len,), generator=g)
    questions = [torch.randint(3, 97, (n,), generator=g) for n in (4, 6)]
    prompts = [torch.cat([system, q]) for q in questions]
    contexts = [torch.cat([system, q, torch.randint(3, 97, (5,), generator=g)]) for q in questions]
    completions = torch.randint(3, 97, (2 * group, 5), generator=g)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 5, 2, 4, 5])[:, None]
    return RolloutBatch(prompts, completions.masked_fill(~mask, 0), mask, torch.zeros(mask.shape)), contexts


def _loss_and_grads(model, batch, contexts, joint, monkeypatch):
    monkeypatch.setattr(batch_loss, "joint_pass_pays", lambda *a: joint)
    config = SDFTConfig(divergence="forward_kl", teacher_mode="live", device="cpu", share_teacher_prefix=True)
    loss = batch_loss.BatchLoss.from_config(config)(model, Teacher(model, "live"), batch, contexts, pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("lora", [False, True])
def test_joint_pass_equals_separate_passes(lora, monkeypatch):
    model = tiny_llama().double()
    if lora:
        model = apply_lora(model, LoraSettings.from_config(SDFTConfig(use_lora=True, lora_r=4,
                                                                       lora_target_modules=["q_proj", "v_proj"])))
        with torch.no_grad():  # adapters that do something
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    batch, contexts = _batch()
    calls = []
    real = batch_loss.joint_tree_hidden
    monkeypatch.setattr(batch_loss, "joint_tree_hidden", lambda *a: calls.append(1) or real(*a))
    joint = _loss_and_grads(model, batch, contexts, True, monkeypatch)
    assert calls, "the joint pass was not taken"
    separate = _loss_and_grads(model, batch, contexts, False, monkeypatch)
    torch.testing.assert_close(joint[0], separate[0], rtol=ROTARY_TOL, atol=0)
    for a, b in zip(joint[1], separate[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=ROTARY_TOL * max(b.abs().max().item(), 1e-30))


def test_frozen_or_dropout_teachers_never_share():
    model = tiny_llama()
    assert not Teacher(model, "frozen").is_student(model.config)
    assert not Teacher(model, "ema").is_student(model.config)
    assert Teacher(model, "live").is_student(model.config)
    model.config.attention_dropout = 0.1
    assert not Teacher(model, "live").is_student(model.config)


def test_cost_rule_shares_long_common_prefixes_only():
    model = tiny_llama()
    batch, contexts = _batch(system_len=120)
    assert joint_pass_pays(model.get_decoder(), batch.prompts, contexts, batch.completions, batch.mask, 0)
    batch, contexts = _batch(system_len=1)
    assert not joint_pass_pays(model.get_decoder(), batch.prompts, contexts, batch.completions, batch.mask, 0)


def test_token_passes_count_the_joint_tree_once(monkeypatch):
    """tokens_processed reports what ran: one joint tree (fewer nodes) or a student and a teacher tree."""
    from sdft.prefix.packed import pack_sides

    model = tiny_llama()
    batch, contexts = _batch(system_len=60)
    config = SDFTConfig(divergence="forward_kl", teacher_mode="live", device="cpu", share_teacher_prefix=True)
    counts = {}
    for joint in (True, False):
        monkeypatch.setattr(batch_loss, "joint_pass_pays", lambda *a, j=joint: j)
        passes = []
        batch_loss.BatchLoss.from_config(config)(model, Teacher(model, "live"), batch, contexts, 0, passes)
        counts[joint] = passes
    sides = [[batch.prompts], [contexts], [batch.prompts, contexts]]
    nodes = [pack_sides(s, batch.completions, batch.mask, 0, 1e9)[0].num_nodes for s in sides]
    assert counts[True] == [nodes[2]] and sorted(counts[False]) == sorted(nodes[:2])
    assert nodes[2] < nodes[0] + nodes[1]


def test_joint_pass_is_opt_in(monkeypatch):
    """share_teacher_prefix defaults to off (measured no faster, more memory): separate passes."""
    model = tiny_llama()
    batch, contexts = _batch(system_len=120)
    monkeypatch.setattr(batch_loss, "joint_tree_hidden", lambda *a: pytest.fail("joint pass taken"))
    config = SDFTConfig(divergence="forward_kl", teacher_mode="live", device="cpu")
    batch_loss.BatchLoss.from_config(config)(model, Teacher(model, "live"), batch, contexts, 0)
