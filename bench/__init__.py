"""
The claudemesh benchmark (issue 7): ``python -m bench [scenario ...] [--quick]``
or ``make bench``. See docs/performance.md.

Modules: :mod:`bench.run` (the runner: servers, scenarios, results),
:mod:`bench.generator` (the asyncio/picows load generator, a separate
process), :mod:`bench.relay` (the minimal Autobahn relay of the ceiling
scenario), :mod:`bench.report` (the table) and :mod:`bench.profile` (py-spy
summaries).
"""
