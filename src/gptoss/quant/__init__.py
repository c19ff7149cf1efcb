"""Quantized weight formats and the modules that hold them packed, on top of `gptoss.ops`:
MXFP4 experts (`gptoss.quant.mxfp4`) and weight-only int8 linears (`gptoss.quant.int8`)."""
