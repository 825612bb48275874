"""The prefix tree: shared prompt prefixes packed once (``tree``), the packed forward passes that score
them (``packed``) and the tree's attention, dense mask or FlexAttention block mask (``attention``)."""
