"""``python -m dns_milvus.sidecar``: the re-ranker sidecar's entry point."""

from dns_milvus.sidecar.server import main

raise SystemExit(main())
