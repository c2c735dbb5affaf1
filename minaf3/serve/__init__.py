"""`minaf3 serve`: an OpenAI-compatible HTTP API for one model, with a page to try it (the serve extra).

    server.py         the `serve` command: options, uvicorn, SIGTERM drains the requests in flight
    app.py            the routes (FastAPI): /v1/chat/completions, /v1/audio/transcriptions, /v1/models,
                      /health, / (page.html)
    openai_format.py  OpenAI's request fields checked one by one
    audio_sources.py  audio parts to waveforms: base64, data: URLs, http(s) when allowed, bounded
    service.py        a request as batcher jobs built as Pipeline.chat/transcribe build them; the answers
    batcher.py        dynamic batching: requests that arrive together share one generate call
    rows.py           one generate call, many requests: each row's tokens to its own text and client
    responses.py      what the server sends back in OpenAI's shapes: answers, and every failure as an error
    page.html         plain HTML and JavaScript, no build step

Nothing here is imported by `import minaf3`; the web stack (fastapi, uvicorn, python-multipart) is only
needed by this package: pip install 'minaf3[serve]'.
"""
