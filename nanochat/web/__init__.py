"""The chat web UI: a single self-contained page (no CDN) that scripts.chat_web serves at GET /."""
