"""The pipeline stages, one module each: load, data, calibrate, quantize, evaluate, save; `run` ties them."""
