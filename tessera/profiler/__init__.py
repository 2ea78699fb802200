"""The cluster-wide profiler: spans on every process, one trace, a report that names
the bottleneck."""
