"""`make bench` chaos suite: a long fuzz run and the fault runs, written to
``bench/results/chaos.md`` (``python -m bench.chaos``).

The fuzzer (:mod:`bench.chaos.fuzz`) also drives the short seeded run in ``make test``
(``tests/integration/test_fuzz.py``).
"""
