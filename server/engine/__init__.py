"""The inference engine: request state, scheduler (pure Python), paged KV pool and attention,
model runner, sampler, `EngineCore` (add / abort / step) and its async front door (engine thread,
tokenization, incremental detokenization). Never imports fastapi, redis or prometheus_client."""
