"""Internals of the ``validate`` stage; the public entry point is :mod:`detailfusion.data.validate`.

* :mod:`.checks`: the rules, as plain specifications, and the helper columns they need
  (pandas only, no Great Expectations import);
* :mod:`.gx_runner`: runs the rules as Great Expectations suites and builds the Data Docs.
"""
