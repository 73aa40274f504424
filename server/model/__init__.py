"""Hosting a Keras recurrent model as a pure function of (inputs, states)."""
