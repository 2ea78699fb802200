"""The training loop of built-in jobs (``tessera run``), above the public API."""
