"""The dev kit: real processes and helpers shared by the tests, the benchmarks and scripts/.

Not shipped (pyproject's packages.find leaves it out) and never imported by the server, the client or the
load tester. Importable from the repository root. One module per subject:

- processes: free ports, polling with a deadline, a private redis-server, lstm-serve subprocesses
- server_forks: the tests' lstm-serve processes forked from one that imported the server once
- redis_topologies: Redis Cluster and Sentinel groups on loopback
- topology: the docker-compose topology as processes (Redis, lstm-serve replicas, Envoy)
- loads: a verified lstm-loadtest in the background
- native_calls: small calls to the native API
- repositories: model repositories on disk (a version installed by a rename)
- references: Keras' own answers for whole sequences, and small models to serve
- otlp: an OTLP/gRPC trace receiver (what a collector would get)
- certs, tcp_proxy, metrics, peers, triton_sequences
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root: the working folder of every process started
