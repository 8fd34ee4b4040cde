"""Validation: expectation suites on the raw tables and cohorts, image checks, and the report.

Import from the submodules (``retfm.validation.runner`` etc.): this package imports nothing
itself, so an image-check worker process does not pay for importing Great Expectations.
"""
