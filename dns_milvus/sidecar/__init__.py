"""The dns-milvus re-ranker sidecar: DnS stage 2 over gRPC and HTTP.

A thin shell over ``dns_milvus.engine``'s ``LocalReranker``; it imports the engine and is never
imported by it. Start it with ``dns-milvus serve-reranker`` or ``python -m dns_milvus.sidecar``;
deployment files (an example configuration, a launcher) are in the repository's ``rerankers/``.
"""
