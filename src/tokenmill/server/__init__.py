"""The HTTP layer: FastAPI routes, OpenAI's request and response shapes, errors."""
