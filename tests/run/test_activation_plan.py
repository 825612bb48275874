"""The dry run's activation count is the bytes the student's real scoring pass saves for its backward: the
meta model's count against the real pass through sdft's own tree code on this CPU (fp32, LoRA, gradient
checkpointing, a model with grouped-query heads)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sdft import SDFTConfig
from sdft.models import decoder_of
from sdft.models.lora import LoraSettings, apply_lora
from sdft.models.parts import enable_checkpointing
from sdft.prefix.packed import context_hidden
from sdft.run.activation_plan import scoring_plan

PROMPTS = [list(range(3, 40)), list(range(50, 70)) + list(range(3, 20))]


def _model(seed=0, attention="sdpa"):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation=attention)
    return LlamaForCausalLM(config)


def _real_saved(model, config) -> int:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16"):
        return _saved(model, config)


def _saved(model, config) -> int:
    """Bytes autograd saves during the real student pass over the micro-batch (each storage once, weights
    left out), and its output."""
    g, length = config.num_generations, config.max_completion_length
    completions = torch.arange(len(PROMPTS) * g * length).reshape(-1, length) % 250 + 5
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        hidden = context_hidden(decoder_of(model), [torch.tensor(p) for p in PROMPTS], completions,
                                torch.ones_like(completions, dtype=torch.bool), 0, None, True)
    return sum(seen.values()) + hidden.numel() * hidden.element_size()


@pytest.mark.parametrize("change", [{}, {"use_lora": True}, {"gradient_checkpointing": True},
                                    {"mixed_precision": "bf16"}])
def test_the_count_is_what_the_real_scoring_pass_saves(change):
    config = SDFTConfig(per_device_train_batch_size=2, num_generations=4, max_completion_length=24, device="cpu",
                        **change)
    with torch.device("meta"):
        meta = _model()
    plan = scoring_plan(meta, PROMPTS, config, torch.device("cpu"))
    model = _model().train()
    if config.use_lora:
        model = apply_lora(model, LoraSettings.from_config(config))
    full = _real_saved(model, config)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
        real = _real_saved(model, config) + full // 3  # one layer recomputes at a time
    else:
        real = full
    assert plan.checkpointed == config.gradient_checkpointing
    size = 2 if config.mixed_precision == "bf16" else 4
    assert plan.teacher == 8 * 24 * 64 * size  # the teacher's states
    saved_masks = plan.mask - plan.rows * plan.width ** 2  # a float copy of the bool mask in each layer
    layers = 1 if config.gradient_checkpointing else 3  # checkpointing: only in the layer recomputing
    assert saved_masks == layers * plan.rows * plan.width ** 2 * size
    low, high = (1.0, 1.2) if config.mixed_precision == "bf16" else (0.95, 1.05)  # autocast emulated: over
    assert low < (plan.saved + saved_masks) / real < high, (plan.saved + saved_masks, real)


def test_an_eager_model_counts_its_attention_probabilities():
    config = SDFTConfig(per_device_train_batch_size=2, num_generations=4, max_completion_length=24, device="cpu")
    with torch.device("meta"):
        meta = _model(attention="eager")
    plan = scoring_plan(meta, PROMPTS, config, torch.device("cpu"))
    assert plan.mask == plan.rows * plan.width ** 2 * (1 + 4)  # the bool mask, and one additive copy for all layers
    real = _real_saved(_model(attention="eager").train(), config)
    assert 0.95 < plan.saved / real < 1.05, (plan.saved, real)
    named = scoring_plan(_model(attention="sdpa").to("meta"), PROMPTS,
                         SDFTConfig(**{**config.to_dict(), "attn_implementation": "eager"}), torch.device("cpu"))
    assert named == plan  # the run's attn_implementation, over the model's own
    assert meta.config._attn_implementation == "eager" and not hasattr(meta.config, "_sdft_counted_from")  # as it was
    sdpa = scoring_plan(_model(attention="sdpa").to("meta"), PROMPTS, config, torch.device("cpu"))
    probabilities = 3 * plan.rows * 8 * plan.width ** 2 * 4  # [heads x width x width] in every layer
    assert 0.95 < (plan.saved - sdpa.saved) / probabilities < 1.05


def test_a_live_teacher_joined_to_the_students_tree_is_counted_in_its_pass():
    from sdft.prefix.packed import joint_tree_hidden

    system = list(range(10, 290))  # a long shared system message, short rollouts: the joint pass pays
    prompts, teachers = [system + [5, 6, 7], system + [8, 9]], [system + [20, 21, 5, 6, 7], system + [22, 8, 9]]
    config = SDFTConfig(per_device_train_batch_size=2, num_generations=4, max_completion_length=8, device="cpu",
                        teacher_mode="live", share_teacher_prefix=True)
    with torch.device("meta"):
        meta = _model()
    alone = scoring_plan(meta, prompts, config, torch.device("cpu"))  # no teacher contexts given: the student's
    plan = scoring_plan(meta, prompts, config, torch.device("cpu"), teachers)
    assert plan.rows * plan.width > alone.rows * alone.width
    model = _model().train()
    completions = torch.arange(8 * 8).reshape(8, 8) % 250 + 5
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def keep(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        student, _ = joint_tree_hidden(decoder_of(model), [torch.tensor(p) for p in prompts],
                                       [torch.tensor(t) for t in teachers], completions,
                                       torch.ones_like(completions, dtype=torch.bool), 0)
    real = sum(seen.values()) + student.numel() * student.element_size()
    saved_masks = plan.mask - plan.rows * plan.width ** 2
    assert 0.95 < (plan.saved + saved_masks) / real < 1.05, (plan.saved + saved_masks, real)


@pytest.mark.parametrize("mode", ["auto", "flex", "dense"])
@pytest.mark.parametrize("length", [24, 600])
def test_on_cuda_the_plan_packs_and_masks_as_the_run_would(mode, length):
    """The plan's tree on a CUDA device is the one ``pack_for`` packs for a training decoder there (block mask
    from one block, or from ``FLEX_MIN_NODES`` in auto mode; the dense mask's rows below), and it counts the
    dense mask's bytes only where the run takes the dense mask. (A stand-in decoder on CUDA; meta weights.)"""
    from types import SimpleNamespace

    from sdft.prefix import attention as tree_attention
    from sdft.prefix.packed import pack_for, pack_sides

    config = SDFTConfig(per_device_train_batch_size=2, num_generations=4, max_completion_length=length, device="cpu",
                        tree_attention=mode, mixed_precision="no")
    with torch.device("meta"):
        meta = _model()
    plan = scoring_plan(meta, PROMPTS, config, torch.device("cuda"))

    class OnCuda:
        _supports_flex_attn, training, config = True, True, meta.config

        def parameters(self):
            return iter([SimpleNamespace(device=torch.device("cuda"))])

    completions = torch.arange(len(PROMPTS) * 4 * length).reshape(-1, length) + 1
    mask = torch.ones_like(completions, dtype=torch.bool)
    packed, _ = pack_for(OnCuda(), mode, lambda pairs: pack_sides([[torch.tensor(p) for p in PROMPTS]], completions,
                                                                  mask, 0, pairs))
    assert (plan.rows, plan.width) == (packed.ids.shape[0], packed.width)
    flex = tree_attention.use_flex(mode, packed.width, OnCuda())
    assert (plan.mask == 0) == flex
    assert flex == (mode == "flex" or (mode == "auto" and length == 600))  # auto: 258 packed tokens stay dense
