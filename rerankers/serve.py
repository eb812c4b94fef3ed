"""Start the re-ranker sidecar: ``python rerankers/serve.py [flags]`` (the same as ``python -m
dns_milvus.sidecar``), for supervisors that run a script path rather than a module."""

from dns_milvus.sidecar.server import main

if __name__ == "__main__":
    raise SystemExit(main())
