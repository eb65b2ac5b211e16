"""Serving: the OpenAI-compatible server (``citrus-v deploy``), its protocol models and dynamic batching."""
