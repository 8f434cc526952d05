"""
Fault, flood and hostile-input runs against a real broker (issue 8, "Proving
it").

Each scenario of L{soak.scenarios} drives a real C{twistd claudemesh-broker}
subprocess (or a throwaway Postgres cluster under it) with real WebSocket
clients, and returns its figures. The test suite runs each one small
(C{tests/test_faults.py}, C{tests/test_floods.py}); C{python -m soak} runs
them long and prints the report (C{make soak}); C{make fuzz} runs the
hypothesis suite of C{tests/test_fuzz.py} with many more examples.
"""
