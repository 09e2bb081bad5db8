"""Adapters between handoff and agent frameworks, each an optional extra.

- `handoff.adapters.langgraph` (`pip install 'handoff[langgraph]'`): a graph
  node that hands the graph's state off through the broker, `Command(update=...)`
  as a `StateDelta`, and a compiled graph run as a broker agent.
- `handoff.adapters.openai_agents` (`pip install 'handoff[openai-agents]'`): an
  Agents SDK `Handoff` whose invocation is a durable, typed broker handoff.

Nothing is imported here: `import handoff` works without either framework, and
importing an adapter without its framework raises an `ImportError` naming the
extra to install.
"""
