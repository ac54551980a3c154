"""EngineService over gRPC: the servicer and the protobuf <-> domain mapping.

This layer knows messages and the runtime's domain-level methods (views, summaries, events of a
run); it knows no stream id and no store.
"""
