"""Editor and client integrations against a live server: code completion (FIM), rerank."""
