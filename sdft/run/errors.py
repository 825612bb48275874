"""What stops a run mid-way, besides bad input: each carries the one line the CLI prints."""


class NonFiniteError(RuntimeError):
    """The loss or gradient norm of a step was NaN or infinite; the run stopped before updating."""


class OutOfMemory(RuntimeError):
    """The model or a step ran out of device memory; the message names the knobs that shrink it and what is kept."""
