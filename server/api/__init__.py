"""Protocol edges: thin servicers that convert protobuf to internal types and back."""
