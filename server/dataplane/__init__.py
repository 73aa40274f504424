"""The protocol-agnostic data path: the plane every servicer calls, the batcher, the batch processor."""
