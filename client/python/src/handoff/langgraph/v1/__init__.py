"""`Step`, `Write`, `SendTo` and `Resume` (in `langgraph_pb2`): the payloads
of `handoff.adapters.langgraph.distribute`."""
