"""What the user trains on: examples and their columns (``examples``), chat rendering (``chat``), the
teacher's prompt templates (``templates``) and the bundled skill (``skill``, its files beside this one)."""
from sdft.data.examples import Example, load_examples

__all__ = ["Example", "load_examples"]
