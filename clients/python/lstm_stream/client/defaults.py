"""The client's defaults, in one place: `AsyncClient`, `Client`, `RetryPolicy`, the `lstm-stream` CLI and
`lstm-loadtest` all read them here, so their help texts and behaviour cannot drift apart."""

# lstm-serve's default address (its --host and --port) seen from the same machine.
TARGET = "127.0.0.1:50051"
# Seconds one operation (one chunk, with all its retries) may take.
DEADLINE_S = 60.0
# Seconds one attempt may take before it is abandoned and retried, while the deadline allows.
ATTEMPT_TIMEOUT_S = 10.0
# Chunks `pipe()` keeps in flight on one PredictStream call (`lstm-stream predict --window`). Equal to the
# server's default replay window (lstm-serve --replay-window, server/config.py): after a break every
# unanswered chunk is resent and the server answers each one, replayed or applied, so a window up to
# the server's loses no output. A server run with a smaller --replay-window needs a window no larger.
PIPE_WINDOW = 8
# Timesteps a gateway puts in one PredictBatch message at most, all chunks together: lstm-serve's default
# --max-batch-timesteps (the server does not announce its own; ModelInfo.max_batch_chunks it does).
MESSAGE_TIMESTEPS = 65_536
