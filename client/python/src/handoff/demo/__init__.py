"""The demo contracts (`handoff.demo.v1`), generated at build time."""
