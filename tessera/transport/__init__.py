"""Bytes between processes (tcp) or threads of one process (inproc): typed headers, raw
tensor frames, authenticated sockets."""
