"""Modules generated from proto/ by ``python -m dns_milvus.rpc.generate``. Do not edit."""
