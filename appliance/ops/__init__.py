"""Operations: what a hospital's monitoring sees of a running cart (Prometheus metrics, docs/metrics.md)."""
