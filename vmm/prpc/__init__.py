"""The /prpc bridge (descriptor-driven dispatch) and dstack's JSON/protobuf codec."""
