"""Tests against a real ``herald serve`` over its TCP and HTTP ports."""
