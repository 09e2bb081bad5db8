"""What the agents of a distributed LangGraph graph hand each other
(`handoff.langgraph.v1`), generated at build time."""
