"""LSTM stream server: a stateful Keras recurrent model behind gRPC, one Redis state slot per stream."""

import os

# One thread owns the model (server/dataplane/processor.py). NumPy's BLAS would add a worker thread per core for the
# NumPy twin's larger products, and those spin on the cores the event loop needs: one thread measured 25 %
# less CPU in the model's threads under load, for no slower call. Set before anything loads NumPy (this
# package is imported first); an operator's own OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
