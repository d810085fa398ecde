"""The HTTP server (optional extra `phivision[server]`): OpenAI chat completions, chat page, metrics."""
