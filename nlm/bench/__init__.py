"""The project's benchmarks (`nlm bench data|train|serve`), one module each."""
