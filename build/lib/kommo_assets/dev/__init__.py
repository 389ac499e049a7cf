"""Development tooling: the Kommo simulator, the local PostgreSQL, the dev server and the benchmark.

Nothing the code location loads imports this package (a test holds that line): it serves `make run`,
`make dev`, the test suite and `make benchmark`, never a deployment.
"""
