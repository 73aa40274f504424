"""Dynamic batching of chunks across streams."""
