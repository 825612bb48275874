"""The optimizer as the HF Trainer (and so TRL) builds it: any ``optim`` name through transformers' own factory, the
Adam keys, and weight decay not on biases and norms; a checkpoint written when every weight was decayed (one
parameter group) still resumes, each parameter keeping its AdamW moments."""
import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.runtime.optimizer import OptimizerSettings, make_optimizer, regroup

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4)]]
BASE = dict(max_steps=1, per_device_train_batch_size=1, num_generations=2, max_completion_length=4,
            progress_bar=False, device="cpu", save_final_model=False, save_steps=1)


def _adamw(learning_rate, weight_decay):
    return OptimizerSettings("adamw_torch_fused", learning_rate, weight_decay)


def _biased_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.ln_f = torch.nn.LayerNorm(32)  # a LayerNorm under a name without "norm" in it: kept out by its type
    return model


def test_decayed_parameters_are_the_hf_trainers():
    model = _biased_model()
    optimizer = make_optimizer(model, _adamw(1e-3, 0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == set(Trainer.get_decay_parameter_names(None, model))
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.1, 0.0}


def test_a_step_equals_adamw_over_the_hf_trainers_groups():
    model, theirs = _biased_model(), _biased_model()
    hf = set(Trainer.get_decay_parameter_names(None, theirs))
    named = list(theirs.named_parameters())
    reference = torch.optim.AdamW([{"params": [p for n, p in named if n in hf], "weight_decay": 0.1},
                                   {"params": [p for n, p in named if n not in hf], "weight_decay": 0.0}], lr=1e-2)
    ours = make_optimizer(model, _adamw(1e-2, 0.1))
    for m in (model, theirs):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
    ours.step()
    reference.step()
    for (name, a), b in zip(model.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_no_decay_keeps_one_group():
    assert len(make_optimizer(_biased_model(), _adamw(1e-3, 0.0)).param_groups) == 1


def test_a_one_group_checkpoint_resumes_with_each_parameters_moments(tmp_path):
    model = _biased_model()
    old = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2, weight_decay=0.1)  # before the groups
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    state = old.state_dict()
    new = make_optimizer(model, _adamw(1e-2, 0.1))
    new.load_state_dict(regroup(state, new))
    moments = {id(p): old.state[p]["exp_avg"] for p in model.parameters()}
    for group in new.param_groups:
        for p in group["params"]:
            torch.testing.assert_close(new.state[p]["exp_avg"], moments[id(p)], rtol=0, atol=0)


def test_a_run_with_weight_decay_resumes_from_its_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    config = SDFTConfig(**BASE, output_dir=str(tmp_path), weight_decay=0.1)
    first = train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok)
    resumed = train(tiny_llama(vocab=len(tok)), ROWS, SDFTConfig(**{**BASE, "max_steps": 2}, output_dir=str(tmp_path),
                                                                 weight_decay=0.1, resume_from_checkpoint=True),
                    tokenizer=tok)
    assert [r["step"] for r in first.metrics] == [1] and [r["step"] for r in resumed.metrics] == [2]


@pytest.mark.parametrize("optim, optim_args", [("sgd", "momentum=0.9,nesterov=true"), ("adafactor", ""),
                                               ("rmsprop", ""), ("adagrad", ""), ("adamw_torch", "")])
def test_every_optim_is_the_hf_trainers_own(tmp_path, optim, optim_args):
    """Class, keywords and groups as transformers builds them from real TrainingArguments of the same values."""
    from transformers import TrainingArguments

    model = _biased_model()
    settings = OptimizerSettings(optim, 1e-3, 0.1, (0.8, 0.95), 1e-6, optim_args)
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_args=optim_args or None,
                             learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95,
                             adam_epsilon=1e-6, use_cpu=True, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if "nesterov" in kwargs:  # transformers 5's sgd reads optim_args (4.x's reads none): the check takes both keys
        settings.check()
    ours = make_optimizer(model, settings)
    assert type(ours) is cls
    expected = {**cls([torch.nn.Parameter(torch.zeros(1))], **kwargs).defaults}
    for group in ours.param_groups:
        assert {k: v for k, v in group.items() if k not in ("params", "weight_decay", "fused")} == {
            k: v for k, v in expected.items() if k not in ("weight_decay", "fused")}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in ours.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == set(Trainer.get_decay_parameter_names(None, model))


def test_a_run_with_adafactor_resumes_from_its_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    change = dict(optim="adafactor", weight_decay=0.01)
    train(tiny_llama(vocab=len(tok)), ROWS, SDFTConfig(**BASE, output_dir=str(tmp_path), **change), tokenizer=tok)
    resumed = train(tiny_llama(vocab=len(tok)), ROWS, SDFTConfig(**{**BASE, "max_steps": 2}, output_dir=str(tmp_path),
                                                                 resume_from_checkpoint=True, **change), tokenizer=tok)
    assert [r["step"] for r in resumed.metrics] == [2]


@pytest.mark.parametrize("change, says", [
    (["optim=adamw_8bit"], ("optim='adamw_8bit': ", "`bitsandbytes`")),
    (["optim=galore_adamw"], "sdft's loop does not drive it"),
    (["optim=adamw_turbo"], "not an optimizer transformers knows"),
    (["optim=sgd", "parallel=fsdp"], "parallel=fsdp steps AdamW"),
    (["optim_args=momentum=0.9"], "sdft's AdamW takes adam_beta1, adam_beta2 and adam_epsilon"),
    (["optim=sgd", "optim_args=momentun=0.9"], "optim_args 'momentun': transformers' sgd does not read it"),
    (["optim=sgd", "optim_args=momentum"], "optim_args item 'momentum': each is KEY=VALUE"),
    # adafactor's factory sets scale_parameter itself and never reads optim_args: the user's value would be lost
    (["optim=adafactor", "optim_args=scale_parameter=true"], "optim_args 'scale_parameter': transformers' "
                                                             "adafactor does not read it (it sets scale_parameter="),
    # transformers 5's sgd reads optim_args (torch: "Invalid momentum value: -1"), 4.x's reads none
    (["optim=sgd", "optim_args=momentum=-1"], ("momentum",)),
    (["adam_beta2=1.5"], "adam_beta2"),
])
def test_an_optimizer_that_cannot_run_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, change, says):
    monkeypatch.setattr("sdft.run.prepare.load_model", _no_load)
    monkeypatch.setattr("sdft.models.load_model", _no_load)
    assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}", *change]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(part in err for part in ((says,) if isinstance(says, str) else says)), err


def _no_load(*args, **kwargs):
    raise AssertionError("the model loaded")


def test_a_resume_with_another_optimizer_is_one_line(tmp_path, capsys):
    tok = tiny_tokenizer()
    train(tiny_llama(vocab=len(tok)), ROWS, SDFTConfig(**BASE, output_dir=str(tmp_path)), tokenizer=tok)
    assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}", "resume_from_checkpoint=true",
                "optim=sgd"]) == 2
    assert "optim 'adamw_torch_fused' -> 'sgd'" in capsys.readouterr().err
