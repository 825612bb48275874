"""A model named by its Hugging Face Hub id trains, as transformers and TRL take it: fetched into the Hub's cache
(config and tokenizer before any row is checked, the weights with the load, one commit), or read from that cache
offline; a model that cannot be had is one line naming it, before anything loads.

No network here: the Hub is a folder, served by a stand-in of ``huggingface_hub.snapshot_download`` that writes
the cache's layout (``models--OWNER--NAME/snapshots/COMMIT``) as the real one does.
"""
import fnmatch
import json
import shutil
import types
import warnings

import huggingface_hub
import pytest
from huggingface_hub import constants
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.models import hub, load_trained
from sdft.run.checkpoint import checkpoint_state, list_checkpoints

REPO, COMMIT = "sdft-test/tiny-chat", "0123456789abcdef0123456789abcdef01234567"
ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4)]]
BASE = dict(max_steps=1, per_device_train_batch_size=1, num_generations=2, max_completion_length=4,
            progress_bar=False, device="cpu", save_final_model=False)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """(the Hub: {repo id: a model folder}, the calls it answered); the cache under tmp_path, offline."""
    remote = tmp_path / "remote"
    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(remote)
    tok.save_pretrained(remote)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub._fetched.clear()
    served, calls = {REPO: remote}, []
    state = types.SimpleNamespace(served=served, calls=calls, cache=cache, main=COMMIT)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, tuple(allow_patterns or ())))
        if repo_id not in served:
            raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot\n...")
        snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / (revision or state.main)
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in served[repo_id].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns or ["*"]):
                shutil.copy(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    yield state
    hub._fetched.clear()


@pytest.mark.parametrize("name, is_id", [
    ("Qwen/Qwen2.5-0.5B-Instruct", True), ("gpt2", True), ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("./model", False), ("/abs/model", False), ("a/b/c", False), ("model.gguf", False), ("a..b/c", False),
    ("~/model", False), ("owner/name-", False),
])
def test_what_reads_as_a_hub_id(name, is_id):
    assert hub.is_repo_id(name) is is_id


def test_a_local_folder_of_an_ids_name_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen" / "Qwen2.5").mkdir(parents=True)
    assert not hub.is_repo_id("Qwen/Qwen2.5")


def test_a_hub_model_trains_and_its_checkpoint_records_the_snapshot(tmp_path, hub_cache):
    result = train(REPO, ROWS, SDFTConfig(**BASE, output_dir=str(tmp_path / "run"), save_steps=1))
    assert result.model is not None
    small, weights = hub_cache.calls
    assert small[:2] == (REPO, None) and not any(p.endswith(".safetensors") for p in small[2])
    assert weights == (REPO, COMMIT, ("model.safetensors",))  # the commit the small files came from
    snapshot = hub_cache.cache / "models--sdft-test--tiny-chat" / "snapshots" / COMMIT
    assert checkpoint_state(list_checkpoints(tmp_path / "run")[-1])["model"] == str(snapshot)


def test_rows_are_checked_before_the_weights_download(tmp_path, hub_cache, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "x" * 600, "demonstration": "y"}) + "\n")
    assert cli(["train", "--model", REPO, "--data", str(data), "--no-eval",
                "--set", f"output_dir={tmp_path / 'run'}", "max_prompt_length=100"]) == 2
    assert "rows.jsonl:1" in capsys.readouterr().err
    assert all(not any(p.endswith(".safetensors") for p in patterns) for _, _, patterns in hub_cache.calls)


def test_weights_in_the_cache_are_not_fetched_again(tmp_path, hub_cache):
    train(REPO, ROWS, SDFTConfig(**BASE, output_dir=str(tmp_path / "a")))
    hub._fetched.clear()  # a new process
    hub_cache.calls.clear()
    train(REPO, ROWS, SDFTConfig(**BASE, output_dir=str(tmp_path / "b")))
    assert [c[2] for c in hub_cache.calls] == [hub.SMALL_FILES]


