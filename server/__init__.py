"""``treadle serve``: an HTTP server (OpenAI's API and SGLang's native routes) over one Engine."""
