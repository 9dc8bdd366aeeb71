"""Speed and memory benchmarks: `python -m benchmarks.run --suite cpu`."""
