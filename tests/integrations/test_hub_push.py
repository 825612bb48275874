"""A TRL script's push_to_hub runs on the drop-in as on the Trainer: the trained model and a model card go to the
repository, never the run folder; a refused login is one line before training. The Hub is a stand-in of
``huggingface_hub.HfApi`` that records what it is asked."""
import types

import huggingface_hub
import pytest
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

ROWS = [{"prompt": f"add {a} {b}", "privileged_context": str(a + b)} for a, b in [(1, 2), (3, 4)]]


class FakeHub:
    """Records repositories, branches and commits (each commit's files as {path in repo: bytes})."""

    def __init__(self, user="me", refuse=None):
        self.user, self.refuse, self.repos, self.branches, self.commits = user, refuse, [], [], []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
                if hub.refuse is not None:
                    raise hub.refuse
                full = repo_id if "/" in repo_id else f"{hub.user}/{repo_id}"
                hub.repos.append((full, private, token))
                return types.SimpleNamespace(repo_id=full)

            def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
                hub.branches.append((repo_id, branch))

            def create_commit(self, repo_id, operations, commit_message, revision=None, **kwargs):
                files = {}
                for op in operations:
                    source = op.path_or_fileobj
                    files[op.path_in_repo] = source if isinstance(source, bytes) else open(source, "rb").read()
                hub.commits.append(types.SimpleNamespace(repo=repo_id, message=commit_message, revision=revision,
                                                         files=files))
                return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

        return Api()


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None, **kw: hub.api(token))
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    return hub


def _trainer(tmp_path, **change):
    from trl.experimental.sdft import SDFTConfig as TRLConfig

    from sdft.integrations.trl import SDFTTrainer

    values = dict(output_dir=str(tmp_path / "my-sdft-run"), max_steps=1, per_device_train_batch_size=2,
                  num_generations=2, max_completion_length=4, use_cpu=True, report_to=[], disable_tqdm=True,
                  save_strategy="no")
    tok = tiny_tokenizer()
    return SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=TRLConfig(**{**values, **change}), train_dataset=ROWS,
                       processing_class=tok)


def test_push_to_hub_uploads_the_model_folder_and_a_card_not_the_run(tmp_path, fake_hub):
    trainer = _trainer(tmp_path)
    trainer.train()
    assert fake_hub.commits == []  # push_to_hub=False: nothing went up during training
    commit = trainer.push_to_hub(dataset_name="trl-lib/tool-calls", tags=["mine"])
    assert commit.commit_url.startswith("https://huggingface.co/me/my-sdft-run")
    (pushed,) = fake_hub.commits
    assert pushed.repo == "me/my-sdft-run" and pushed.message == "End of training"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(pushed.files)
    assert not any(name.startswith(("checkpoint-", "metrics")) for name in pushed.files)
    card = pushed.files["README.md"].decode()
    assert '- "trl-lib/tool-calls"' in card and '- "mine"' in card and "library_name: transformers" in card


def test_push_to_hub_true_creates_the_repo_before_training_and_pushes_at_its_end(tmp_path, fake_hub):
    trainer = _trainer(tmp_path, push_to_hub=True, hub_model_id="org/skill", hub_private_repo=True,
                       hub_token="hf_x", hub_revision="sdft")
    assert fake_hub.repos == [("org/skill", True, "hf_x")] and fake_hub.branches == [("org/skill", "sdft")]
    trainer.train()
    assert [(c.message, c.revision) for c in fake_hub.commits] == [("Training in progress, step 1", "sdft")]
    trainer.save_model(trainer.args.output_dir)  # TRL's scripts' last line: the Trainer pushes there too
    assert fake_hub.commits[-1].message == "Model save"
    assert len(fake_hub.repos) == 1  # created once


def test_hub_strategy_end_pushes_on_save_model_only(tmp_path, fake_hub):
    trainer = _trainer(tmp_path, push_to_hub=True, hub_strategy="end")
    trainer.train()
    assert fake_hub.commits == []
    trainer.save_model()
    assert [c.message for c in fake_hub.commits] == ["Model save"]


def test_a_refused_login_is_one_line_before_training(tmp_path, fake_hub):
    error = huggingface_hub.errors.HfHubHTTPError.__new__(huggingface_hub.errors.HfHubHTTPError)
    Exception.__init__(error, "401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n...")
    error.response = types.SimpleNamespace(status_code=401)
    fake_hub.refuse = error
    with pytest.raises(OSError) as caught:
        _trainer(tmp_path, push_to_hub=True)
    message = str(caught.value)
    assert "\n" not in message and "could not push to the Hugging Face Hub repository my-sdft-run" in message
    assert "hf auth login" in message


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_pushing_checkpoint_folders_is_refused(tmp_path, fake_hub, strategy):
    with pytest.raises(ValueError, match=f"hub_strategy='{strategy}'"):
        _trainer(tmp_path, push_to_hub=True, hub_strategy=strategy)


def test_a_lora_push_names_its_hub_base(tmp_path, fake_hub):
    from sdft.integrations.hub_push import model_card

    card = model_card("skill", "Qwen/Qwen2.5-0.5B-Instruct", True,
                      types.SimpleNamespace(max_steps=3, num_generations=4, divergence="reverse_kl",
                                            learning_rate=1e-5), {})
    assert 'base_model: "Qwen/Qwen2.5-0.5B-Instruct"' in card and "library_name: peft" in card


def test_no_network_is_one_line_naming_the_repository(tmp_path, monkeypatch):
    """The real client, with no network here (or a stand-in of its error where there is one)."""
    from sdft.models import hub

    class ConnectError(Exception):
        pass

    ConnectError.__module__ = "httpx"

    def unreachable(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    with pytest.raises(OSError, match=r"^could not push to the Hugging Face Hub repository me/x: the Hub cannot be "
                                      r"reached \(\[Errno -2\] Name or service not known\)$"):
        hub.create_repo("me/x", token="hf_fake")
