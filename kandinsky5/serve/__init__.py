"""``kandinsky5 serve``: an OpenAI-style video API over one loaded pipeline, with a persisted job queue.

- ``store.py``: the SQLite job store and the data folder's files, crash recovery;
- ``worker.py``: the one generation thread (progress, previews, cancellation through ``RunControl``);
- ``app.py``: the FastAPI app (routes, validation, token, limits, event stream);
- ``schemas.py``: the request and response bodies;
- ``kandinsky5/cli/serve.py``: the command (options, loading, uvicorn).

Needs the ``serve`` extra (``pip install 'kandinsky5[serve]'``): FastAPI, uvicorn and python-multipart.
"""
