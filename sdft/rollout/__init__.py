"""On-policy rollouts: the engine protocol and the batched HF engine (``engine``), the contract check on
what an engine returns (``checks``) and the decode-step LM-head GEMM (``decode_gemm``)."""
