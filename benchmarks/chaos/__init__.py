"""Chaos runners: the heaviest reliability tests, at full scale, printing figures."""
