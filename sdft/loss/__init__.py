"""The SDFT loss of one batch: the teacher's scoring (``teacher``) and the student's fused divergence
against it (``batch``)."""
