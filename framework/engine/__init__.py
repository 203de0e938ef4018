"""The engine: request state, the step loop, the batched model runner and detokenization."""
