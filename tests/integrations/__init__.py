"""Tests of pruneware.integrations."""
