"""The prepared GPU check (``defocus-vlm bench gpu``; benchmarks/gpu/README.md says how a session
with a device runs it): correctness of every kernel backend on CUDA, kernel speed side by side,
bf16 training throughput with the project's DeepSpeed loop, and streaming latency. One JSON and a
Markdown table; ``--dry-run`` runs the same code on CPU at tiny sizes."""
