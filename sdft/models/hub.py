"""Models named by a Hugging Face Hub id (``Qwen/Qwen2.5-0.5B-Instruct``), as transformers and TRL take them, and
a trained model pushed to the Hub (``push_folder``, the TRL drop-in's ``push_to_hub``).

A name that is not a local path and reads as a repository id is fetched into the Hub's own cache
(``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` and a lost network use what is cached there). Its small files
(config and tokenizer) come first, so every row and setting is checked before the weights download; the
weights come with the load, at the same commit. The commit is fixed once per
process, so a run's checks, its weights and what its checkpoints record are one version of the model.
Everything downstream sees a local folder: the snapshot.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

# A repository's config and tokenizer, whatever its tokenizer's files are called (tokenizer.json, vocab.txt, merges.txt,
# tokenizer.model(.v3), spiece.model, *.tiktoken, tekken.json, chat_template.jinja, ...): what sdft checks before the
# weights load. The weights (safetensors, bin) are not here.
SMALL_FILES = ("*.json", "*.txt", "*.model", "*.model.v*", "*.tiktoken", "*.jinja")

_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    commit: str
    folder: Path  # the snapshot at ``commit``: config and tokenizer, and the weights once loaded


_fetched: dict[tuple[str, str | None], HubModel] = {}


def is_repo_id(name) -> bool:
    """Whether ``name`` is a Hub id rather than a local path: a string with no local file or folder of its name,
    of the form ``owner/name`` (or a bare legacy name such as ``gpt2``), not a .gguf file."""
    if not isinstance(name, str) or Path(name).expanduser().exists() or name.endswith(".gguf"):
        return False
    return bool(_ID.fullmatch(name)) and ".." not in name and not name.endswith((".", "-"))


def fetch(repo_id: str, revision: str | None = None) -> HubModel:
    """The snapshot of ``repo_id``'s config and tokenizer at ``revision`` (None: its main branch, fixed at one
    commit per process), downloaded or from the cache; any failure is one line naming the model."""
    if (repo_id, revision) in _fetched:
        return _fetched[repo_id, revision]
    from huggingface_hub import snapshot_download

    with _one_line(repo_id):
        folder = Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=list(SMALL_FILES)))
    model = HubModel(repo_id, folder.name, folder)
    _fetched[repo_id, revision] = model
    return model


def at_revision(model, revision: str | None):
    """``model`` at ``revision``: a Hub id's snapshot at that branch, tag or commit (the local folder sdft then
    loads); anything else, or no revision, is ``model`` itself (as transformers ignores a revision there)."""
    if revision is None or not is_repo_id(model):
        return model
    return str(fetch(model, revision).folder)


def recorded_snapshot(model, recorded) -> str | None:
    """``recorded`` (a checkpoint's base) when it is a snapshot of the Hub id ``model``: a checkpoint loads onto
    the commit it was trained from, not its branch's newest; else None."""
    if not is_repo_id(model) or not isinstance(recorded, str):
        return None
    snapshot = origin(recorded)
    return recorded if snapshot is not None and snapshot.repo_id == model else None


def local(path: Path) -> Path:
    """``path``, or, for a Hub snapshot that is not on this machine (recorded by a checkpoint written on another),
    the same commit's snapshot here, fetched."""
    recorded = origin(path) if not path.exists() else None
    return path if recorded is None else fetch(recorded.repo_id, recorded.commit).folder


def folder_of(model) -> Path:
    """The local folder a model name stands for: a Hub id's snapshot (config and tokenizer, fetched), else the
    path (``local``: a recorded snapshot not on this machine, fetched)."""
    return fetch(model).folder if is_repo_id(model) else local(Path(model).expanduser())


def origin(folder) -> HubModel | None:
    """The Hub model whose snapshot ``folder`` is (the cache's ``models--OWNER--NAME/snapshots/COMMIT``), or None
    for any other folder: checkpoints record the snapshot, and an export names its repository."""
    folder = Path(folder)
    repo = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo.startswith("models--") or len(repo) <= len("models--"):
        return None
    return HubModel(repo[len("models--"):].replace("--", "/"), folder.name, folder)


def fetch_weights(model: HubModel) -> None:
    """Download ``model``'s weights into its snapshot, at its commit: the safetensors files its index names (or
    its one ``model.safetensors``), else its ``pytorch_model*.bin``; nothing when they are there already."""
    index = model.folder / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    if all((model.folder / name).is_file() for name in names):
        return
    from huggingface_hub import snapshot_download

    with _one_line(model.repo_id):
        snapshot_download(repo_id=model.repo_id, revision=model.commit, allow_patterns=names)
        if not all((model.folder / name).is_file() for name in names):  # a repository of pickled weights
            snapshot_download(repo_id=model.repo_id, revision=model.commit,
                              allow_patterns=["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    if not all((model.folder / name).is_file() for name in names) and not any(model.folder.glob("pytorch_model*.bin")):
        missing = next(name for name in names if not (model.folder / name).is_file())
        raise FileNotFoundError(f"model {model.repo_id}: its weights ({missing}) are not in the Hugging Face Hub's "
                                f"cache ({model.folder}) and could not be fetched (offline?)")


@contextlib.contextmanager
def _one_line(repo_id: str, pushing: bool = False):
    """The Hub's errors (several lines each, naming no model) as one line that names ``repo_id``: FileNotFoundError
    fetching, OSError pushing."""
    try:
        yield
    except Exception as err:  # noqa: BLE001  # each kind is explained below; anything else goes on as it is
        line = _explain_push(repo_id, err) if pushing else _explain(repo_id, err)
        if line is None:
            raise
        raise (OSError if pushing else FileNotFoundError)(line) from None


def _network(err: BaseException) -> bool:
    """Whether ``err`` is the HTTP client's own (no connection, a timeout): httpx's, or requests' in older hubs."""
    return type(err).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")


def _first_line(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _explain(repo_id: str, err: BaseException) -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"model {repo_id} is not a local path"
    if isinstance(err, GatedRepoError):
        return (f"{where}, and the Hugging Face Hub holds it behind a gate: accept its terms on "
                f"https://huggingface.co/{repo_id} and log in (hf auth login, or HF_TOKEN)")
    if isinstance(err, RepositoryNotFoundError):
        return (f"{where}, nor a model on the Hugging Face Hub (or a private one: log in with hf auth login, or "
                "set HF_TOKEN)")
    if isinstance(err, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the network is not reachable"
        return (f"{where}, and the Hugging Face Hub cannot be reached to fetch it ({why}) nor is it in the Hub's "
                f"cache ({constants.HF_HUB_CACHE}): fetch it where there is a network, or give a local folder")
    if isinstance(err, (HfHubHTTPError, OSError)) or _network(err):
        return f"{where}, and fetching it from the Hugging Face Hub failed: {_first_line(err)}"
    return None


def _explain_push(repo_id: str, err: BaseException) -> str | None:
    from huggingface_hub.errors import HfHubHTTPError

    if _network(err):
        why = f"the Hub cannot be reached ({_first_line(err)})"
        return f"could not push to the Hugging Face Hub repository {repo_id}: {why}"
    if not isinstance(err, (HfHubHTTPError, OSError)):
        return None
    status = getattr(getattr(err, "response", None), "status_code", None)
    login = (": log in with a token that may write there (hf auth login, HF_TOKEN, or hub_token)"
             if status in (401, 403) else "")
    return f"could not push to the Hugging Face Hub repository {repo_id}: {_first_line(err)}{login}"


def create_repo(repo_id: str, *, token=None, private=None, revision: str | None = None) -> str:
    """The Hub repository ``repo_id`` (created when missing, ``private`` then; ``revision``: a branch, made from main
    when missing), as its full id (``owner/name``: a bare name goes under the token's user). A refusal is one line."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with _one_line(repo_id, pushing=True):
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None:
            api.create_branch(repo, branch=revision, exist_ok=True)
    return repo


def push_folder(folder: Path, repo: str, *, commit_message: str, card: str, token=None, revision: str | None = None):
    """Upload the model folder ``folder`` to the Hub repository ``repo`` (``create_repo``'s) in one commit, with
    ``card`` as its README.md unless the folder holds one. Returns the commit (its ``commit_url``); a refusal is one
    line. Files the repository holds and the folder does not are left there, as ``Trainer.push_to_hub`` leaves them."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in sorted(folder.rglob("*")) if p.is_file()]
    if not (folder / "README.md").is_file():
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    with _one_line(repo, pushing=True):
        return HfApi(token=token).create_commit(repo, operations=operations, commit_message=commit_message,
                                                revision=revision)
