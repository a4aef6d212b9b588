"""Vienna Direct (DESIGN.md §13): the built-in handlers that execute, and their executions."""
