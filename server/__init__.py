"""LSTM stream server: a stateful Keras recurrent model behind gRPC, one Redis state slot per stream."""
