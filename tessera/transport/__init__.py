"""Bytes between processes: typed headers, raw tensor frames, authenticated sockets."""
