"""Adapters on disk and in host memory.

- names.py              strict adapter names (the only request-derived path components)
- safetensors_check.py  safetensors header checks before any tensor is read; pickle refusal
- manifest.py           manifest.json: what an adapter is, sha256 and size of each file
- upload.py             one streamed upload into a private temporary folder
- store.py              AdapterStore: atomic put/replace/delete, start-up recovery and verification
- registry.py           AdapterRegistry: host-RAM LRU by bytes, pinning, single-flight loads (AdapterProvider)

Nothing is imported here so that importing one module (e.g. the loader's safetensors checks) stays cheap.
"""
