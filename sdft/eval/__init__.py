"""What a run is judged by: greedy answers and perplexity (``answers``), scored evaluations during a run
(``evaluation``), answer scorers, the retention probe and the teacher check."""
