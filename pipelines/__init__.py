"""One thin module per DVC stage: read params, call retfm, write outs."""
