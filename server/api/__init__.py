"""The HTTP layer: FastAPI routes, request/response schemas, auth, error mapping, connection
guards. Never imports torch: it talks to the engine through `generate()` and the stores."""
