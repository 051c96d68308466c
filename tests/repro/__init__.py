"""Tests of the cluster reproduction kit (issue 7)."""