def test_a_lora_export_names_its_base_by_hub_id_and_loads_back_from_it(tmp_path, hub_cache):
    train(REPO, ROWS, SDFTConfig(**{**BASE, "save_final_model": True}, output_dir=str(tmp_path / "run"),
                                 use_lora=True, lora_r=2))
    adapter = tmp_path / "run" / "final_model"
    named = json.loads((adapter / "adapter_config.json").read_text())
    assert (named["base_model_name_or_path"], named["revision"]) == (REPO, COMMIT)
    hub._fetched.clear()
    hub_cache.main = "f" * 40  # main moved on: the adapter still loads onto the commit it was trained on
    hub_cache.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # peft's about transformers' old names: not the user's
        model, tokenizer = load_trained(adapter)
    assert type(model).__name__ == "PeftModelForCausalLM" and tokenizer.eos_token == "<|im_end|>"
    assert {c[:2] for c in hub_cache.calls} == {(REPO, COMMIT)}


def test_generate_answers_with_a_hub_model(tmp_path, hub_cache, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "add 1 2"}) + "\n")
    assert cli(["generate", REPO, "--prompts", str(prompts), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("command", ["train", "generate"])
def test_a_model_neither_here_nor_in_the_cache_offline_is_one_line(tmp_path, hub_cache, capsys, monkeypatch, command):
    monkeypatch.setattr("sdft.models.loading._from_pretrained", _no_load)
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": "hi", "demonstration": "x"}) + "\n")
    argv = (["train", "--model", "nobody/nothing", "--data", str(rows), "--no-eval", "--set", f"output_dir={tmp_path}"]
            if command == "train" else ["generate", "nobody/nothing", "--prompts", str(rows)])
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "nobody/nothing is not a local path" in err and "HF_HUB_OFFLINE is set" in err


def _no_load(*args, **kwargs):
    raise AssertionError("weights loaded")


def _http_error(kind):
    """The Hub's error without an HTTP response (its constructor wants one): only its class is read."""
    error = kind.__new__(kind)
    Exception.__init__(error, "401 Client Error.\n\nRepository Not Found for url: ...")
    return error


@pytest.mark.parametrize("kind, says", [("RepositoryNotFoundError", "nor a model on the Hugging Face Hub"),
                                        ("GatedRepoError", "accept its terms on https://huggingface.co/owner/gated")])
def test_the_hubs_refusals_are_one_line_naming_the_model(hub_cache, monkeypatch, kind, says):
    error = _http_error(getattr(huggingface_hub.errors, kind))

    def refuse(**kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(FileNotFoundError) as caught:
        hub.fetch("owner/gated")
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_model_object_from_the_hub_gets_its_tokenizer_from_there(tmp_path, hub_cache):
    from sdft.integrations.trl import _own_tokenizer

    model = tiny_llama(vocab=len(tiny_tokenizer()))
    model.config._name_or_path = REPO  # as AutoModelForCausalLM.from_pretrained(REPO) leaves it
    assert _own_tokenizer(model).eos_token == "<|im_end|>"


def test_a_checkpoint_from_another_machines_cache_exports_from_the_same_commit_here(tmp_path, hub_cache,
                                                                                   monkeypatch, capsys):
    train(REPO, ROWS, SDFTConfig(**BASE, output_dir=str(tmp_path / "run"), save_steps=1, use_lora=True, lora_r=2))
    shutil.rmtree(hub_cache.cache)  # the checkpoint goes where the snapshot it records is not
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "other-cache"))
    hub._fetched.clear()
    hub_cache.calls.clear()
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    assert cli(["export", str(checkpoint), str(tmp_path / "out")]) == 0
    assert (REPO, COMMIT) in {c[:2] for c in hub_cache.calls}
    hub._fetched.clear()
    hub_cache.main = "f" * 40  # its base named by Hub id, after main moved on: still the commit it trained from
    assert cli(["export", str(checkpoint), str(tmp_path / "out2"), "--model", REPO]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO


def test_the_trl_dropin_trains_a_hub_id_at_model_init_kwargs_revision(tmp_path, hub_cache, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.sdft import SDFTConfig as TRLConfig

    from sdft.integrations.trl import SDFTTrainer

    args = TRLConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                     max_completion_length=4, use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
                     model_init_kwargs={"revision": "v1.0"})
    rows = [{"prompt": r["prompt"], "privileged_context": r["demonstration"]} for r in ROWS]
    SDFTTrainer(model=REPO, args=args, train_dataset=rows).train()
    assert {c[:2] for c in hub_cache.calls} == {(REPO, "v1.0")}


def test_the_cli_trains_a_hub_model_at_a_revision_and_refuses_one_without_a_hub_id(tmp_path, hub_cache, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = ["--data", str(rows), "--no-eval", "--set", "max_steps=1", "num_generations=2",
              "per_device_train_batch_size=1", "max_completion_length=2"]
    assert cli(["train", "--model", REPO, "--revision", "v2", *common, f"output_dir={tmp_path / 'a'}"]) == 0
    assert {c[:2] for c in hub_cache.calls} == {(REPO, "v2")}
    assert cli(["train", "--revision", "v2", *common, f"output_dir={tmp_path / 'b'}"]) == 2
    assert "a revision goes with a Hugging Face Hub id as the model" in capsys.readouterr().err


def test_a_resume_continues_on_the_commit_its_checkpoint_was_trained_from(tmp_path, hub_cache, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["train", "--model", REPO, "--data", str(rows), "--no-eval", "--set", f"output_dir={tmp_path / 'run'}",
            "num_generations=2", "per_device_train_batch_size=1", "max_completion_length=2", "save_steps=1"]
    assert cli([*argv, "max_steps=1"]) == 0
    hub._fetched.clear()  # a later day: the repository's main has moved on
    hub_cache.main = "f" * 40
    assert cli([*argv, "max_steps=2", "resume_from_checkpoint=true"]) == 0, capsys.readouterr().err
    snapshot = hub_cache.cache / "models--sdft-test--tiny-chat" / "snapshots" / COMMIT
    assert checkpoint_state(list_checkpoints(tmp_path / "run")[-1])["model"] == str(snapshot)


def test_weights_missing_from_the_cache_offline_are_one_line(tmp_path, hub_cache, capsys):
    """Offline, a snapshot holding the config and tokenizer but not the weights: the Hub's stand-in serves nothing
    more (as snapshot_download returns a cached folder as it is), and the load says which file is missing."""
    hub.fetch(REPO)
    hub_cache.served[REPO] = tmp_path / "empty"
    (tmp_path / "empty").mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert cli(["train", "--model", REPO, "--data", str(rows), "--no-eval", "--set", f"output_dir={tmp_path / 'r'}",
                "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("sdft: error: model sdft-test/tiny-chat: its weights (model.safetensors) "
                                           "are not in the Hugging Face Hub's cache")


def test_a_hub_models_position_table_is_checked_before_its_weights_load(hub_cache, tmp_path, monkeypatch):
    """GPT-2's learned positions end at n_positions: a row with a rollout past them is one line, read from the
    snapshot's config.json (fetched with the tokenizer), before the weights are fetched."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=12, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        folder)
    tok.save_pretrained(folder)
    hub_cache.served["sdft-test/tiny-gpt2"] = folder
    monkeypatch.setattr("sdft.models.hub.fetch_weights", lambda *a, **k: pytest.fail("the weights were fetched"))
    config = SDFTConfig(**{**BASE, "max_completion_length": 8}, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"take \d+ positions, past the model's 12 \(n_positions"):
        train("sdft-test/tiny-gpt2", ROWS, config)


def test_a_dry_run_sizes_a_hub_model_from_its_config_without_its_weights(hub_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdft.models.hub.fetch_weights", lambda *a, **k: pytest.fail("the weights were fetched"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert cli(["train", "--dry-run", "--model", REPO, "--data", str(tmp_path / "d.jsonl"), "--no-eval", "--set",
                f"output_dir={tmp_path / 'run'}", "dtype=bfloat16"]) == 0
    count = sum(p.numel() for p in tiny_llama(vocab=len(tiny_tokenizer())).parameters())
    model_line = capsys.readouterr().out.splitlines()[1]
    assert model_line.startswith(f"model: {REPO} (llama, {count / 1e6:.1f}M parameters: its weights take "
                                 f"{count * 2 / 2**30:.2f} GiB in bfloat16")
