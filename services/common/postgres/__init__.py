"""PostgreSQL backend of the persistent services (DESIGN 11): pool, keys, leases."""
