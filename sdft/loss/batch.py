"""The SDFT loss of one micro-batch: student vs teacher on every rollout token, one fused call."""
from __future__ import annotations

from dataclasses import dataclass

from sdft.loss.spec import LossSpec
from sdft.models import decoder_of
from sdft.models.head import head_of
from sdft.prefix.packed import context_hidden, joint_pass_pays, joint_tree_hidden, supports_tree


@dataclass(frozen=True)
class BatchLoss:
    """A micro-batch's summed SDFT loss: what it computes (``spec``) and how its hidden states are
    scored (``share_prefix``: prefix trees; ``share_teacher_prefix``: one tree for a live teacher and
    the student when it pays; ``tree_attention``: ``sdft.prefix.attention``'s mode). Built once a run."""

    spec: LossSpec
    share_prefix: bool = True
    share_teacher_prefix: bool = False
    tree_attention: str = "auto"

    @classmethod
    def from_config(cls, config) -> BatchLoss:
        return cls(LossSpec.from_config(config), config.share_prefix, config.share_teacher_prefix,
                   config.tree_attention)

    def normaliser(self, batch) -> int:
        """What ``batch`` (a ``RolloutBatch``) adds to the step's divisor (``LossSpec.normaliser``)."""
        return self.spec.normaliser(batch.mask)

    def __call__(self, student, teacher, batch, teacher_contexts, pad_id: int, passes: list | None = None):
        """Summed loss of the student against the teacher on ``batch`` (a ``RolloutBatch``).

        The step's loss is the sum over micro-batches divided by the summed ``normaliser``s. The
        teacher (contexts with the demonstration) gets no gradient; both sides run the micro-batch's
        prefix tree, one tree for both when the teacher is the live student and sharing their common
        prefixes pays (``joint_pass_pays``). ``passes`` (a list) receives the token passes of each
        scoring pass (tree nodes, or padded-out tokens of the fallback passes).
        """
        decoder = decoder_of(student)
        args = (batch.prompts, teacher_contexts, batch.completions, batch.mask, pad_id)
        if (self.share_prefix and self.share_teacher_prefix and supports_tree(decoder)
                and teacher.is_student(decoder.config)
                and joint_pass_pays(decoder, *args, self.tree_attention)):
            s_hidden, t_hidden = joint_tree_hidden(decoder, *args, passes, self.tree_attention)
            t_head = None
        else:
            t_hidden, t_head = teacher.score(teacher_contexts, batch.completions, batch.mask, pad_id,
                                             self.share_prefix, passes, self.tree_attention)
            s_hidden = context_hidden(decoder, batch.prompts, batch.completions, batch.mask, pad_id, passes,
                                      self.share_prefix, self.tree_attention)
        return self.spec.summed(s_hidden, t_hidden, head_of(student), t_head, batch.mask, batch.completions,
                                batch.logprobs)
