"""Generated protobuf modules (scripts/codegen); never edit by hand."""
