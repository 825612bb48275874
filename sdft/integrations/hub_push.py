"""The TRL drop-in's pushes to the Hugging Face Hub, as the HF Trainer's: ``push_to_hub`` and the ``hub_*`` fields.

What goes up is the trained model folder (``OUTPUT_DIR/final_model``: the model, or the LoRA adapter, with its
tokenizer) and a model card, never the run folder itself: sdft keeps its own config.json, checkpoints and metrics
there, and a repository holding them would not load as a model.

* ``push_to_hub=True`` creates the repository when the trainer is built (a missing login fails before training,
  as the Trainer's ``init_hf_repo``), pushes at the end of ``train()`` (``hub_strategy="every_save"``, the default:
  the Trainer pushes at each save, whose last is the end; sdft pushes that last one) and on ``save_model``;
  ``hub_strategy="end"`` only on ``save_model`` and ``push_to_hub()``. ``checkpoint`` / ``all_checkpoints``
  (checkpoint folders on the Hub to resume from) are refused.
* ``hub_model_id`` (default: output_dir's folder name, under the token's user), ``hub_private_repo``,
  ``hub_token``, ``hub_revision`` (a branch, made when missing) as the Trainer reads them.
"""
from __future__ import annotations

import json
from pathlib import Path

from sdft.integrations.trl_fields import arg, plain
from sdft.models import hub
from sdft.models.loading import SOURCE_UNKNOWN, model_source

CARD_KEYS = ("model_name", "dataset_name", "tags", "language", "license", "finetuned_from")


class HubPush:
    """The ``hub_*`` settings of one trainer, and its repository once created (process 0 only)."""

    def __init__(self, args, output_dir: str):
        self.wanted = bool(arg(args, "push_to_hub", False))
        self.strategy = plain(arg(args, "hub_strategy", "every_save"))
        self.name = arg(args, "hub_model_id", None) or Path(output_dir).absolute().name
        self.private = arg(args, "hub_private_repo", None)
        self.token = arg(args, "hub_token", None)
        self.revision = arg(args, "hub_revision", None)
        self.repo: str | None = None

    @property
    def at_train_end(self) -> bool:
        return self.wanted and self.strategy == "every_save"

    def create(self, token=None, private=None) -> str:
        """The repository's full id, created on the first call."""
        if self.repo is None:
            self.repo = hub.create_repo(self.name, token=token or self.token, revision=self.revision,
                                        private=self.private if private is None else private)
        return self.repo

    def push(self, folder: Path, model, config, commit_message: str, token=None, revision=None, private=None,
             card: dict | None = None):
        """Upload ``folder`` (the trained ``model``'s, trained with sdft ``config``) with a model card (``card``:
        what ``check_card`` returned)."""
        card = card or {}
        repo = self.create(token, private)
        text = model_card(card.get("model_name") or repo.split("/")[-1], card.get("finetuned_from") or hub_base(model),
                          is_lora=hasattr(model, "peft_config"), config=config, card=card)
        return hub.push_folder(folder, repo, commit_message=commit_message, card=text, token=token or self.token,
                               revision=revision or self.revision)


def check_card(card: dict | None) -> dict:
    """``push_to_hub``'s model card keywords, as the Trainer's ``create_model_card`` takes them."""
    unknown = sorted(set(card or {}) - set(CARD_KEYS))
    if unknown:
        raise TypeError(f"push_to_hub() got an unexpected keyword argument {unknown[0]!r} (model card keys: "
                        f"{', '.join(CARD_KEYS)})")
    return dict(card or {})


def hub_base(model) -> str | None:
    """The Hub id ``model`` (or a LoRA model's base) was loaded from, else None (a local folder means nothing on
    the Hub)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    source = model_source(base)
    if source in (None, SOURCE_UNKNOWN):
        return None
    fetched = hub.origin(source)
    return fetched.repo_id if fetched is not None else None


def model_card(name: str, base: str | None, is_lora: bool, config, card: dict) -> str:
    """README.md of a pushed model: the Hub's metadata header and what the run did."""
    def listed(value) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    header = [f"base_model: {json.dumps(base)}"] if base else []
    header.append(f"library_name: {'peft' if is_lora else 'transformers'}")
    for key in ("language", "license"):
        if card.get(key):
            header.append(f"{key}: {json.dumps(card[key])}")
    if card.get("dataset_name"):
        header += ["datasets:"] + [f"- {json.dumps(d)}" for d in listed(card["dataset_name"])]
    header += ["tags:"] + [f"- {json.dumps(t)}" for t in ["sdft", "self-distillation", *listed(card.get("tags"))]]
    origin = f"[{base}](https://huggingface.co/{base})" if base else "a local model"
    what = "LoRA adapters" if is_lora else "all weights"
    body = (f"# {name}\n\nFine-tuned from {origin} ({what}) with Self-Distillation Fine-Tuning (SDFT; Shenfeld et "
            f"al., arXiv 2601.19897) by sdft: {config.max_steps} optimizer steps, {config.num_generations} "
            f"rollouts per prompt scored by the model conditioned on the demonstration, {config.divergence} "
            f"divergence, learning rate {config.learning_rate:g}.\n")
    return "---\n" + "\n".join(header) + "\n---\n\n" + body
