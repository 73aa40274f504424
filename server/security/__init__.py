"""API keys, tenants and their limits, and secrets kept out of logs: no gRPC and no configuration here."""
